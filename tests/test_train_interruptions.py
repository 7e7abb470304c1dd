"""A kill at the awkward moments of a run loses nothing: while base/ is written, during --overwrite's
delete, during pruning, around the final export; metrics.jsonl holds each line once after a resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import grootl.train.rundir as rundir
from grootl import load_model
from grootl.model import GrootLMambaForCausalLM
from grootl.train import train
from grootl.train.loop import TrainingError
from grootl.train.rundir import check_output_dir, checkpoint_dirs, read_metrics

from test_train import claim, logits, recipe


def adapter_matches_final(out: Path) -> None:
    """final/adapter on base/ gives the merged final model's logits (what an adapter-only eval scores)."""
    adapted = PeftModel.from_pretrained(load_model(str(out / "base")), out / "final/adapter").eval()
    torch.testing.assert_close(logits(adapted), logits(load_model(str(out / "final")).eval()), atol=1e-4, rtol=1e-4)


def test_kill_while_base_is_written_then_resume_writes_it(tmp_path, monkeypatch):
    real_save = GrootLMambaForCausalLM.save_pretrained

    def save_then_die(self, directory, **kwargs):
        real_save(self, directory, **kwargs)  # the weights are written, the tokenizer and the rename are not
        raise KeyboardInterrupt

    monkeypatch.setattr(GrootLMambaForCausalLM, "save_pretrained", save_then_die)
    run = recipe(tmp_path, "train.max_steps=2", "checkpoint.every=1")
    with pytest.raises(KeyboardInterrupt):
        train(run)
    out = tmp_path / "run"
    assert not (out / "base").exists()  # no partial base/ under its real name
    monkeypatch.undo()
    train(run, resume=True)
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    adapter_matches_final(out)

    # A run finished by an older grootl with an empty base/: resuming it writes the base and trains nothing.
    shutil.rmtree(out / "base")
    (out / "base").mkdir()
    metrics = read_metrics(out)
    assert train(run, resume=True) == out / "final"
    assert read_metrics(out) == metrics
    adapter_matches_final(out)


@pytest.mark.parametrize("moment", ["after the rename", "while deleting"])
def test_kill_during_overwrite_leaves_a_folder_both_flags_accept(tmp_path, monkeypatch, moment):
    recipe_dict = recipe(tmp_path).to_dict()
    out = tmp_path / "run"
    claim(out, recipe_dict)
    (out / "checkpoints/step-1").mkdir(parents=True)
    (out / "checkpoints/step-1/trainer_state.json").write_text('{"step": 1}')
    aside = out.with_name(".run.overwritten")
    real_rmtree = shutil.rmtree

    real_acquire = rundir.RunLock.acquire

    def kill_acquire(self):
        if aside.exists():  # the second lock, on the new folder
            raise KeyboardInterrupt
        real_acquire(self)

    def kill_mid_delete(path, *args, **kwargs):
        if Path(path) == aside and aside.exists():
            (aside / "run.json").unlink()  # part of the old run is gone ...
            raise KeyboardInterrupt  # ... and the process dies
        real_rmtree(path, *args, **kwargs)

    if moment == "after the rename":
        monkeypatch.setattr(rundir.RunLock, "acquire", kill_acquire)
    else:
        monkeypatch.setattr(rundir.shutil, "rmtree", kill_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        claim(out, recipe_dict, overwrite=True)
    monkeypatch.undo()
    assert aside.is_dir() and not (out / "checkpoints").exists()  # the old run is out of the way at once
    for resume, overwrite in [(True, False), (False, True)]:
        check_output_dir(out, recipe_dict, resume=resume, overwrite=overwrite)  # accepted
    claim(out, recipe_dict, overwrite=True)
    assert not aside.exists() and (out / "run.json").is_file()


def test_kill_during_pruning_then_resume_leaves_only_complete_checkpoints(tmp_path, monkeypatch):
    real_rmtree = shutil.rmtree

    def kill_mid_delete(path, *args, **kwargs):
        if Path(path).name == ".tmp-deleting-step-1" and Path(path).exists():
            (Path(path) / "trainer_state.json").unlink()
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(rundir.shutil, "rmtree", kill_mid_delete)
    run = recipe(tmp_path, "train.max_steps=3", "checkpoint.every=1", "checkpoint.keep=1")
    with pytest.raises(TrainingError, match="interrupted"):
        train(run)
    monkeypatch.undo()
    out = tmp_path / "run"
    assert [p.name for p in checkpoint_dirs(out)] == ["step-2"]  # step-1 never shows as a checkpoint again
    train(run, resume=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3"]
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]


def test_metrics_hold_each_line_once_after_a_resume(tmp_path):
    # With checkpoints: killed before final/ was renamed into place (after the final eval line was written).
    run = recipe(tmp_path, "train.max_steps=3", "checkpoint.every=3", "data.eval_size=4")
    train(run)
    out = tmp_path / "run"
    finished = read_metrics(out)
    assert [m["step"] for m in finished] == [1, 2, 3, 3] and "eval_loss" in finished[-1]
    shutil.rmtree(out / "final")
    train(run, resume=True)
    assert read_metrics(out) == finished
    # Resuming a finished run trains and logs nothing.
    train(run, resume=True)
    assert read_metrics(out) == finished

    # Without a checkpoint a resume starts from step 0, and the old lines go.
    run = recipe(tmp_path, "train.max_steps=2", name="no-checkpoints")
    train(run)
    shutil.rmtree(tmp_path / "no-checkpoints/final")
    train(run, resume=True)
    assert [m["step"] for m in read_metrics(tmp_path / "no-checkpoints")] == [1, 2]


def test_resume_at_and_after_an_epoch_boundary_is_exact(tmp_path):
    run = recipe(tmp_path, "data.limit=24", "train.max_steps=7", "checkpoint.every=2", "checkpoint.keep=5")
    train(run)
    out = tmp_path / "run"
    straight = read_metrics(out)
    assert {m["epoch"] for m in straight} == {0, 1, 2}  # 3 steps per epoch: step-6 ends one, step-4 is inside one
    for newest in ("step-6", "step-4"):
        for later in checkpoint_dirs(out)[[p.name for p in checkpoint_dirs(out)].index(newest) + 1:]:
            shutil.rmtree(later)
        shutil.rmtree(out / "final")
        train(run, resume=True)
        resumed = read_metrics(out)
        assert [m["step"] for m in resumed] == list(range(1, 8))
        assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in straight], abs=1e-6)
        assert [m["epoch"] for m in resumed] == [m["epoch"] for m in straight]


def test_ctrl_c_names_itself_the_step_and_the_checkpoint_to_resume_from(tmp_path, monkeypatch):
    """Ctrl-C (a bare KeyboardInterrupt) is one line naming it, the step and the newest checkpoint."""
    import accelerate

    real_save = accelerate.Accelerator.save_state

    def save_then_ctrl_c(self, output_dir=None, **kwargs):
        real_save(self, output_dir, **kwargs)
        if output_dir.endswith("step-2"):
            raise KeyboardInterrupt  # what Python raises on SIGINT

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_then_ctrl_c)
    run = recipe(tmp_path, "train.max_steps=2", "checkpoint.every=1")
    with pytest.raises(TrainingError, match=r"^interrupted \(Ctrl-C\) at optimizer step 2; newest complete "
                                            r"checkpoint: .*step-1; continue with --resume$"):
        train(run)
