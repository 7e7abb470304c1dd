"""The fine-tuning loop on Accelerate: one code path for the GrootL, LoRA and full arms."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, broadcast_object_list, set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_scheduler
from transformers.utils import logging as hf_logging

from grootl.data import (IGNORE_INDEX, DataError, SFTCollator, load_records, make_dataloader,
                         tokenize_records)
from grootl.paths import is_local_path
from grootl.train import rundir
from grootl.train.modeling import FINAL_DIR, build_base, build_model, export_final, save_base
from grootl.train.recipe import Recipe, RecipeError

SCHEDULER_NAMES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


class _TiedWeightsNotice(logging.Filter):
    """Drops Accelerate's "Removed shared tensor" notice: a checkpoint stores tied embeddings once and
    loading re-ties them (an exact resume is tested), so the "check ... while reloading" it asks for is done."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNotice())


class TrainingError(RuntimeError):
    """Training stopped: a non-finite loss, or an interrupt. The message says where and what is kept."""


class LaunchError(RuntimeError):
    """The processes were not started the way training needs (the message names the launch and a fix)."""


# Where launchers put the number of processes they started (the variables Accelerate reads).
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
CPU_LAUNCH = "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m grootl.train RECIPE"


def check_launch(accelerator: Accelerator, log) -> None:
    """Refuse processes that each train alone although the launcher started several: ``accelerate
    launch --multi_gpu`` on a machine without GPUs starts N processes to which Accelerate gives a world
    of one each (N independent trainings writing one folder). Say so when ``accelerate launch --cpu
    --num_processes N`` started a single process (it ignores N)."""
    launched = max(int(os.environ.get(name) or 1) for name in WORLD_SIZE_VARIABLES)
    if launched > 1 and accelerator.num_processes == 1:
        device = "no GPU is visible" if not torch.cuda.is_available() else "Accelerate did not join them"
        raise LaunchError(f"the launcher started {launched} processes but each would train alone ({device}; "
                          f"`accelerate launch --multi_gpu` without GPUs does this); on CPU run {CPU_LAUNCH}")
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_ADDR" in os.environ \
            and accelerator.num_processes == 1:
        log(f"one process: `accelerate launch --cpu` starts one whatever --num_processes says; for N CPU processes "
            f"run {CPU_LAUNCH}")


def check_sources(recipe: Recipe) -> None:
    """A model or tokenizer path that looks local (see :func:`grootl.paths.is_local_path`) and is not
    there is named in one line before anything loads (no hub look-up)."""
    keys = ("model.name_or_path", "model.tokenizer") if recipe.model.init == "pretrained" else ("model.tokenizer",)
    for key in keys:
        name = getattr(recipe.model, key.split(".")[1])
        if name and is_local_path(name) and not Path(name).expanduser().exists():
            raise RecipeError(f"recipe key {key}: {name} does not exist")


def on_main_process(accelerator: Accelerator, work):
    """``work()`` on the main process only; its result, or its RunDirError raised again, on every
    process (a failure on the main process alone would leave the others waiting for it forever)."""
    outcome = [None, None]
    if accelerator.is_main_process:
        try:
            outcome[0] = work()
        except rundir.RunDirError as error:
            outcome[1] = str(error)
    result, error = broadcast_object_list(outcome)
    if error is not None:
        raise rundir.RunDirError(error)
    return result


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt so a killed run unwinds like Ctrl-C (no half-published
    checkpoint; the previous one stays the newest complete one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def prepare_data(recipe: Recipe, tokenizer, log) -> tuple:
    """Tokenised train rows, eval rows (or None) and the data report."""
    records = load_records(recipe.data.path, recipe.data.split)
    if recipe.data.limit:
        records = records.select(range(min(recipe.data.limit, len(records))))
    rows, report = tokenize_records(records, tokenizer, recipe.data.template, recipe.data.max_length, recipe.data.num_proc)
    log(f"data {recipe.data.path}: {report}")
    eval_rows = None
    if recipe.data.eval_path:
        eval_rows, eval_report = tokenize_records(load_records(recipe.data.eval_path, recipe.data.split), tokenizer,
                                                  recipe.data.template, recipe.data.max_length, recipe.data.num_proc)
        log(f"eval data {recipe.data.eval_path}: {eval_report}")
        if len(eval_rows) == 0:
            raise DataError(f"{recipe.data.eval_path}: no eval records left after filtering ({eval_report})")
    elif recipe.data.eval_size:
        if recipe.data.eval_size >= len(rows):
            raise DataError(f"{recipe.data.path}: data.eval_size {recipe.data.eval_size} leaves no training records "
                            f"({report})")
        split = rows.train_test_split(test_size=recipe.data.eval_size, seed=recipe.seed, shuffle=True)
        rows, eval_rows = split["train"], split["test"]
    if len(rows) == 0:
        raise DataError(f"{recipe.data.path}: no training records left after filtering ({report}); "
                        f"check data.max_length and the records' output fields")
    return rows, eval_rows, report


def eval_batches(eval_rows, num_processes: int, process_index: int, batch_size: int, pad_token_id: int):
    """This process's batches of its contiguous share of ``eval_rows``, then filler batches (row 0 with every
    label ignored: zero weight) up to the largest share's count. Every process runs the same number of
    forward passes: under FSDP each forward all-gathers, so uneven counts would hang."""
    div, mod = divmod(len(eval_rows), num_processes)
    start = process_index * div + min(process_index, mod)
    # A list, not a range: select() rejects an empty range that starts at the end (fewer rows than processes).
    share = eval_rows.select(list(range(start, start + div + (process_index < mod))))
    loader = make_dataloader(share, batch_size, pad_token_id, shuffle=False)
    yield from loader
    for _ in range(math.ceil((div + (mod > 0)) / batch_size) - len(loader)):
        filler = SFTCollator(pad_token_id)([eval_rows[0]])
        filler["labels"].fill_(IGNORE_INDEX)
        yield filler


@torch.no_grad()
def evaluate(accelerator: Accelerator, model, eval_rows, batch_size: int, pad_token_id: int) -> float:
    """Mean loss per response token over ``eval_rows`` (each process scores its own share, see :func:`eval_batches`)."""
    model.eval()
    totals = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for batch in eval_batches(eval_rows, accelerator.num_processes, accelerator.process_index, batch_size, pad_token_id):
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        with accelerator.autocast():
            loss = model(**batch).loss
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        # A filler's loss is NaN (a mean over no tokens): weight it out without multiplying by 0.
        totals += torch.stack([torch.where(tokens > 0, loss.double() * tokens, 0.0), tokens.double()])
    model.train()
    totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1].clamp(min=1))


def _tracker_config(recipe: Recipe) -> dict:
    flat = rundir._flatten(recipe.to_dict())
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in flat.items()}


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> Path:
    """Run ``recipe``; returns ``<output_dir>/final``. See :mod:`grootl.train.rundir` for the files."""
    threads = torch.get_num_threads()
    bars = hf_logging.is_progress_bar_enabled()
    if recipe.train.cpu_threads:
        torch.set_num_threads(recipe.train.cpu_threads)
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar per save: the step bar is the one to watch
    try:
        return _train(recipe, resume, overwrite)
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


def _train(recipe: Recipe, resume: bool, overwrite: bool) -> Path:
    out = Path(recipe.output_dir)
    check_sources(recipe)
    accelerator = Accelerator(
        gradient_accumulation_steps=recipe.train.grad_accum,
        mixed_precision=recipe.train.mixed_precision,
        log_with=list(recipe.log.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )

    def log(message: str) -> None:
        if accelerator.is_main_process:
            tqdm.write(f"[grootl train] {message}")  # above a live progress bar, never into it
            sys.stdout.flush()

    check_launch(accelerator, log)
    lock = rundir.RunLock(out)
    try:
        action = on_main_process(accelerator, lambda: rundir.take_output_dir(out, recipe.to_dict(), resume, overwrite, lock))
        return _run(recipe, accelerator, action, lock, log)
    finally:
        lock.release()  # held by the main process only


def _run(recipe: Recipe, accelerator: Accelerator, action: str, lock: rundir.RunLock, log) -> Path:
    """The training itself, in ``recipe.output_dir`` locked by ``lock`` (main process) and checked as ``action``."""
    out = Path(recipe.output_dir)
    grad_accum = accelerator.gradient_accumulation_steps  # a DeepSpeed config may set it
    layout = {"batch_size": recipe.train.batch_size, "grad_accum": grad_accum, "num_processes": accelerator.num_processes}
    resuming = rundir.checkpoint_dirs(out) if action == "resume" else []
    if resuming:
        checkpoint_state = json.loads((resuming[-1] / rundir.STATE_FILE).read_text())
        rundir.check_resume_layout(resuming[-1], checkpoint_state, **layout,
                                   sharded=accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED))
    set_seed(recipe.seed)

    tokenizer_source = recipe.model.tokenizer or recipe.model.name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except (OSError, ValueError) as error:
        key = "model.tokenizer" if recipe.model.tokenizer else "model.name_or_path"
        raise RecipeError(f"recipe key {key}: cannot load a tokenizer from {tokenizer_source!r} ({error})") from None
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with accelerator.main_process_first():
        rows, eval_rows, report = prepare_data(recipe, tokenizer, log)

    base = build_base(recipe)
    if len(tokenizer) > base.config.vocab_size:
        raise RecipeError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{base.config.vocab_size} (recipe key model.config.vocab_size or model.tokenizer)")

    def claim() -> None:
        # only once tokenizer, data and model loaded: a bad recipe leaves no run behind
        rundir.claim_output_dir(out, recipe.to_dict(), action, lock)
        if recipe.model.init == "random" and recipe.method != "full":
            save_base(base, tokenizer, out)  # the random base that the exported adapter applies to

    on_main_process(accelerator, claim)
    final = out / FINAL_DIR
    if action == "resume" and (final / "config.json").is_file():
        log(f"the run in {out} is finished ({final} exported); nothing to resume (--overwrite trains it again)")
        accelerator.end_training()
        return final
    model = build_model(recipe, out, base)
    if recipe.train.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.24
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    log(f"method {recipe.method}: {n_trainable:,} of {n_total:,} parameters trainable "
        f"(tree scan {'on' if recipe.method == 'grootl' else 'off'})")

    optimizer = torch.optim.AdamW(trainable, lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)
    train_loader = make_dataloader(rows, recipe.train.batch_size, pad_token_id, recipe.seed,
                                   group_by_length=recipe.train.group_by_length, num_workers=recipe.train.num_workers)
    sampler = train_loader.sampler
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    steps_per_epoch = math.ceil(len(train_loader) / grad_accum)
    total_steps = recipe.train.max_steps or recipe.train.epochs * steps_per_epoch
    # Stepped once per optimizer step by hand (Accelerate's wrapper steps it num_processes times).
    scheduler = get_scheduler(SCHEDULER_NAMES[recipe.train.schedule], optimizer,
                              num_warmup_steps=recipe.train.warmup_steps, num_training_steps=total_steps)
    accelerator.register_for_checkpointing(scheduler)

    # The data position is counted in samples: a global batch is one micro-batch on every process, taken
    # in turn from one sampler order, so another process count with the same effective batch goes on exactly.
    samples_per_batch = recipe.train.batch_size * accelerator.num_processes
    state = {"step": 0, "epoch": 0, "samples_in_epoch": 0, "tokens": 0}
    if resuming:
        accelerator.load_state(str(resuming[-1]))
        state = {key: checkpoint_state[key] for key in state}
        log(f"resumed from {resuming[-1]} (step {state['step']}, epoch {state['epoch']}, sample "
            f"{state['samples_in_epoch']} of the epoch)")
    elif action == "resume":
        log(f"no checkpoint in {out} yet; starting from step 0")
    if accelerator.is_main_process:  # lines logged after the checkpoint are logged again
        rundir.truncate_metrics(out, checkpoint_state["metrics_bytes"] if resuming else 0)
    batch_in_epoch = state["samples_in_epoch"] // samples_per_batch  # this process's micro-batches
    log(f"{total_steps} optimizer steps ({steps_per_epoch} per epoch; {recipe.train.batch_size} x "
        f"{grad_accum} accumulation x {accelerator.num_processes} processes)")
    if recipe.log.trackers:
        accelerator.init_trackers("grootl", config=_tracker_config(recipe))

    last_checkpoint = resuming[-1] if resuming else None
    progress = tqdm(total=total_steps, initial=state["step"], unit="step", dynamic_ncols=True,
                    disable=not (accelerator.is_main_process and recipe.log.progress))
    window = {"loss": torch.zeros((), device=accelerator.device), "micro": 0, "steps": 0, "tokens": 0, "start": time.time()}
    step_loss = torch.zeros((), device=accelerator.device)
    step_tokens = torch.zeros((), device=accelerator.device, dtype=torch.long)
    eval_batch = recipe.eval.batch_size or recipe.train.batch_size

    def save_checkpoint() -> Path:
        staging = rundir.staging_dir(out, state["step"])
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(staging))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                rundir.publish_checkpoint(staging, {**state, **layout, "metrics_bytes": rundir.metrics_size(out)},
                                          recipe.checkpoint.keep)
        except BaseException:
            if accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        accelerator.wait_for_everyone()
        return out / rundir.CHECKPOINTS / f"step-{state['step']}"

    def run_eval() -> float:
        """Eval loss at the current step, recorded in metrics.jsonl and the trackers."""
        eval_loss = evaluate(accelerator, model, eval_rows, eval_batch, pad_token_id)
        if accelerator.is_main_process:
            rundir.append_metrics(out, {"step": state["step"], "eval_loss": eval_loss})
        accelerator.log({"eval_loss": eval_loss}, step=state["step"])
        return eval_loss

    def diverged(what: str) -> str:
        kept = f"checkpoints before it are kept, newest {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        return f"{what} at optimizer step {state['step'] + 1}; stopped before updating the weights ({kept})"

    model.train()
    with sigterm_as_interrupt():
        try:
            while state["step"] < total_steps:
                train_loader.set_epoch(state["epoch"])
                sampler.set_epoch(state["epoch"])
                loader = accelerator.skip_first_batches(train_loader, batch_in_epoch) if batch_in_epoch else train_loader
                if loader is not train_loader:
                    loader.set_epoch(state["epoch"])
                for batch in loader:
                    with accelerator.accumulate(model):
                        loss = model(**batch).loss
                        accelerator.backward(loss)
                        step_loss += loss.detach()
                        step_tokens += batch["attention_mask"].sum()
                        window["micro"] += 1
                        batch_in_epoch += 1
                        grad_norm = None
                        if accelerator.sync_gradients:
                            mean_loss = accelerator.reduce(step_loss / window["micro"], reduction="mean")
                            if not torch.isfinite(mean_loss):
                                raise TrainingError(diverged(f"loss is {mean_loss.item()}"))
                            if recipe.train.max_grad_norm:
                                # all parameters (frozen ones have no grad): Accelerate then uses FSDP's global-norm clip
                                grad_norm = accelerator.clip_grad_norm_(model.parameters(), recipe.train.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    if not accelerator.sync_gradients:
                        continue
                    lr = scheduler.get_last_lr()[0]  # the rate this step used
                    scheduler.step()
                    tokens = int(accelerator.reduce(step_tokens, reduction="sum"))
                    state["step"] += 1
                    state["tokens"] += tokens
                    window["loss"] += mean_loss
                    window["steps"] += 1
                    window["tokens"] += tokens
                    window["micro"] = 0
                    step_loss.zero_()
                    step_tokens.zero_()

                    if state["step"] % recipe.log.every == 0 or state["step"] == total_steps:
                        elapsed = time.time() - window["start"]
                        record = {
                            "step": state["step"], "epoch": state["epoch"],
                            "loss": float(window["loss"] / window["steps"]), "lr": lr,
                            "grad_norm": None if grad_norm is None else float(grad_norm),
                            "tokens": state["tokens"], "tokens_per_s": window["tokens"] / max(elapsed, 1e-9),
                        }
                        progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                             tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)  # drawn by update()
                        if accelerator.is_main_process:
                            rundir.append_metrics(out, record)
                        accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=state["step"])
                        window.update(loss=torch.zeros((), device=accelerator.device), steps=0, tokens=0, start=time.time())
                    progress.update(1)
                    if eval_rows is not None and recipe.eval.every and state["step"] % recipe.eval.every == 0 and state["step"] < total_steps:
                        log(f"step {state['step']}: eval loss {run_eval():.4f}")
                    if batch_in_epoch == len(train_loader):  # the epoch's last step
                        state["epoch"] += 1
                        batch_in_epoch = 0
                    state["samples_in_epoch"] = batch_in_epoch * samples_per_batch
                    if recipe.checkpoint.every and (state["step"] % recipe.checkpoint.every == 0 or state["step"] == total_steps):
                        last_checkpoint = save_checkpoint()
                    if state["step"] >= total_steps:
                        break
        except KeyboardInterrupt as interrupt:
            kept = f"newest complete checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
            raise TrainingError(f"interrupted ({str(interrupt) or 'Ctrl-C'}) at optimizer step {state['step']}; {kept}; "
                                f"continue with --resume") from None
        finally:
            progress.close()

    if eval_rows is not None:
        log(f"final eval loss {run_eval():.4f}")
    full_state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        export_model = build_model(recipe, out)
        export_model.load_state_dict(full_state)
        final = export_final(export_model, tokenizer, out)
        log(f"exported {final} ({len(rows)} training records)")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final
