"""GrootL models where grootl is not (or barely) imported: ``import grootl`` registers the Auto classes
without importing torch, and a saved directory of any family loads with ``trust_remote_code=True`` in a
Python where grootl cannot be imported, giving the same outputs as grootl's own model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from grootl.model import GrootLConfig, families, load_model, tiny_model

LOAD_WITHOUT_GROOTL = """
import json, sys
sys.modules["grootl"] = None  # any import of grootl fails here
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
ids = torch.tensor(json.loads(sys.argv[1]))
results = {}
for name in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True).eval()
    with torch.no_grad():
        default = model(ids).logits
        prompt = model(ids, context_lens=torch.tensor([4, 9])).logits
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    results[name] = {"class": type(model).__module__ + "." + type(model).__name__, "default": default.tolist(),
                     "prompt": prompt.tolist(), "generated": generated.tolist(),
                     "registered": model.config.model_type in CONFIG_MAPPING}
# what the copy saves (stock transformers' custom-code saving; here the last model) loads again, the same
model.save_pretrained(name + "-again")
again = AutoModelForCausalLM.from_pretrained(name + "-again", trust_remote_code=True).eval()
with torch.no_grad():
    results["again"] = (again(ids, context_lens=torch.tensor([4, 9])).logits - prompt).abs().max().item()
print(json.dumps(results))
"""


def run_python(code: str, *args: str, cwd) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "hf_modules"), PYTHONPATH="")
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_import_grootl_registers_the_auto_classes_without_importing_torch(tmp_path):
    tiny_model().save_pretrained(tmp_path / "model")
    code = """
import sys, grootl
assert "torch" not in sys.modules, "import grootl imported torch"
from transformers import AutoModelForCausalLM
print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__module__)
"""
    assert run_python(code, str(tmp_path / "model"), cwd=tmp_path) == "grootl.model.modeling"


@pytest.mark.parametrize("first_import", ["import peft", "from transformers import MambaForCausalLM"])
def test_auto_classes_register_when_a_library_reaches_them_mid_import(tmp_path, first_import):
    """``import peft`` or a stock model class after ``import grootl`` import transformers' Auto classes half-way
    through their own imports: the registration waits for them to finish, with no warning."""
    tiny_model().save_pretrained(tmp_path / "model")
    code = f"""
import sys, warnings
warnings.simplefilter("error")
import grootl
{first_import}
from transformers import AutoModelForCausalLM
print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__module__)
"""
    assert run_python(code, str(tmp_path / "model"), cwd=tmp_path) == "grootl.model.modeling"


def test_saved_models_of_every_kind_load_without_grootl_and_give_the_same_outputs(tmp_path):
    """grootl_mamba, Mamba-2, a Mamba-1 family (Falcon-Mamba) and a hybrid with attention, MoE and renamed
    checkpoint weights (Granite-4.0-H), with λ > 0; one subprocess loads them all."""
    torch.manual_seed(0)
    grootl = GrootLConfig(modulation=0.4)
    models = {"grootl_mamba": tiny_model(grootl=grootl)}
    for model_type in ("mamba2", "falcon_mamba", "granitemoehybrid"):
        models[model_type] = families.from_config(families.tiny_config(model_type), grootl)
    for name, model in models.items():
        model.eval().save_pretrained(tmp_path / name)

    auto_map = {name: json.loads((tmp_path / name / "config.json").read_text())["auto_map"] for name in models}
    assert auto_map["grootl_mamba"] == {"AutoConfig": "grootl_model_config.GrootLMambaConfig",
                                        "AutoModel": "grootl_model_modeling.GrootLMambaModel",
                                        "AutoModelForCausalLM": "grootl_model_modeling.GrootLMambaForCausalLM"}
    assert auto_map["mamba2"] == {"AutoConfig": "grootl_model_families.GrootLMamba2Config",
                                  "AutoModelForCausalLM": "grootl_model_families.GrootLMamba2ForCausalLM"}
    copied = {name: {p.name for p in (tmp_path / name).glob("grootl_*.py")} for name in models}
    assert "grootl_model_modeling.py" in copied["grootl_mamba"] and "grootl_tree_mamba2.py" in copied["mamba2"]
    # only what loading imports: no families for grootl_mamba, never the native kernels or the save machinery
    assert not any(f.startswith("grootl_model_families") for f in copied["grootl_mamba"])
    assert not any({"grootl_tree_native.py", "grootl_model_portable.py"} & files for files in copied.values())

    ids = torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    out = json.loads(run_python(LOAD_WITHOUT_GROOTL, json.dumps(ids.tolist()), *models, cwd=tmp_path))
    assert out["again"] < 1e-6
    for name, model in models.items():
        there = out[name]
        assert there["class"].startswith("transformers_modules.")
        assert there["class"].endswith("." + type(model).__name__)
        assert not there["registered"]  # the copy leaves the Auto registry to grootl
        with torch.no_grad():
            default = model(ids).logits
            prompt = model(ids, context_lens=torch.tensor([4, 9])).logits
        generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        torch.testing.assert_close(torch.tensor(there["default"]), default, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(torch.tensor(there["prompt"]), prompt, rtol=1e-4, atol=1e-5, msg=name)
        assert (prompt - default).abs().max() > 1e-4, name  # the prompt's tree ran there too
        assert there["generated"] == generated.tolist(), name

        # with grootl: the same directory loads as grootl's own classes
        for loaded in (load_model(str(tmp_path / name)), AutoModelForCausalLM.from_pretrained(tmp_path / name)):
            assert type(loaded) is type(model), name
            with torch.no_grad():
                torch.testing.assert_close(loaded.eval()(ids, context_lens=torch.tensor([4, 9])).logits, prompt)


class UserMamba2(families.GrootLMamba2ForCausalLM):
    """A user's subclass: grootl cannot ship its code."""


def test_a_class_grootl_does_not_publish_saves_without_portable_code(tmp_path):
    model = UserMamba2(families.GrootLMamba2Config.from_stock(families.tiny_config("mamba2"), {"modulation": 0.4}))
    model.config.auto_map = {"AutoConfig": "stale.Config"}  # e.g. from an earlier save
    with pytest.warns(UserWarning, match="UserMamba2 is not a class of grootl's"):
        model.save_pretrained(tmp_path)
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())
    assert not list(tmp_path.glob("grootl_*.py"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # with grootl: its own class, the same weights
    assert type(loaded) is families.GrootLMamba2ForCausalLM
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
