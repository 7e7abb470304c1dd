"""``grootl compare``: side-by-side markdown table and bar chart of saved lm-eval results.

One row per results file (e.g. base, +LoRA, +GrootL), one column per task with its headline metric
± stderr (acc in %, LAMBADA perplexity), and the average acc over the acc tasks as in the paper.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from grootl.cli import help_text
from grootl.evaluation.tasks import PAPER_SUITE

TASK_LABELS = {
    "piqa": "PIQA",
    "arc_easy": "ARC-E",
    "sst2": "SST-2",
    "winogrande": "WinoGrande",
    "lambada_openai": "LAMBADA",
    "race": "RACE",
    "openbookqa": "OBQA",
}
PERPLEXITY_TASKS = {"lambada_openai"}
# The published zero-shot results on Mamba-130M (arXiv 2406.02395): acc in %, LAMBADA perplexity.
PAPER_ROWS = {
    "paper: Mamba-130M": (64.5, 48.0, 65.6, 51.8, 16.1, 27.4, 16.8),
    "paper: +LoRA": (64.7, 48.3, 65.1, 52.2, 17.7, 28.6, 17.8),
    "paper: +GrootL": (65.0, 49.8, 69.5, 51.1, 15.9, 28.9, 19.2),
}
# ... and their published average acc over the six acc tasks (LAMBADA perplexity aside).
PAPER_AVERAGES = {"paper: Mamba-130M": 45.7, "paper: +LoRA": 46.1, "paper: +GrootL": 47.2}
PAPER_ACC_TASKS = [task for task in PAPER_SUITE if task not in PERPLEXITY_TASKS]


class CompareError(Exception):
    """A results file that cannot be compared, reported as one line."""


@dataclass(frozen=True)
class Score:
    metric: str
    value: float
    stderr: float | None

    @property
    def is_acc(self) -> bool:
        return self.metric != "perplexity"

    def scaled(self) -> tuple[float, float | None]:
        """acc in percent (as the paper reports it), perplexity as is."""
        factor = 100.0 if self.is_acc else 1.0
        return self.value * factor, None if self.stderr is None else self.stderr * factor


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def headline_score(task: str, metrics: dict) -> Score | None:
    """The metric a task is reported by: perplexity for LAMBADA, else acc, else its first metric."""
    values = {key.split(",")[0]: value for key, value in metrics.items() if "," in key}
    preferred = ["perplexity"] if task in PERPLEXITY_TASKS else []
    candidates = preferred + ["acc"] + [m for m in values if not m.endswith("_stderr")]
    for metric in candidates:
        value = _number(values.get(metric))
        if value is not None:
            return Score(metric, value, _number(values.get(f"{metric}_stderr")))
    return None


def load_scores(path: Path) -> dict[str, Score]:
    """Task → headline score of an lm-eval results JSON (as written by ``grootl eval`` / ``lm_eval``)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CompareError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CompareError(f"{path}: not a JSON file ({error})") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict) or not results or not all(isinstance(m, dict) for m in results.values()):
        raise CompareError(f"{path}: not an lm-eval results file (expected a 'results' mapping of task -> metrics)")
    scores = {task: score for task, metrics in results.items() if (score := headline_score(task, metrics))}
    if not scores:
        raise CompareError(f"{path}: its 'results' hold no numeric 'metric,filter' entries, as lm-eval writes them")
    return scores


def paper_scores() -> dict[str, dict[str, Score]]:
    """The paper's rows as scores (acc as a fraction, as lm-eval stores it; no stderr)."""
    return {
        label: {
            task: Score("perplexity", value, None) if task in PERPLEXITY_TASKS else Score("acc", value / 100, None)
            for task, value in zip(PAPER_SUITE, values, strict=True)
        }
        for label, values in PAPER_ROWS.items()
    }


def _label(path: Path) -> str:
    name = path.name
    for suffix in (".json", ".results"):
        name = name.removesuffix(suffix)
    return name


def _ordered_tasks(runs: dict[str, dict[str, Score]]) -> list[str]:
    seen = {task for scores in runs.values() for task in scores}
    return [t for t in PAPER_SUITE if t in seen] + sorted(seen - set(PAPER_SUITE))


def _average_tasks(runs: dict[str, dict[str, Score]], tasks: list[str]) -> list[str]:
    """Acc tasks every run has: the average is only comparable over the same tasks."""
    return [t for t in tasks if all(t in s and s[t].is_acc for s in runs.values())]


def _metric_header(task: str, runs: dict[str, dict[str, Score]]) -> str:
    metric = next(s[task].metric for s in runs.values() if task in s)
    name = "ppl↓" if metric == "perplexity" else metric
    return f"{TASK_LABELS.get(task, task)} {name}"


def _cell(score: Score | None) -> str:
    if score is None:
        return "—"
    value, stderr = score.scaled()
    return f"{value:.1f}" if stderr is None else f"{value:.1f} ± {stderr:.1f}"


def average_acc(scores: dict[str, Score], tasks: list[str]) -> float | None:
    return sum(scores[t].scaled()[0] for t in tasks) / len(tasks) if tasks else None


@dataclass(frozen=True)
class Averages:
    """Each row's average acc over ``tasks`` (the acc tasks all rows share); ``partial`` when those are
    not all the table's acc tasks. A paper row's average is the published one where ``tasks`` are the
    paper's six, else recomputed like every other row's (and the published one is shown apart)."""

    values: dict[str, float | None]
    tasks: list[str]
    partial: bool

    @property
    def published_apart(self) -> bool:
        return any(label in PAPER_AVERAGES for label in self.values) and self.tasks != PAPER_ACC_TASKS


def row_averages(runs: dict[str, dict[str, Score]]) -> Averages:
    tasks = _ordered_tasks(runs)
    averaged = _average_tasks(runs, tasks)
    values = {label: PAPER_AVERAGES[label] if label in PAPER_AVERAGES and averaged == PAPER_ACC_TASKS
              else average_acc(scores, averaged) for label, scores in runs.items()}
    acc_tasks = [t for t in tasks if all(s[t].is_acc for s in runs.values() if t in s)]
    return Averages(values, averaged, partial=averaged != acc_tasks)


def markdown_table(runs: dict[str, dict[str, Score]]) -> str:
    """Runs as rows, tasks as columns (metric ± stderr), then the average acc (marked * where it is over
    fewer tasks than the table has; the paper's published averages then in a column of their own)."""
    tasks = _ordered_tasks(runs)
    averages = row_averages(runs)
    header = ["run", *(_metric_header(t, runs) for t in tasks), "avg acc*" if averages.partial else "avg acc"]
    if averages.published_apart:
        header.append("published avg acc")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, scores in runs.items():
        average = averages.values[label]
        cells = [label, *(_cell(scores.get(t)) for t in tasks), "—" if average is None else f"{average:.1f}"]
        if averages.published_apart:
            cells.append(f"{PAPER_AVERAGES[label]:.1f}" if label in PAPER_AVERAGES else "—")
        lines.append("| " + " | ".join(cells) + " |")
    if averages.partial or averages.published_apart:
        lines.append("")
        note = f"avg acc over the acc tasks all runs share: {', '.join(averages.tasks) or 'none'}"
        if averages.published_apart:
            note += f" (recomputed for the paper's rows; published: over {', '.join(PAPER_ACC_TASKS)})"
        lines.append(("* " if averages.partial else "") + note)
    return "\n".join(lines) + "\n"


def bar_chart(runs: dict[str, dict[str, Score]], path: Path) -> None:
    """Grouped bars (stderr as error bars): acc tasks and their average, and perplexity on its own axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _ordered_tasks(runs)
    averages = row_averages(runs)
    average_name = f"avg* ({len(averages.tasks)} shared)" if averages.partial else "avg"
    panels = [
        ("accuracy (%)", [t for t in tasks if any(t in s and s[t].is_acc for s in runs.values())], True),
        ("perplexity ↓", [t for t in tasks if any(t in s and not s[t].is_acc for s in runs.values())], False),
    ]
    panels = [p for p in panels if p[1]]
    widths = [len(p[1]) + (1 if p[2] else 0) for p in panels]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.5 + 1.2 * sum(widths), 4), width_ratios=widths,
                                squeeze=False, layout="constrained")
    bar = 0.8 / len(runs)
    for axis, (title, panel_tasks, with_average) in zip(axes[0], panels):
        names = [TASK_LABELS.get(t, t) for t in panel_tasks] + ([average_name] if with_average else [])
        for i, (label, scores) in enumerate(runs.items()):
            values, errors = [], []
            for task in panel_tasks:
                value, stderr = scores[task].scaled() if task in scores else (math.nan, None)
                values.append(value)
                errors.append(stderr or 0.0)
            if with_average:
                average = averages.values[label]
                values.append(math.nan if average is None else average)
                errors.append(0.0)
            positions = [x + (i - (len(runs) - 1) / 2) * bar for x in range(len(names))]
            axis.bar(positions, values, bar, yerr=errors if any(errors) else None, capsize=2, label=label)
        axis.set_xticks(range(len(names)), names)
        axis.set_title(title)
        if not with_average:
            axis.set_yscale("log")  # perplexities of a weak and a strong model differ by orders of magnitude
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper")  # beside the bars, not on them
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    figure.savefig(partial, dpi=120)
    plt.close(figure)
    partial.replace(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grootl compare", description=help_text(__doc__))
    parser.add_argument("results", nargs="+", type=Path, help="lm-eval results JSON files, one per run")
    parser.add_argument("--labels", help="comma-separated run names (default: the file names)")
    parser.add_argument("--output", type=Path, help="also write the markdown table here")
    parser.add_argument("--chart", type=Path, default=Path("comparison.png"), help="bar chart PNG path")
    parser.add_argument("--paper", action="store_true", help="add the paper's Mamba-130M rows for reference")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output or --chart file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for option, path in (("--output", args.output), ("--chart", args.chart)):
            if path is not None and path.exists() and not args.overwrite:
                raise CompareError(f"{path} already exists: pass --overwrite to replace it, or another {option}")
        labels = args.labels.split(",") if args.labels else [_label(p) for p in args.results]
        if len(labels) != len(args.results):
            raise CompareError(f"--labels names {len(labels)} runs for {len(args.results)} results files")
        if len(set(labels)) != len(labels):
            raise CompareError(f"run labels repeat ({', '.join(labels)}); name them with --labels")
        runs = {label: load_scores(path) for label, path in zip(labels, args.results)}
        if args.paper:
            if taken := sorted(set(runs) & set(PAPER_ROWS)):
                raise CompareError(f"run label(s) {taken} are the paper's rows' names; name them with --labels")
            runs |= paper_scores()
    except CompareError as error:
        print(f"grootl compare: error: {error}", file=sys.stderr)
        return 2
    table = markdown_table(runs)
    print(table, end="")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        partial = args.output.with_name(f".{args.output.name}.partial")
        partial.write_text(table)
        partial.replace(args.output)
    bar_chart(runs, args.chart)
    print(f"chart written to {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
