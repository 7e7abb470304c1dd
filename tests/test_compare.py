"""`grootl compare`: markdown table and bar chart from saved lm-eval results."""

from __future__ import annotations

import json

import matplotlib.image
import pytest

from grootl.evaluation import compare

# The paper's table (acc in %, LAMBADA perplexity) as lm-eval would store it (acc as a fraction).
PAPER = {
    "base": [64.5, 48.0, 65.6, 51.8, 16.1, 27.4, 16.8],
    "lora": [64.7, 48.3, 65.1, 52.2, 17.7, 28.6, 17.8],
    "grootl": [65.0, 49.8, 69.5, 51.1, 15.9, 28.9, 19.2],
}
PAPER_AVERAGES = {"base": "45.7", "lora": "46.1", "grootl": "47.2"}


def lm_eval_results(scores: dict[str, float], stderr: float | str = 0.01) -> dict:
    """A results dict shaped like lm-eval's (metric,filter keys; acc as a fraction)."""
    results = {}
    for task, value in scores.items():
        if task == "lambada_openai":
            results[task] = {"alias": task, "perplexity,none": value, "perplexity_stderr,none": 0.5,
                             "acc,none": 0.4, "acc_stderr,none": 0.01}
        else:
            results[task] = {"alias": task, "acc,none": value / 100, "acc_stderr,none": stderr,
                             "acc_norm,none": 0.25, "acc_norm_stderr,none": 0.01}
    return {"results": results, "versions": {t: 1.0 for t in scores}, "n-shot": {t: 0 for t in scores}}


def write_paper_runs(tmp_path) -> list[str]:
    paths = []
    for name, values in PAPER.items():
        path = tmp_path / f"{name}.results.json"
        path.write_text(json.dumps(lm_eval_results(dict(zip(compare.PAPER_SUITE, values)))))
        paths.append(str(path))
    return paths


def test_table_reproduces_the_papers_averages_and_chart_is_written(tmp_path, capsys):
    chart, table_file = tmp_path / "chart.png", tmp_path / "table.md"
    assert compare.main([*write_paper_runs(tmp_path), "--chart", str(chart), "--output", str(table_file)]) == 0
    table = capsys.readouterr().out
    assert table_file.read_text() in table
    lines = table.splitlines()
    assert lines[0] == ("| run | PIQA acc | ARC-E acc | SST-2 acc | WinoGrande acc | LAMBADA ppl↓ | RACE acc "
                        "| OBQA acc | avg acc |")
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[2:5]}
    assert set(rows) == set(PAPER)
    for name, average in PAPER_AVERAGES.items():
        assert rows[name].endswith(f"| {average} |")
    assert "| 69.5 ± 1.0 |" in rows["grootl"] and "| 15.9 ± 0.5 |" in rows["grootl"]
    image = matplotlib.image.imread(chart)
    assert image.shape[0] > 200 and image.shape[1] > 400


def table_rows(out: str) -> dict[str, str]:
    return {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ") and " run " not in line}


def test_paper_rows_keep_their_published_averages_beside_a_partial_run(tmp_path, capsys):
    """A run without all six acc tasks: every row's average is recomputed over the shared tasks and
    marked so, and the paper's rows also show their published averages, as published."""
    run = tmp_path / "mine.json"
    run.write_text(json.dumps(lm_eval_results({"piqa": 60.0, "sst2": 70.0})))
    assert compare.main([str(run), "--paper", "--chart", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("| OBQA acc | avg acc* | published avg acc |")
    rows = table_rows(out)
    assert list(rows) == ["mine", "paper: Mamba-130M", "paper: +LoRA", "paper: +GrootL"]
    assert rows["mine"].endswith("| 65.0 | — |")
    assert rows["paper: +GrootL"] == "| paper: +GrootL | 65.0 | 49.8 | 69.5 | 51.1 | 15.9 | 28.9 | 19.2 | 67.2 | 47.2 |"
    assert rows["paper: Mamba-130M"].endswith(f"| {(64.5 + 65.6) / 2:.1f} | 45.7 |")
    assert ("* avg acc over the acc tasks all runs share: piqa, sst2 (recomputed for the paper's rows; published: "
            "over piqa, arc_easy, sst2, winogrande, race, openbookqa)") in out


def test_paper_rows_beside_a_full_run_show_the_published_averages(tmp_path, capsys):
    run = tmp_path / "mine.json"
    run.write_text(json.dumps(lm_eval_results(dict(zip(compare.PAPER_SUITE, [60, 50, 70, 50, 20, 30, 20])))))
    assert compare.main([str(run), "--paper", "--chart", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("| OBQA acc | avg acc |") and "*" not in out
    rows = table_rows(out)
    assert rows["mine"].endswith(f"| {(60 + 50 + 70 + 50 + 30 + 20) / 6:.1f} |")
    for label, (name, average) in zip(compare.PAPER_ROWS, PAPER_AVERAGES.items()):
        assert rows[label].endswith(f"| {average} |"), name
    # The published averages are what the published rows give (so the column means one thing).
    acc_tasks = [t for t in compare.PAPER_SUITE if t not in compare.PERPLEXITY_TASKS]
    for label, scores in compare.paper_scores().items():
        assert compare.average_acc(scores, acc_tasks) == pytest.approx(compare.PAPER_AVERAGES[label], abs=0.051)


def test_chart_legend_covers_no_bars(tmp_path, monkeypatch):
    import matplotlib.pyplot

    figures = []
    monkeypatch.setattr(matplotlib.pyplot, "close", figures.append)
    runs = {"mine": compare.load_scores(write_paper_runs(tmp_path)[0]), **compare.paper_scores()}
    compare.bar_chart(runs, tmp_path / "c.png")
    (figure,) = figures
    figure.canvas.draw()
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == list(runs)
    box = legend.get_window_extent()
    assert all(not box.overlaps(axis.get_window_extent()) for axis in figure.axes)


def test_existing_outputs_are_kept_unless_told(tmp_path, capsys):
    run = tmp_path / "mine.json"
    run.write_text(json.dumps(lm_eval_results({"piqa": 60.0})))
    for option in ("--output", "--chart"):
        table, chart = tmp_path / "table.md", tmp_path / "chart.png"
        args = [str(run), "--output", str(table), "--chart", str(chart)]
        kept = tmp_path / ("table.md" if option == "--output" else "chart.png")
        kept.write_text("earlier")
        assert compare.main(args) == 2
        assert f"{kept} already exists: pass --overwrite to replace it, or another {option}" in capsys.readouterr().err
        assert kept.read_text() == "earlier" and not (tmp_path / "table.md" if option == "--chart" else chart).exists()
        assert compare.main([*args, "--overwrite"]) == 0
        assert "| mine | 60.0 ± 1.0 | 60.0 |" in table.read_text() and chart.read_bytes().startswith(b"\x89PNG")
        table.unlink(), chart.unlink()


def test_a_run_named_like_a_paper_row_is_an_error(tmp_path, capsys):
    run = tmp_path / "mine.json"
    run.write_text(json.dumps(lm_eval_results({"piqa": 60.0})))
    assert compare.main([str(run), "--labels", "paper: +LoRA", "--paper", "--chart", str(tmp_path / "c.png")]) == 2
    assert "are the paper's rows' names" in capsys.readouterr().err


def test_labels_option_and_missing_tasks(tmp_path, capsys):
    full = tmp_path / "a.json"
    full.write_text(json.dumps(lm_eval_results({"piqa": 60.0, "sst2": 70.0})))
    partial = tmp_path / "b.json"
    partial.write_text(json.dumps(lm_eval_results({"piqa": 50.0}, stderr="N/A")))
    chart = tmp_path / "c.png"
    assert compare.main([str(full), str(partial), "--labels", "LoRA,GrootL", "--chart", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "| LoRA | 60.0 ± 1.0 | 70.0 ± 1.0 | 60.0 |" in out
    assert "| GrootL | 50.0 | — | 50.0 |" in out
    assert "avg acc over the acc tasks all runs share: piqa" in out
    assert chart.stat().st_size > 0


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"accuracy": 0.5, "model": "x"}', "not an lm-eval results file"),
        ("not json at all", "not a JSON file"),
        ('{"results": {"piqa": {"alias": "piqa"}}}', "no numeric 'metric,filter' entries"),
    ],
)
def test_results_file_from_another_tool_is_a_clear_error(tmp_path, capsys, content, message):
    other = tmp_path / "other.json"
    other.write_text(content)
    assert compare.main([str(other), "--chart", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(other) in err
    assert not (tmp_path / "c.png").exists()


def test_label_count_must_match(tmp_path, capsys):
    paths = write_paper_runs(tmp_path)
    assert compare.main([*paths, "--labels", "a,b", "--chart", str(tmp_path / "c.png")]) == 2
    assert "--labels names 2 runs for 3 results files" in capsys.readouterr().err
