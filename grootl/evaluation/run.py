"""``grootl eval``: zero-shot lm-eval tasks on a GrootL model, a stock model or a PEFT adapter.

Online: standard lm-eval tasks from the hub. Offline (``--data-dir DIR``): the task YAMLs that ship in
``grootl/evaluation/offline_tasks/`` read ``DIR/<task>_<split>.jsonl`` under the same task names. Writes
lm-eval's results JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

from grootl.cli import help_text
from grootl.evaluation.tasks import DATA_DIR_TOKEN, PAPER_SUITE, missing_data_files, render_offline_tasks
from grootl.paths import PathError, missing_path_error, resolve_model


class EvalError(Exception):
    """Bad input to ``grootl eval``, reported as one line."""


def modulation_arg(text: str) -> float:
    """argparse type of ``--modulation`` (grootl eval, grootl generate): a number >= 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"λ must be a number >= 0; got {text}")
    return value


def _batch_size(text: str) -> int | str:
    if text == "auto" or text.startswith("auto:") or (text.isdigit() and int(text) > 0):
        return text if text.startswith("auto") else int(text)
    raise argparse.ArgumentTypeError(f"expected a positive int, 'auto' or 'auto:N'; got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grootl eval", description=help_text(__doc__)
    )
    parser.add_argument(
        "model", help="GrootL model dir, grootl train run dir (its final/), stock Mamba checkpoint (dir or hub id), or PEFT adapter dir"
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--tasks", help="comma-separated lm-eval task names, e.g. piqa,arc_easy")
    which.add_argument("--suite", choices=["paper"], help=f"paper: {', '.join(PAPER_SUITE)}")
    parser.add_argument("--peft", help="PEFT adapter dir to apply on MODEL")
    parser.add_argument("--tokenizer", help="tokenizer dir (default: the model's)")
    parser.add_argument("--modulation", type=modulation_arg, help="λ of y_chain + λ·y_tree (default: the model's own, else 0.3)")
    parser.add_argument("--no-tree", action="store_true", help="plain Mamba scan (the LoRA / base arms)")
    parser.add_argument("--limit", type=float, help="examples per task (a fraction if < 1); for quick checks only")
    parser.add_argument("--batch-size", type=_batch_size, default=1, help="int, 'auto' or 'auto:N'")
    parser.add_argument("--device", help="cpu, cuda, cuda:0 ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, ... (default: the checkpoint's)")
    parser.add_argument("--output", type=Path, help="results JSON (default: <model name>.results.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing results JSON")
    parser.add_argument("--data-dir", type=Path, help="offline: folder of <task>_<split>.jsonl files (piqa_validation.jsonl, ...)")
    parser.add_argument("--include-path", type=Path, action="append", default=[], help="extra task YAML folder")
    return parser


def _task_names(args: argparse.Namespace) -> list[str]:
    if args.suite == "paper":
        return list(PAPER_SUITE)
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not names:
        raise EvalError("--tasks lists no task")
    return names


def _check_adapter(adapter: str) -> None:
    path = Path(adapter).expanduser()
    if not path.exists():
        if error := missing_path_error(adapter, "--peft"):
            raise error
    elif not (path / "adapter_config.json").is_file():
        raise EvalError(f"--peft {adapter} holds no adapter_config.json")


def _check_model(model: str) -> None:
    """MODEL (an adapter's base model) is a Mamba checkpoint that loads: said in one line now, not as a
    traceback from inside lm-eval (a hub id with no network behind it, another architecture)."""
    from grootl.evaluation.lm import GrootLLM
    from grootl.model.loading import checkpoint_config

    path = Path(model).expanduser()
    try:
        if (path / "adapter_config.json").is_file():
            checkpoint_config(resolve_model(GrootLLM.adapter_base(path)))
        else:
            checkpoint_config(model)
    except (PathError, ValueError) as error:
        raise EvalError(f"{model}: {error}" if path.exists() else str(error)) from None


def _default_output(model: str) -> Path:
    """``<name>.results.json`` in the working directory, named after the run for ``.../final[/adapter]``."""
    parts = [p for p in Path(model).expanduser().parts if p not in ("final", "adapter", "/")]
    return Path(f"{parts[-1] if parts else 'model'}.results.json")


def _git_commit() -> str | None:
    """``git describe --always`` of the working directory, None outside a repository or without git."""
    try:
        described = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return described.stdout.strip()


def evaluate(args: argparse.Namespace, include_paths: list[Path]) -> dict:
    """Run lm-eval with the ``grootl`` model; returns lm-eval's results dict."""
    import datasets
    import lm_eval
    import lm_eval.evaluator
    import torch
    import transformers
    from lm_eval.tasks import TaskManager

    import grootl.evaluation.lm  # noqa: F401  (registers the "grootl" model)

    tasks = _task_names(args)
    # Offline runs index only the local YAMLs: hub tasks could not load anyway, and indexing lm-eval's
    # thousands of task files takes seconds.
    manager = TaskManager(include_path=[str(p) for p in include_paths] or None, include_defaults=not args.data_dir)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        known = f"offline tasks: {', '.join(manager.all_tasks)}" if args.data_dir else "see `lm_eval ls tasks`"
        raise EvalError(f"unknown task(s): {', '.join(unknown)} ({known})")
    missing = missing_data_files(manager, tasks)
    if missing:
        raise EvalError("missing data file(s) for " + "; ".join(missing))
    model_args = {"pretrained": args.model, "dtype": args.dtype}
    if args.peft:
        model_args["peft"] = args.peft
    if args.tokenizer:
        model_args["tokenizer"] = args.tokenizer
    if args.modulation is not None:
        model_args["modulation"] = args.modulation
    if args.no_tree:
        model_args["grootl_enabled"] = False
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    # The benchmark splits and the model load in seconds: no bars for them (lm-eval's request bars stay).
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    # lm-eval records the working directory's git commit by running git with its stderr open: outside a
    # repository that prints "fatal: not a git repository". Same record, asked quietly.
    with mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", _git_commit):
        results = lm_eval.simple_evaluate(
            model="grootl",
            model_args=model_args,
            tasks=tasks,
            batch_size=args.batch_size,
            device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
            limit=limit,
            task_manager=manager,
        )
    results.pop("samples", None)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.data_dir:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        args.model = resolve_model(args.model)
        output = args.output or _default_output(args.model)
        if output.exists() and not args.overwrite:  # said before hours of evaluation, not after
            raise EvalError(f"{output} already exists: pass --overwrite to replace it, or another --output")
        _check_model(args.model)
        if args.peft:
            _check_adapter(args.peft)
        for path in args.include_path:
            if not path.is_dir():
                raise EvalError(f"--include-path {path} is not a directory")
            if any(DATA_DIR_TOKEN in yaml.read_text() for yaml in path.glob("*.yaml")):
                raise EvalError(f"--include-path {path} holds grootl's offline task YAMLs ({DATA_DIR_TOKEN} "
                                f"placeholders): pass --data-dir DIR instead, they ship with grootl")
        with tempfile.TemporaryDirectory(prefix="grootl-tasks-") as rendered:
            include_paths = list(args.include_path)
            if args.data_dir:
                include_paths.insert(0, render_offline_tasks(args.data_dir, rendered))
            results = evaluate(args, include_paths)
    except (EvalError, PathError, FileNotFoundError) as error:
        print(f"grootl eval: error: {error}", file=sys.stderr)
        return 2
    from lm_eval.utils import handle_non_serializable, make_table

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    partial.write_text(json.dumps(results, indent=2, default=handle_non_serializable))
    partial.replace(output)  # a crash while writing leaves no half-written results under the real name
    print(make_table(results))
    print(f"results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
