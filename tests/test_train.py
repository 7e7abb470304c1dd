"""grootl train end to end on CPU with tiny random-init models: the demo recipe, overfitting, exact
resume after a kill, what each arm trains, export and reload, and the failure cases."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoTokenizer

import grootl.train.loop as loop
from grootl import load_model
from grootl.data import DataError, load_records, tokenize_records
from grootl.model import ADAPTER_SETTINGS, tiny_model
from grootl.train import load_recipe, main, train
from grootl.train.loop import TrainingError, prepare_data
from grootl.train.modeling import build_model
from grootl.train.rundir import (RunDirError, RunLock, check_output_dir, checkpoint_dirs, claim_output_dir,
                                 read_metrics, take_output_dir)

from conftest import ASSETS, REPO

DEMO = REPO / "recipes" / "tiny" / "cpu-demo.yaml"
# The demo recipe, shrunk: short rows, one micro-batch per step, quiet, no trackers, no eval.
FAST = ["data.max_length=48", "model.config.hidden_size=32", "train.batch_size=4", "train.grad_accum=1",
        "train.warmup_steps=0", "train.schedule=constant", "log.every=1", "log.progress=false", "log.trackers=[]",
        "data.eval_size=0", "eval.every=null", "checkpoint.every=null"]


def recipe(tmp_path, *overrides, name="run"):
    return load_recipe(DEMO, [f"output_dir={tmp_path / name}", *FAST, *overrides])


def losses(out):
    return {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}


def checkpoint_model(recipe_, checkpoint):
    """The model a checkpoint holds, rebuilt from the recipe (tied lm_head is stored once)."""
    model = build_model(recipe_, Path(recipe_.output_dir))
    missing, unexpected = model.load_state_dict(load_file(checkpoint / "model.safetensors"), strict=False)
    assert not unexpected and all(key.endswith("lm_head.weight") for key in missing)
    return model.eval()


def batch_for_logits():
    torch.manual_seed(1)
    return {"input_ids": torch.randint(2, 512, (2, 24)), "context_lens": torch.tensor([10, 16])}


@torch.no_grad()
def logits(model):
    return model(**batch_for_logits()).logits


def test_demo_recipe_end_to_end(tmp_path):
    run = load_recipe(DEMO, [f"output_dir={tmp_path / 'demo'}", "train.epochs=2", "data.max_length=96",
                             "log.progress=false", "eval.every=5", "checkpoint.every=5", "checkpoint.keep=1"])
    final = train(run)
    out = tmp_path / "demo"
    metrics = read_metrics(out)
    train_losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(train_losses) >= 20 and all(m["tokens_per_s"] > 0 for m in metrics if "loss" in m)
    assert sum(train_losses[-4:]) / 4 < sum(train_losses[:4]) / 4 - 0.3  # the loss falls
    eval_losses = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(eval_losses) >= 2 and eval_losses[-1] < eval_losses[0]
    assert list((out / "logs").rglob("events.out.tfevents*"))  # TensorBoard tracker
    assert [p.name for p in checkpoint_dirs(out)] == [f"step-{len(train_losses)}"]  # pruned to keep=1

    # The exported merged model carries its GrootL settings and reloads with the trained logits.
    config = json.loads((final / "config.json").read_text())
    assert config["model_type"] == "grootl_mamba" and config["grootl"]["enabled"] and config["grootl"]["modulation"] == 0.3
    trained = checkpoint_model(run, checkpoint_dirs(out)[-1])
    merged = load_model(str(final)).eval()
    torch.testing.assert_close(logits(merged), logits(trained), atol=1e-4, rtol=1e-4)
    adapted = PeftModel.from_pretrained(load_model(str(out / "base")), final / "adapter").eval()
    torch.testing.assert_close(logits(adapted), logits(trained), atol=1e-4, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(final).pad_token == "<|padding|>"

    # The folder now holds a run: a second start is refused unless --resume / --overwrite.
    with pytest.raises(RunDirError, match="already holds a run .*--resume.*--overwrite"):
        train(run)


def test_overfits_a_few_records(tmp_path):
    records = [json.loads(line) for line in (ASSETS / "alpaca_tiny.jsonl").read_text().splitlines()[:4]]
    data = tmp_path / "four.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records * 8))
    train(recipe(tmp_path, f"data.path={data}", "method=full", "train.lr=1e-2", "train.max_steps=40", "data.max_length=96"))
    history = losses(tmp_path / "run")
    assert history[1] > 5 and min(history[s] for s in range(36, 41)) < 0.5


def test_kill_mid_save_keeps_previous_checkpoint_and_resume_is_exact(tmp_path, monkeypatch):
    steps = ["train.max_steps=6", "checkpoint.every=2", "checkpoint.keep=5"]
    train(recipe(tmp_path, *steps, name="straight"))

    real_save = Accelerator.save_state

    def save_then_sigterm(self, output_dir=None, **kwargs):
        real_save(self, output_dir, **kwargs)  # the files are written ...
        if output_dir.endswith("step-4"):
            os.kill(os.getpid(), signal.SIGTERM)  # ... and the run is killed before publishing them

    monkeypatch.setattr(Accelerator, "save_state", save_then_sigterm)
    interrupted = recipe(tmp_path, *steps, name="killed")
    with pytest.raises(TrainingError, match=r"interrupted \(signal 15\) at optimizer step 4; newest complete checkpoint: .*step-2"):
        train(interrupted)
    out = tmp_path / "killed"
    assert [p.name for p in checkpoint_dirs(out)] == ["step-2"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name != "step-2"]  # no half-written step-4
    assert json.loads((out / "checkpoints/step-2/trainer_state.json").read_text())["step"] == 2
    checkpoint_model(interrupted, out / "checkpoints/step-2")  # loadable

    monkeypatch.setattr(Accelerator, "save_state", real_save)
    train(interrupted, resume=True)
    assert losses(out) == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    straight = checkpoint_model(interrupted, tmp_path / "straight/checkpoints/step-6")
    resumed = checkpoint_model(interrupted, out / "checkpoints/step-6")
    torch.testing.assert_close(logits(resumed), logits(straight))


@pytest.mark.parametrize("method", ["grootl", "lora", "full"])
def test_each_arm_trains_only_what_it_should(tmp_path, monkeypatch, method):
    initial = {}
    real_build_base = loop.build_base

    def spy(recipe_):
        model = real_build_base(recipe_)
        initial.update({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(loop, "build_base", spy)
    run = recipe(tmp_path, f"method={method}", "train.max_steps=3", "checkpoint.every=3", "train.lr=1e-2")
    final = train(run)
    out = tmp_path / "run"
    trained = load_file(out / "checkpoints/step-3/model.safetensors")
    prefix = "" if method == "full" else "base_model.model."
    changed = {key for key, value in initial.items()
               if (prefix + key) in trained and not torch.equal(trained[prefix + key], value)}
    lora = {k: v for k, v in trained.items() if "lora_" in k}
    config = json.loads((final / "config.json").read_text())
    assert config["grootl"]["enabled"] == (method == "grootl")
    if method == "full":
        assert not lora and not (final / "adapter").exists()
        assert {"backbone.embeddings.weight", "backbone.layers.0.mixer.A_log", "backbone.layers.1.mixer.in_proj.weight"} <= changed
        return
    base_keys = {key.replace(".base_layer", "") for key in trained if "lora_" not in key}
    assert base_keys and not changed  # the base is frozen
    assert all(v.abs().sum() > 0 for k, v in lora.items() if "_B" in k)  # LoRA B starts at zero: it moved
    modules = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in lora}
    assert modules == {"x_proj", "embeddings", "in_proj", "out_proj"}
    adapter_config = json.loads((final / "adapter/adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["lora_dropout"]) == (8, 16, 0.0)
    assert adapter_config["base_model_name_or_path"] == str(out / "base")
    adapted = PeftModel.from_pretrained(load_model(adapter_config["base_model_name_or_path"]), final / "adapter").eval()
    torch.testing.assert_close(logits(adapted), logits(load_model(str(final)).eval()), atol=1e-4, rtol=1e-4)
    # the arm's tree settings travel with the adapter, so scoring the adapter alone scores the same arm
    assert json.loads((final / "adapter" / ADAPTER_SETTINGS).read_text()) == config["grootl"]
    from grootl.evaluation.lm import GrootLLM

    assert GrootLLM(pretrained=str(final / "adapter"), device="cpu").grootl_config.enabled == (method == "grootl")


def test_non_finite_loss_stops_at_the_step_and_keeps_the_checkpoints_before_it(tmp_path):
    # Step 1 runs at lr 0 (warm-up), step 2 at lr 1e30 wrecks the weights, step 3 cannot go on.
    run = recipe(tmp_path, "method=full", "train.lr=1e30", "train.warmup_steps=1", "train.max_steps=6",
                 "checkpoint.every=1", "checkpoint.keep=3")
    with pytest.raises(TrainingError, match=r"(loss is (nan|inf)|activations are not finite .*) at optimizer step 3; "
                                            r"stopped before updating the weights \(checkpoints before it are kept, "
                                            r"newest .*step-2\)"):
        train(run)
    out = tmp_path / "run"
    assert [p.name for p in checkpoint_dirs(out)] == ["step-1", "step-2"] and not (out / "final").exists()
    assert torch.isfinite(logits(checkpoint_model(run, out / "checkpoints/step-1"))).all()


def test_empty_dataset_after_filtering_is_an_error(tmp_path):
    run = recipe(tmp_path, "data.max_length=8")
    tokenizer = AutoTokenizer.from_pretrained(run.model.tokenizer)
    with pytest.raises(DataError, match=r"alpaca_tiny.jsonl: no training records left after filtering \(206 records: "
                                        r"0 kept .*206 prompt leaves no room"):
        prepare_data(run, tokenizer, log=lambda message: None)
    with pytest.raises(DataError, match=r"data.eval_size 500 leaves no training records"):
        prepare_data(recipe(tmp_path, "data.eval_size=500"), tokenizer, log=lambda message: None)
    long_prompts = tmp_path / "eval.jsonl"
    long_prompts.write_text(json.dumps({"instruction": "word " * 400, "input": "", "output": "yes"}) + "\n")
    with pytest.raises(DataError, match=r"eval.jsonl: no eval records left after filtering"):
        prepare_data(recipe(tmp_path, f"data.eval_path={long_prompts}"), tokenizer, log=lambda message: None)


class SimulatedProcess:
    """The parts of an Accelerator that ``evaluate`` uses, as one of ``num_processes`` CPU processes;
    ``reduce`` keeps this process's totals for the test to sum."""

    device = torch.device("cpu")
    autocast = staticmethod(contextlib.nullcontext)

    def __init__(self, num_processes, process_index):
        self.num_processes, self.process_index = num_processes, process_index

    def reduce(self, totals, reduction):
        self.totals = totals.clone()
        return totals


@pytest.mark.parametrize("count, batch_size", [(5, 2), (7, 3), (1, 2)])  # 3+2, 4+3 and 1+0 rows: uneven batches
def test_eval_runs_as_many_batches_on_every_process_and_the_mean_stays_exact(count, batch_size):
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    rows, _ = tokenize_records(load_records(ASSETS / "alpaca_tiny.jsonl").select(range(count)), tokenizer,
                               max_length=256)
    model = tiny_model()
    forwards = []
    model.register_forward_hook(lambda module, args, output: forwards.append(1))
    single = loop.evaluate(SimulatedProcess(1, 0), model, rows, batch_size, tokenizer.pad_token_id)
    ranks, passes = [SimulatedProcess(2, 0), SimulatedProcess(2, 1)], []
    for rank in ranks:
        forwards.clear()
        loop.evaluate(rank, model, rows, batch_size, tokenizer.pad_token_id)
        passes.append(len(forwards))
    assert passes[0] == passes[1] == math.ceil(math.ceil(count / 2) / batch_size)
    total = ranks[0].totals + ranks[1].totals
    assert total[1] == sum(len(ids) - context for ids, context in zip(rows["input_ids"], rows["context_len"]))
    assert float(total[0] / total[1]) == pytest.approx(single, rel=1e-5)


def test_output_dir_rules(tmp_path):
    recipe_dict = recipe(tmp_path).to_dict()
    out = tmp_path / "run"
    assert check_output_dir(out, recipe_dict, resume=False, overwrite=False) == "new"
    out.mkdir()
    (out / ".lock").write_text("pid 1")  # a start killed right after locking
    assert check_output_dir(out, recipe_dict, resume=True, overwrite=False) == "new"
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty and holds no grootl run"):
        check_output_dir(out, recipe_dict, resume=False, overwrite=True)
    (out / "notes.txt").unlink()
    (out / "run.json").write_text(json.dumps({"recipe": recipe_dict, "started": "today"}))
    with pytest.raises(RunDirError, match="already holds a run"):
        check_output_dir(out, recipe_dict, resume=False, overwrite=False)
    assert check_output_dir(out, recipe_dict, resume=True, overwrite=False) == "resume"
    assert check_output_dir(out, recipe_dict, resume=False, overwrite=True) == "overwrite"
    changed = dict(recipe_dict, method="full", train=dict(recipe_dict["train"], lr=0.5, num_workers=2))
    with pytest.raises(RunDirError, match=r"recipe differs in \['method', 'train.lr'\]"):
        check_output_dir(out, changed, resume=True, overwrite=False)
    with pytest.raises(RunDirError, match="contradict"):
        check_output_dir(out, recipe_dict, resume=True, overwrite=True)


def claim(out, recipe_dict, resume=False, overwrite=False):
    """What a training's main process does with its output_dir before training: lock, check, claim."""
    lock = RunLock(out)
    action = take_output_dir(out, recipe_dict, resume, overwrite, lock)
    claim_output_dir(out, recipe_dict, action, lock)
    lock.release()
    return action


def test_resume_removes_what_killed_writes_and_deletes_left(tmp_path):
    recipe_dict = recipe(tmp_path).to_dict()
    out = tmp_path / "run"
    claim(out, recipe_dict)
    (out / "checkpoints/step-2").mkdir(parents=True)
    (out / "checkpoints/step-2/trainer_state.json").write_text('{"step": 2}')
    (out / "checkpoints/step-3").mkdir()  # no trainer state: never published (or half deleted by an older grootl)
    (out / "checkpoints/.tmp-step-4").mkdir()  # a save killed with SIGKILL
    (out / "checkpoints/.tmp-deleting-step-1").mkdir()  # pruning killed mid-way
    (out / ".tmp-base").mkdir()  # base/ or final/ killed while written
    (out / ".tmp-run.json").write_text("{")
    assert claim(out, recipe_dict, resume=True) == "resume"
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoints", "run.json"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]


@pytest.mark.parametrize("override, message", [
    ("data.max_length=1", "data.max_length must be at least 2"),
    ("model.config.hidden_size=abc", "model.config is not a valid MambaConfig"),
    ("model.config.hidden_sise=32", "model.config has unknown MambaConfig field(s) ['hidden_sise']"),
    ("model.config.vocab_size=100", "the tokenizer has 512 tokens but the model's vocab_size is 100"),
    ("model.tokenizer=/nonexistent/tokenizer", "recipe key model.tokenizer: /nonexistent/tokenizer does not exist"),
    (f"model.tokenizer={ASSETS / 'alpaca_tiny.jsonl'}", "model.tokenizer: cannot load a tokenizer from"),
])
def test_bad_recipe_values_are_clear_errors(tmp_path, capsys, override, message):
    assert main([str(DEMO), f"output_dir={tmp_path / 'run'}", *FAST, "train.max_steps=1", override]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_refuses_a_run_dir_and_overwrite_replaces_it(tmp_path, capsys):
    args = [str(DEMO), f"output_dir={tmp_path / 'run'}", *FAST, "train.max_steps=1"]
    assert main([*args, f"data.path={tmp_path / 'missing.jsonl'}"]) == 1  # a failed start claims nothing
    assert not (tmp_path / "run").exists()
    assert main(args) == 0
    assert main(args) == 1
    assert "already holds a run" in capsys.readouterr().err
    (tmp_path / "run/final/stale.txt").write_text("from the first run")
    assert main([*args, "--overwrite"]) == 0 and (tmp_path / "run/final/config.json").is_file()
    assert not (tmp_path / "run/final/stale.txt").exists()  # the old run was deleted first


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "grootl.train", str(DEMO), "--print-recipe", "train.lr=0.5"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "lr: 0.5" in result.stdout and "method: grootl" in result.stdout


def test_pretrained_init_from_a_local_checkpoint(tmp_path):
    """The code path of the 130M recipes (model.init: pretrained), on a saved tiny stock-Mamba checkpoint."""
    from transformers import MambaForCausalLM

    from grootl.model import tiny_config

    stock = tmp_path / "stock-mamba"
    MambaForCausalLM(tiny_config()).save_pretrained(stock)
    AutoTokenizer.from_pretrained(ASSETS / "tokenizer").save_pretrained(stock)
    run = load_recipe(REPO / "recipes/mamba-130m/alpaca-lora.yaml", [
        f"output_dir={tmp_path / 'run'}", f"model.name_or_path={stock}", f"data.path={ASSETS / 'alpaca_tiny.jsonl'}",
        "data.max_length=48", "train.batch_size=4", "train.grad_accum=1", "train.max_steps=2", "train.lr=1e-2",
        "train.mixed_precision=no", "train.gradient_checkpointing=true", "log.progress=false", "log.trackers=[]",
        "checkpoint.every=null"])
    final = train(run)
    adapter_config = json.loads((final / "adapter/adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(stock) and not (tmp_path / "run/base").exists()
    assert json.loads((final / "config.json").read_text())["grootl"]["enabled"] is False  # the LoRA arm: plain scan
    adapted = PeftModel.from_pretrained(load_model(str(stock), grootl={"enabled": False}), final / "adapter").eval()
    torch.testing.assert_close(logits(adapted), logits(load_model(str(final)).eval()), atol=1e-4, rtol=1e-4)


def test_missing_local_model_path_is_one_line_before_any_loading(tmp_path, capsys):
    run = [str(REPO / "recipes/mamba-130m/alpaca-lora.yaml"), f"output_dir={tmp_path / 'run'}"]
    assert main([*run, "model.name_or_path=./no-such-model"]) == 1
    error = capsys.readouterr().err
    assert error == f"grootl train: error: recipe key model.name_or_path: {Path.cwd() / 'no-such-model'} does not exist\n"
    assert not (tmp_path / "run").exists()


def test_training_log(tmp_path, monkeypatch, capsys):
    """Messages go above the progress bar (tqdm.write), the bar is drawn once per step showing that step's
    loss, the logged lr is the one the step used, and the export names the records trained on."""
    from tqdm.std import tqdm

    class Bar(tqdm):
        shown, written = [], []

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "mininterval": 0, "miniters": 1})  # draw on every update

        def display(self, *args, **kwargs):
            Bar.shown.append((self.n, dict(item.split("=") for item in (self.postfix or "").split(", ") if item)))
            return super().display(*args, **kwargs)

        @classmethod
        def write(cls, message, *args, **kwargs):
            Bar.written.append(message)
            super().write(message, *args, **kwargs)

    monkeypatch.setattr(loop, "tqdm", Bar)
    train(recipe(tmp_path, "train.max_steps=4", "train.warmup_steps=2", "train.lr=0.01", "log.progress=true",
                 "data.eval_size=4", "eval.every=2"))
    metrics = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert [m["lr"] for m in metrics] == pytest.approx([0.0, 0.005, 0.01, 0.01])  # warm-up from 0
    shown = [(n, postfix) for n, postfix in Bar.shown if n > 0]
    # once per step (step 2 again below its eval line, step 4 when closed), always with that step's values
    assert [n for n, _ in shown].count(1) == [n for n, _ in shown].count(3) == 1
    for n, postfix in shown:
        assert postfix["loss"] == f"{metrics[n - 1]['loss']:.4f}" and postfix["lr"] == f"{metrics[n - 1]['lr']:.2e}"
    assert any("step 2: eval loss" in message for message in Bar.written)
    assert "(100 training records)" in Bar.written[-1]  # 104 kept, 4 held out for eval


def test_a_misspelt_recipe_key_names_the_key_it_means():
    from grootl.train.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"unknown recipe key\(s\) \['train.max_stepz'\]; valid keys: .*; "
                                          r"did you mean train.max_steps for train.max_stepz\?$"):
        load_recipe(values={"output_dir": "x", "model": {"init": "random", "tokenizer": "t"}, "train": {"max_stepz": 2}})
    with pytest.raises(RecipeError, match=r"unknown recipe key 'train.lrate'; valid keys: .*; did you mean train.lr "):
        load_recipe(DEMO, ["train.lrate=1e-3"])
    with pytest.raises(RecipeError, match=r"unknown recipe key 'zzz'; valid keys: [^;]*$"):  # nothing close: no guess
        load_recipe(DEMO, ["zzz=1"])
