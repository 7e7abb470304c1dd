"""GrootL models where grootl is not (or barely) imported: ``import grootl`` registers the Auto classes
without importing torch, and a saved directory loads with ``trust_remote_code=True`` in a Python where
grootl cannot be imported, giving the same outputs as grootl's own model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from grootl.model import GrootLConfig, tiny_model

LOAD_WITHOUT_GROOTL = """
import json, sys
sys.modules["grootl"] = None  # any import of grootl fails here
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    default = model(ids).logits
    prompt = model(ids, context_lens=torch.tensor([4, 9])).logits
generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__, "default": default.tolist(),
                  "prompt": prompt.tolist(), "generated": generated.tolist()}))
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


def test_saved_model_loads_without_grootl_and_gives_the_same_outputs(tmp_path):
    model = tiny_model(grootl=GrootLConfig(modulation=0.4)).eval()
    model.save_pretrained(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "grootl_model_modeling.GrootLMambaForCausalLM"
    ids = torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    out = json.loads(run_python(LOAD_WITHOUT_GROOTL, str(tmp_path / "model"), json.dumps(ids.tolist()), cwd=tmp_path))
    assert out["class"].startswith("transformers_modules.") and out["class"].endswith(".GrootLMambaForCausalLM")
    with torch.no_grad():
        default = model(ids).logits
        prompt = model(ids, context_lens=torch.tensor([4, 9])).logits
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(torch.tensor(out["default"]), default, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(out["prompt"]), prompt, rtol=1e-4, atol=1e-5)
    assert (prompt - default).abs().max() > 1e-4  # the prompt's tree ran there too
    assert out["generated"] == generated.tolist()
