"""``grootl generate``: the run's prompt template, the tree settings, and the printed response."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from grootl.cli import main as cli_main
from grootl.data import TEMPLATES
from grootl.model import GrootLMambaForCausalLM, load_model
from grootl.train import load_recipe, train

from conftest import REPO

DEMO = REPO / "recipes" / "tiny" / "cpu-demo.yaml"

INSTRUCTION = "Name three colors."


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A short real ``grootl train`` run of the demo recipe with the ``alpaca`` template: its ``final/``
    and ``run.json`` as the command leaves them."""
    out = tmp_path_factory.mktemp("generate") / "run"
    train(load_recipe(DEMO, [f"output_dir={out}", "data.template=alpaca", "grootl.modulation=0.7", "train.max_steps=24",
                             "log.progress=false", "log.trackers=[]", "eval.every=null", "checkpoint.every=null"]))
    return out


def greedy(model_dir, prompt: str, new_tokens: int = 6) -> str:
    """The model's own greedy continuation of ``prompt`` (tokenized as in training)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir).eval()
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize(
    "flags, prompt",
    [
        ([], TEMPLATES["alpaca"].format(INSTRUCTION)),  # the run's template
        (["--template", "grootl"], TEMPLATES["grootl"].format(INSTRUCTION)),
        (["--raw"], INSTRUCTION),
    ],
    ids=["run-template", "template", "raw"],
)
def test_prints_the_models_greedy_response(run_dir, capsys, flags, prompt):
    assert cli_main(["generate", str(run_dir), INSTRUCTION, "--max-new-tokens", "6", "--device", "cpu", *flags]) == 0
    assert capsys.readouterr().out == greedy(run_dir / "final", prompt) + "\n"


def test_the_prompts_differ_in_what_they_generate(run_dir):
    """Guards the test above: each way of building the prompt gets its own response from this model."""
    responses = {greedy(run_dir / "final", p) for p in (INSTRUCTION, *(TEMPLATES[t].format(INSTRUCTION) for t in ("alpaca", "grootl")))}
    assert len(responses) == 3


@pytest.mark.parametrize(
    "flags, settings",
    [([], {"enabled": True, "modulation": 0.7}), (["--no-tree"], {"enabled": False}), (["--modulation", "0.1"], {"modulation": 0.1})],
    ids=["run-settings", "no-tree", "modulation"],
)
def test_tree_flags_reach_the_model(run_dir, monkeypatch, flags, settings):
    seen = []
    real = GrootLMambaForCausalLM.generate

    def spy(self, *args, **kwargs):
        seen.append(self.grootl)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GrootLMambaForCausalLM, "generate", spy)
    assert cli_main(["generate", str(run_dir), INSTRUCTION, "--max-new-tokens", "2", "--device", "cpu", *flags]) == 0
    assert len(seen) == 1 and {key: getattr(seen[0], key) for key in settings} == settings


def test_input_field_goes_into_the_template(run_dir, capsys):
    assert cli_main(["generate", str(run_dir / "final"), INSTRUCTION, "--input", "Answer in French.",
                     "--template", "grootl", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    expected = greedy(run_dir / "final", TEMPLATES["grootl"].format(INSTRUCTION, "Answer in French."))
    assert capsys.readouterr().out == expected + "\n"


def test_sampling_is_seeded(run_dir, capsys):
    args = ["generate", str(run_dir), INSTRUCTION, "--max-new-tokens", "12", "--temperature", "1.5", "--device", "cpu"]
    outputs = []
    for seed in ("1", "1", "2"):
        assert cli_main([*args, "--seed", seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/missing", "x"], "model path {tmp}/missing does not exist"),
        (["{tmp}", "x"], "holds no model (config.json), adapter (adapter_config.json) or run (final/)"),
        (["{run}", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1; got 0"),
        (["{run}", "x", "--temperature", "-1"], "--temperature must be >= 0; got -1.0"),
        (["{run}", "x", "--modulation", "-2"], "argument --modulation: λ must be a number >= 0; got -2"),
        (["{run}", "x", "--dtype", "float99"], "--dtype float99 is not a torch dtype"),
        (["{run}", ""], "the instruction is empty"),
        (["{run}", " \n\t "], "the instruction is empty"),
        (["{run}", "", "--raw"], "the instruction is empty"),
    ],
)
def test_bad_input_is_one_line(run_dir, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path, run=run_dir) for a in args]
    try:
        assert cli_main(["generate", *args, "--device", "cpu"]) == 2
    except SystemExit as exit_:  # argparse rejects a malformed option value
        assert exit_.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("grootl generate: error: ") and message.format(tmp=tmp_path) in last and "Traceback" not in err


def test_a_broken_run_file_is_named(tmp_path, run_dir, capsys):
    (tmp_path / "final").symlink_to(run_dir / "final")
    (tmp_path / "run.json").write_text("{not json")
    assert cli_main(["generate", str(tmp_path), "x", "--device", "cpu"]) == 2
    assert f"{tmp_path / 'run.json'} names no prompt template" in capsys.readouterr().err


def test_an_adapter_is_sent_to_the_merged_model(tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text("{}")
    assert cli_main(["generate", str(tmp_path), "x"]) == 2
    assert "is a PEFT adapter: generate from the run's merged model" in capsys.readouterr().err
