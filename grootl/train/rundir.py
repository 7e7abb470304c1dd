"""The run directory: who owns it (``run.json``), atomic checkpoints pruned to the last K, metrics.

Layout of ``output_dir``::

    run.json              the resolved recipe; marks the folder as this run's
    .lock                 held by the training that owns the folder (pid inside); see :class:`RunLock`
    metrics.jsonl         one JSON line per logged step (train loss, lr, tokens/s, eval loss)
    logs/                 Accelerate tracker output (TensorBoard)
    base/                 the random-init base weights (model.init: random with LoRA; the adapter's base)
    checkpoints/step-N/   Accelerate state (model, optimizer, scheduler, RNG) + trainer_state.json
    final/                merged model + tokenizer (+ final/adapter/ for the LoRA arms)

Every folder is written under a ``.tmp-`` name and renamed into place, and deleted by renaming it to a
``.tmp-`` name first, so a kill at any moment leaves complete folders and ``.tmp-`` leftovers that the
next start removes. ``--overwrite`` renames the whole run folder aside (``.<name>.overwritten``) first.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
TMP_PREFIX = ".tmp-"
# Recipe keys a resumed run may change: they affect logging and saving, not the trained weights
# (train.grad_accum only where the effective batch stays the same: see check_resume_layout).
RESUMABLE_CHANGES = ("output_dir", "log.", "checkpoint.", "eval.", "train.num_workers", "train.cpu_threads", "data.num_proc",
                     "train.grad_accum")


class RunDirError(RuntimeError):
    """The output directory cannot be used as asked (it holds another run, or nothing to resume)."""


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "config":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def recipe_differences(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two recipe dicts, ignoring :data:`RESUMABLE_CHANGES`."""
    old_flat, new_flat = _flatten(old), _flatten(new)
    return sorted(
        key for key in set(old_flat) | set(new_flat)
        if old_flat.get(key) != new_flat.get(key) and not key.startswith(RESUMABLE_CHANGES)
    )


def _contents(out: Path) -> list[Path]:
    """What the run folder holds besides its lock file (a start killed right after locking leaves only that)."""
    return [p for p in out.iterdir() if p.name != LOCK_FILE]


def check_output_dir(out: Path, recipe: dict, resume: bool, overwrite: bool) -> str:
    """What to do with ``out`` (read-only): "new", "resume" or "overwrite". Refuses a folder that
    holds a different run (or anything else) unless ``overwrite``; ``resume`` needs the same recipe
    apart from :data:`RESUMABLE_CHANGES`."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; pass one")
    run_file = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise RunDirError(f"output_dir {out} is a file, not a folder")
    if not (out.is_dir() and _contents(out)):
        return "new"
    if not run_file.is_file():
        raise RunDirError(f"output_dir {out} is not empty and holds no grootl run ({RUN_FILE}); choose another output_dir")
    if overwrite:
        return "overwrite"
    previous = json.loads(run_file.read_text())
    if not resume:
        raise RunDirError(
            f"output_dir {out} already holds a run (method {previous['recipe'].get('method')!r}, started "
            f"{previous.get('started', '?')}); pass --resume to continue it or --overwrite to replace it"
        )
    changed = recipe_differences(previous["recipe"], recipe)
    if changed:
        raise RunDirError(f"cannot resume the run in {out}: the recipe differs in {changed}; "
                          f"use the same recipe, or --overwrite / another output_dir for a new run")
    return "resume"


class RunLock:
    """The run folder's lock, held by the main process for the whole training, so that a second,
    independent training into the same folder is refused. An ``flock`` on ``.lock`` (which names its
    holder): the kernel drops it when the holder dies, so a killed run leaves no stale lock."""

    def __init__(self, out: Path):
        self.out = out
        self._file = None
        self._created = False

    def acquire(self) -> None:
        """Take the lock, creating the folder; a RunDirError naming the holder if another process has it."""
        self._created = self._created or not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        file = open(self.out / LOCK_FILE, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "a process"
            file.close()
            raise RunDirError(f"output_dir {self.out} is in use by another training ({holder}); wait for it to "
                              f"end or choose another output_dir") from None
        file.truncate(0)
        file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        previous, self._file = self._file, file
        if previous is not None:  # the lock of a folder that --overwrite moved aside
            previous.close()

    def release(self) -> None:
        """Drop the lock; a folder this lock created that holds nothing else (a failed start) is removed."""
        if self._file is None:
            return
        if self._created and not _contents(self.out):
            (self.out / LOCK_FILE).unlink()
            self.out.rmdir()
        self._file.close()
        self._file = None


def take_output_dir(out: Path, recipe: dict, resume: bool, overwrite: bool, lock: RunLock) -> str:
    """Lock ``out`` and return :func:`check_output_dir`'s answer, asked once before locking (so a bad
    folder is named before anything is created) and once more under the lock (main process only)."""
    check_output_dir(out, recipe, resume, overwrite)
    lock.acquire()
    try:
        return check_output_dir(out, recipe, resume, overwrite)
    except RunDirError:
        lock.release()
        raise


def overwritten_dir(out: Path) -> Path:
    """Where ``--overwrite`` moves the old run before deleting it (a hidden sibling of ``out``)."""
    return out.with_name(f".{out.name}.overwritten")


def _delete(path: Path) -> None:
    """Delete a folder by renaming it to a ``.tmp-`` name first: a kill mid-way leaves a leftover that
    :func:`remove_leftovers` finds, never a half-deleted folder under its real name."""
    doomed = path.with_name(f"{TMP_PREFIX}deleting-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def remove_leftovers(out: Path) -> None:
    """Remove what killed writes and deletes left in ``out``: ``.tmp-`` folders, checkpoints never
    published (no trainer state), an old run that ``--overwrite`` had moved aside."""
    shutil.rmtree(overwritten_dir(out), ignore_errors=True)
    checkpoints = out / CHECKPOINTS
    stale = [*out.glob(TMP_PREFIX + "*"), *checkpoints.glob(TMP_PREFIX + "*"),
             *(p for p in checkpoints.glob("step-*") if not (p / STATE_FILE).is_file())]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def claim_output_dir(out: Path, recipe: dict, action: str, lock: RunLock) -> None:
    """Carry out :func:`take_output_dir`'s answer (main process only, holding ``lock``): "overwrite"
    moves the old run aside in one rename, then deletes it; a new run gets its ``run.json``."""
    if action == "overwrite":
        shutil.rmtree(overwritten_dir(out), ignore_errors=True)
        os.replace(out, overwritten_dir(out))
        lock.acquire()  # the lock moved away with the old folder: lock the new one
    if action != "resume":
        write_atomically(out / RUN_FILE, json.dumps({"recipe": recipe, "started": time.strftime("%Y-%m-%d %H:%M:%S")},
                                                    indent=2))
    remove_leftovers(out)


def write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(TMP_PREFIX + path.name)
    staging.write_text(text)
    os.replace(staging, path)


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints (with a trainer state), oldest first."""
    folder = out / CHECKPOINTS
    found = [p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def check_resume_layout(checkpoint: Path, state: dict, batch_size: int, grad_accum: int, num_processes: int,
                        sharded: bool) -> None:
    """Refuse to resume ``checkpoint`` (its trainer ``state``) where training could not continue
    exactly: another effective batch (batch_size x grad_accum x num_processes), or another process
    count for a sharded (FSDP / DeepSpeed) state. Another process count with the same effective batch
    continues exactly: the data position is counted in samples."""
    if "num_processes" not in state:
        raise RunDirError(f"cannot resume from {checkpoint}: it was written by an older grootl (no data layout in "
                          f"{STATE_FILE}); start again with --overwrite")
    was = state["batch_size"] * state["grad_accum"] * state["num_processes"]
    now = batch_size * grad_accum * num_processes
    trained = (f"trained with an effective batch of {was} ({state['batch_size']} per batch x {state['grad_accum']} "
               f"accumulation x {state['num_processes']} processes)")
    if now != was:
        keep = was // (batch_size * num_processes) if was % (batch_size * num_processes) == 0 else None
        fix = f"pass train.grad_accum={keep} to keep it, or launch" if keep else "launch"
        raise RunDirError(f"cannot resume from {checkpoint}: it was {trained}, this launch gives {now} ({batch_size} x "
                          f"{grad_accum} x {num_processes} processes); {fix} {state['num_processes']} processes")
    if sharded and num_processes != state["num_processes"]:
        raise RunDirError(f"cannot resume from {checkpoint}: its sharded (FSDP / DeepSpeed) state was written by "
                          f"{state['num_processes']} processes, this launch has {num_processes}; launch "
                          f"{state['num_processes']} processes")


def staging_dir(out: Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before :func:`publish_checkpoint` renames it into place."""
    return out / CHECKPOINTS / f"{TMP_PREFIX}step-{step}"


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``; an existing ``dst`` is moved aside first and
    deleted only after, so a kill at any moment leaves one complete folder."""
    aside = dst.with_name(f"{TMP_PREFIX}old-{dst.name}")
    shutil.rmtree(aside, ignore_errors=True)
    if dst.exists():
        os.replace(dst, aside)
    os.replace(src, dst)
    shutil.rmtree(aside, ignore_errors=True)


def publish_checkpoint(staging: Path, state: dict, keep: int) -> Path:
    """Write the trainer state into a fully saved ``staging`` folder, rename it into place in one
    atomic step, and delete all but the newest ``keep`` checkpoints."""
    with open(staging / STATE_FILE, "w") as f:
        json.dump(state, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    final = staging.parent / f"step-{state['step']}"
    replace_dir(staging, final)  # final may exist: saving the same step again after resuming from it
    for old in checkpoint_dirs(staging.parent.parent)[:-keep]:
        _delete(old)
    return final


def append_metrics(out: Path, record: dict) -> None:
    with open(out / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def metrics_size(out: Path) -> int:
    """Bytes in ``metrics.jsonl`` now: a checkpoint records it, a resume cuts the file back to it."""
    path = out / METRICS_FILE
    return path.stat().st_size if path.is_file() else 0


def read_metrics(out: Path) -> list[dict]:
    path = out / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def truncate_metrics(out: Path, size: int) -> None:
    """Cut ``metrics.jsonl`` back to ``size`` bytes (what it held when the resumed checkpoint was saved,
    0 without one): the resumed run logs the rest again, the final eval included."""
    path = out / METRICS_FILE
    if path.is_file():
        os.truncate(path, min(size, path.stat().st_size))
