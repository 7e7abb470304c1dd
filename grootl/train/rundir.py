"""The run directory: who owns it (``run.json``), atomic checkpoints pruned to the last K, metrics.

Layout of ``output_dir``::

    run.json              the resolved recipe; marks the folder as this run's
    metrics.jsonl         one JSON line per logged step (train loss, lr, tokens/s, eval loss)
    logs/                 Accelerate tracker output (TensorBoard)
    base/                 the random-init base weights (model.init: random with LoRA; the adapter's base)
    checkpoints/step-N/   Accelerate state (model, optimizer, scheduler, RNG) + trainer_state.json
    final/                merged model + tokenizer (+ final/adapter/ for the LoRA arms)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
TMP_PREFIX = ".tmp-"
# Recipe keys a resumed run may change: they affect logging and saving, not the trained weights.
RESUMABLE_CHANGES = ("output_dir", "log.", "checkpoint.", "eval.", "train.num_workers", "train.cpu_threads", "data.num_proc")


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


def check_output_dir(out: Path, recipe: dict, resume: bool, overwrite: bool) -> str:
    """What to do with ``out`` (read-only, so every process can ask): "new", "resume" or "overwrite".
    Refuses a folder that holds a different run (or anything else) unless ``overwrite``; ``resume``
    needs the same recipe apart from :data:`RESUMABLE_CHANGES`."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; pass one")
    run_file = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise RunDirError(f"output_dir {out} is a file, not a folder")
    if not (out.is_dir() and any(out.iterdir())):
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


def claim_output_dir(out: Path, recipe: dict, action: str) -> None:
    """Carry out :func:`check_output_dir`'s answer (main process only)."""
    if action == "resume":
        for stale in (out / CHECKPOINTS).glob(TMP_PREFIX + "*"):  # a save cut short by a kill
            shutil.rmtree(stale, ignore_errors=True)
        return
    if action == "overwrite":
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps({"recipe": recipe, "started": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints (with a trainer state), oldest first."""
    folder = out / CHECKPOINTS
    found = [p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


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
        shutil.rmtree(old, ignore_errors=True)
    return final


def append_metrics(out: Path, record: dict) -> None:
    with open(out / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(out: Path) -> list[dict]:
    path = out / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def truncate_metrics(out: Path, step: int) -> None:
    """Drop metric lines logged after ``step`` (a resumed run logs them again)."""
    kept = [record for record in read_metrics(out) if record["step"] <= step]
    (out / METRICS_FILE).write_text("".join(json.dumps(record) + "\n" for record in kept))
