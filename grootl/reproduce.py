"""``grootl reproduce``: the paper's Mamba-130M table in one command.

Trains both arms of ``recipes/mamba-130m`` (``alpaca-lora.yaml``, ``alpaca-grootl.yaml``), evaluates the
base model, +LoRA and +GrootL on the paper's zero-shot suite, and writes the comparison table and chart
beside the published rows. Every stage leaves one result (a run's ``final/``, a results JSON, the
table and chart); a stage whose result exists is skipped, so an interrupted reproduction continues
where it stopped (an interrupted training resumes from its last checkpoint).

``--smoke`` runs the same stages on the tiny CPU demo recipe (a few steps, no network) and the offline
benchmark data: ``../shared/data/eval`` beside the checkout when present, else the tiny splits in
``tests/assets/eval``. The recipes come from a source checkout (``--recipes`` points elsewhere).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from grootl.cli import help_text
from grootl.evaluation.tasks import PAPER_SUITE, offline_data_files

CHECKOUT = Path(__file__).resolve().parents[1]
SMOKE_DATA_DIRS = (CHECKOUT.parent / "shared" / "data" / "eval", CHECKOUT / "tests" / "assets" / "eval")
LABELS = {"base": "Mamba-130M", "lora": "+LoRA", "grootl": "+GrootL"}


class ReproduceError(Exception):
    """A stage that cannot start or failed, reported as one line."""


@dataclass(frozen=True)
class Plan:
    """What each stage reads and writes."""

    out: Path
    recipes: dict[str, Path]  # arm -> recipe file
    train_overrides: dict[str, list[str]]  # arm -> recipe overrides
    base_model: str  # the base arm: the pretrained checkpoint (smoke: the tiny run's random base)
    base_tokenizer: str | None
    tasks: list[str]
    eval_options: list[str]

    def run_dir(self, arm: str) -> Path:
        return self.out / arm

    def results(self, arm: str) -> Path:
        return self.out / f"{arm}.results.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grootl reproduce", description=help_text(__doc__))
    parser.add_argument("--smoke", action="store_true", help="the same stages on the tiny CPU demo (minutes, offline)")
    parser.add_argument("--out", type=Path, help="where runs, results, table and chart go "
                                                 "(default: runs/paper, runs/paper-smoke with --smoke)")
    parser.add_argument("--recipes", type=Path, default=CHECKOUT / "recipes", help="the checkout's recipes/ folder")
    parser.add_argument("--data-dir", type=Path, help="offline eval: folder of <task>_<split>.jsonl files "
                                                      "(default: lm-eval's hub datasets; --smoke: the offline splits)")
    parser.add_argument("--limit", type=float, help="examples per task (default: all; --smoke: 4)")
    parser.add_argument("--steps", type=int, default=4, help="--smoke: optimizer steps per arm")
    parser.add_argument("--batch-size", default=None, help="eval batch size (default: auto, --smoke: 4)")
    parser.add_argument("--device", help="eval device (default: cuda when available)")
    return parser


def _available_tasks(data_dir: Path) -> list[str]:
    """The paper's tasks whose offline files are in ``data_dir`` (RACE has no offline copy in ../shared)."""
    files = offline_data_files()
    tasks = [t for t in PAPER_SUITE if all((data_dir / name).is_file() for name in files[t])]
    if not tasks:
        names = ", ".join(name for task in PAPER_SUITE for name in files[task])
        raise ReproduceError(f"--data-dir {data_dir} holds none of {names}")
    if skipped := [t for t in PAPER_SUITE if t not in tasks]:
        print(f"[grootl reproduce] no data in {data_dir} for {', '.join(skipped)}: evaluating {', '.join(tasks)}")
    return tasks


def make_plan(args: argparse.Namespace) -> Plan:
    recipes_dir = args.recipes.expanduser()
    folder = recipes_dir / ("tiny" if args.smoke else "mamba-130m")
    names = {"lora": "cpu-demo.yaml", "grootl": "cpu-demo.yaml"} if args.smoke else \
        {"lora": "alpaca-lora.yaml", "grootl": "alpaca-grootl.yaml"}
    recipes = {arm: folder / name for arm, name in names.items()}
    if missing := [str(p) for p in recipes.values() if not p.is_file()]:
        raise ReproduceError(f"no recipe {missing[0]}: grootl reproduce uses the recipes of a source checkout "
                             f"(git clone the project, or pass --recipes DIR)")
    out = (args.out or Path("runs/paper-smoke" if args.smoke else "runs/paper")).expanduser()
    data_dir = args.data_dir or (next((d for d in SMOKE_DATA_DIRS if d.is_dir()), None) if args.smoke else None)
    if args.smoke and data_dir is None:
        raise ReproduceError(f"no offline eval data in {' or '.join(map(str, SMOKE_DATA_DIRS))}: pass --data-dir DIR")
    tasks = _available_tasks(data_dir.expanduser()) if data_dir else list(PAPER_SUITE)
    limit = args.limit if args.limit is not None else (4 if args.smoke else None)
    eval_options = ["--batch-size", args.batch_size or ("4" if args.smoke else "auto")]
    eval_options += ["--data-dir", str(data_dir)] if data_dir else []
    eval_options += ["--limit", f"{limit:g}"] if limit is not None else []
    eval_options += ["--device", args.device] if args.device else []
    if args.smoke:
        common = [f"train.max_steps={args.steps}", "eval.every=null", f"checkpoint.every={args.steps}"]
        train_overrides = {"lora": [*common, "method=lora"], "grootl": common}  # the demo recipe is the GrootL arm
        base_model, base_tokenizer = str(out / "lora" / "base"), str(out / "lora" / "final")
    else:
        from grootl.train import load_recipe

        train_overrides = {"lora": [], "grootl": []}
        base_model, base_tokenizer = load_recipe(recipes["grootl"]).model.name_or_path, None
    return Plan(out, recipes, train_overrides, base_model, base_tokenizer, tasks, eval_options)


def _run(stage: str, main, argv: list[str]) -> None:
    print(f"[grootl reproduce] {stage}: {' '.join(argv)}", flush=True)
    if main(argv) != 0:
        raise ReproduceError(f"{stage} failed (its error is above); run grootl reproduce again to continue from here")


def _skip(stage: str, result: Path) -> None:
    print(f"[grootl reproduce] {stage}: done ({result} exists)", flush=True)


def train_arms(plan: Plan) -> None:
    from grootl.train import main as train_main

    for arm in ("lora", "grootl"):
        out = plan.run_dir(arm)
        stage = f"train {LABELS[arm]}"
        if (out / "final" / "config.json").is_file():
            _skip(stage, out / "final")
            continue
        argv = [str(plan.recipes[arm]), f"output_dir={out}", *plan.train_overrides[arm]]
        argv += ["--resume"] if (out / "run.json").is_file() else []  # interrupted: continue it
        _run(stage, train_main, argv)


def evaluate_arms(plan: Plan) -> None:
    from grootl.evaluation.run import main as eval_main

    models = {"base": [plan.base_model, "--no-tree"], "lora": [str(plan.run_dir("lora")), "--no-tree"],
              "grootl": [str(plan.run_dir("grootl"))]}
    if plan.base_tokenizer:
        models["base"] += ["--tokenizer", plan.base_tokenizer]
    for arm, model in models.items():
        stage = f"eval {LABELS[arm]}"
        if plan.results(arm).is_file():
            _skip(stage, plan.results(arm))
            continue
        _run(stage, eval_main, [*model, "--tasks", ",".join(plan.tasks), *plan.eval_options,
                                "--output", str(plan.results(arm))])


def compare_arms(plan: Plan) -> None:
    from grootl.evaluation.compare import main as compare_main

    table, chart = plan.out / "table.md", plan.out / "chart.png"
    results = [plan.results(arm) for arm in LABELS]
    newest = max(p.stat().st_mtime for p in results)
    if all(p.is_file() and p.stat().st_mtime >= newest for p in (table, chart)):
        _skip("compare", table)
        print(table.read_text(), end="")
        return
    _run("compare", compare_main, [*map(str, results), "--labels", ",".join(LABELS.values()), "--paper",
                                   "--output", str(table), "--chart", str(chart), "--overwrite"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = make_plan(args)
        plan.out.mkdir(parents=True, exist_ok=True)
        train_arms(plan)
        evaluate_arms(plan)
        compare_arms(plan)
    except ReproduceError as error:
        print(f"grootl reproduce: error: {error}", file=sys.stderr)
        return 2
    print(f"[grootl reproduce] table {plan.out / 'table.md'}, chart {plan.out / 'chart.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
