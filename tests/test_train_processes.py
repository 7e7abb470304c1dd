"""grootl train with several processes: the CPU route through Accelerate, a resume with another process
count (exact with the same effective batch, else refused), the run folder lock, the launch traps."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from grootl.train import main, train
from grootl.train.rundir import RunDirError, check_resume_layout, read_metrics

from conftest import REPO
from test_train import DEMO, FAST, checkpoint_model, logits, recipe


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_cpu_processes_then_resume_with_one_keeping_the_effective_batch(tmp_path, capsys):
    """The documented CPU route (ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu): one metrics writer,
    summed tokens; its checkpoint resumed by one process with twice the accumulation goes on exactly."""
    out = tmp_path / "ddp"
    args = [str(DEMO), f"output_dir={out}", *FAST, "train.max_steps=4", "checkpoint.every=2", "checkpoint.keep=5",
            "data.eval_size=10"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), "-m", "grootl.train"]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    result = subprocess.run([*launch, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 x 1 accumulation x 2 processes" in result.stdout
    two = read_metrics(out)
    assert [m["step"] for m in two] == [1, 2, 3, 4, 4] and "eval_loss" in two[-1]  # every line once
    assert two[0]["tokens"] > 0 and two[1]["tokens"] > two[0]["tokens"]
    reference = tmp_path / "step-4-two-processes"
    shutil.move(out / "checkpoints/step-4", reference)
    shutil.rmtree(out / "final")

    # One process with the same accumulation would halve the effective batch: refused in one line.
    assert main([*args, "--resume"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "effective batch of 8 (4 per batch x 1 accumulation x 2 processes)" in error
    assert "gives 4" in error and "pass train.grad_accum=2 to keep it, or launch 2 processes" in error

    resumed = recipe(tmp_path, "train.max_steps=4", "checkpoint.every=2", "checkpoint.keep=5", "data.eval_size=10",
                     "train.grad_accum=2", name="ddp")
    train(resumed, resume=True)
    one = read_metrics(out)
    assert [m["step"] for m in one] == [1, 2, 3, 4, 4]
    for before, after in zip(two, one):
        for key in ("loss", "eval_loss", "tokens"):
            if key in before:
                assert abs(before[key] - after[key]) < 1e-5 * max(1, abs(before[key])), (key, before, after)
    torch.testing.assert_close(logits(checkpoint_model(resumed, out / "checkpoints/step-4")),
                               logits(checkpoint_model(resumed, reference)), atol=1e-5, rtol=1e-5)


def test_resume_layout_rules(tmp_path):
    state = {"batch_size": 4, "grad_accum": 2, "num_processes": 2}
    check_resume_layout(tmp_path, state, batch_size=4, grad_accum=4, num_processes=1, sharded=False)
    check_resume_layout(tmp_path, state, batch_size=4, grad_accum=1, num_processes=4, sharded=False)
    with pytest.raises(RunDirError, match=r"gives 12 \(4 x 1 x 3 processes\); launch 2 processes$"):
        check_resume_layout(tmp_path, state, batch_size=4, grad_accum=1, num_processes=3, sharded=False)
    with pytest.raises(RunDirError, match=r"sharded \(FSDP / DeepSpeed\) state was written by 2 processes, this launch has 1"):
        check_resume_layout(tmp_path, state, batch_size=4, grad_accum=4, num_processes=1, sharded=True)
    with pytest.raises(RunDirError, match="written by an older grootl"):
        check_resume_layout(tmp_path, {"step": 2}, batch_size=4, grad_accum=2, num_processes=2, sharded=False)


def test_a_second_training_into_a_locked_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from grootl.train.rundir import RunLock; lock = RunLock(Path(sys.argv[1])); lock.acquire(); "
                               "print('locked', flush=True); time.sleep(120)", str(out)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = [str(DEMO), f"output_dir={out}", *FAST, "train.max_steps=1"]
        for flags in ([], ["--resume"], ["--overwrite"]):
            assert main([*args, *flags]) == 1
            error = capsys.readouterr().err
            assert f"output_dir {out} is in use by another training (pid {holder.pid} on " in error
            assert error.count("\n") == 1
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing touched
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    assert main([str(DEMO), f"output_dir={out}", *FAST, "train.max_steps=1"]) == 0


def test_processes_that_each_train_alone_are_refused(tmp_path, capsys, monkeypatch):
    """`accelerate launch --multi_gpu --num_processes 2` without GPUs: WORLD_SIZE=2, but Accelerate
    gives each process a world of one (what each of them sees, reproduced here in one process)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([str(DEMO), f"output_dir={tmp_path / 'run'}", *FAST, "train.max_steps=1"]) == 1
    error = capsys.readouterr().err
    assert "the launcher started 2 processes but each would train alone" in error and error.count("\n") == 1
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N" in error
    assert not (tmp_path / "run").exists()

    # `accelerate launch --cpu --num_processes 2` starts one process (MASTER_ADDR set, no world): said, not refused.
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert main([str(DEMO), f"output_dir={tmp_path / 'run'}", *FAST, "train.max_steps=1"]) == 0
    assert "one process: `accelerate launch --cpu` starts one whatever --num_processes says" in capsys.readouterr().out
