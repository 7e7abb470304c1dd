"""``grootl reproduce``: the paper's pipeline end to end in its smoke mode (tiny model, offline data),
each finished stage skipped on a rerun, and the plan of the real run (recipes, base model, suite)."""

from __future__ import annotations

import json
import os

import pytest

from grootl import reproduce
from grootl.evaluation import compare, run
from grootl.evaluation.tasks import PAPER_SUITE
from grootl.train import load_recipe

from conftest import ASSETS, REPO

ARMS = ("base", "lora", "grootl")


def test_smoke_runs_every_stage_then_skips_what_is_done(tmp_path, capsys, monkeypatch):
    out = tmp_path / "paper"
    argv = ["--smoke", "--out", str(out), "--steps", "2", "--limit", "1", "--data-dir", str(ASSETS / "eval")]
    assert reproduce.main(argv) == 0
    for arm in ("lora", "grootl"):
        recipe = json.loads((out / arm / "run.json").read_text())["recipe"]
        assert recipe["method"] == arm and recipe["train"]["max_steps"] == 2
        assert (out / arm / "final" / "config.json").is_file()
    evaluated = {arm: json.loads((out / f"{arm}.results.json").read_text()) for arm in ARMS}
    for arm, results in evaluated.items():
        assert set(results["results"]) == set(PAPER_SUITE)
        assert results["config"]["model_args"].get("grootl_enabled") is (None if arm == "grootl" else False)
    assert evaluated["base"]["config"]["model_args"]["pretrained"] == str(out / "lora" / "base")
    table = (out / "table.md").read_text()
    assert [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:8]] == [
        "Mamba-130M", "+LoRA", "+GrootL", *compare.PAPER_ROWS]
    assert (out / "chart.png").read_bytes().startswith(b"\x89PNG")
    capsys.readouterr()

    # A rerun finds every stage done; a lost result is made again, and results newer than the table are
    # tabled again (the evaluations and trainings are the same code path as the first run's).
    def refuse(argv):
        pytest.fail(f"ran a finished stage: {argv}")

    monkeypatch.setattr("grootl.train.main", refuse)
    monkeypatch.setattr(compare, "main", refuse)
    monkeypatch.setattr(run, "main", refuse)
    assert reproduce.main(argv) == 0
    assert capsys.readouterr().out.count(": done (") == 6
    monkeypatch.undo()
    monkeypatch.setattr("grootl.train.main", refuse)
    monkeypatch.setattr(run, "main", refuse)
    (out / "chart.png").unlink()
    assert reproduce.main(argv) == 0
    assert (out / "chart.png").read_bytes().startswith(b"\x89PNG")
    later = (out / "table.md").stat().st_mtime + 10
    os.utime(out / "lora.results.json", (later, later))  # as if +LoRA had been evaluated again
    assert reproduce.main(argv) == 0
    assert (out / "table.md").stat().st_mtime > later - 10


def plan(*argv: str) -> reproduce.Plan:
    return reproduce.make_plan(reproduce.build_parser().parse_args(list(argv)))


def test_the_real_plan_is_the_papers(tmp_path):
    real = plan("--out", str(tmp_path))
    assert real.recipes == {"lora": REPO / "recipes/mamba-130m/alpaca-lora.yaml",
                            "grootl": REPO / "recipes/mamba-130m/alpaca-grootl.yaml"}
    assert real.base_model == load_recipe(real.recipes["grootl"]).model.name_or_path == "state-spaces/mamba-130m-hf"
    assert real.tasks == list(PAPER_SUITE) and real.train_overrides == {"lora": [], "grootl": []}
    assert "--data-dir" not in real.eval_options and "--limit" not in real.eval_options  # the full hub splits


def test_smoke_data_is_the_shared_splits_when_present(tmp_path, capsys):
    smoke = plan("--smoke", "--out", str(tmp_path))
    data_dir = next(d for d in reproduce.SMOKE_DATA_DIRS if d.is_dir())
    assert smoke.eval_options[smoke.eval_options.index("--data-dir") + 1] == str(data_dir)
    if data_dir == reproduce.SMOKE_DATA_DIRS[0]:  # ../shared has no RACE: said, and left out
        assert "race" not in smoke.tasks and "for race: evaluating" in capsys.readouterr().out


def test_missing_recipes_and_data_are_one_line(tmp_path, capsys):
    assert reproduce.main(["--recipes", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "grootl reproduce uses the recipes of a source checkout" in capsys.readouterr().err
    assert reproduce.main(["--smoke", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert f"--data-dir {tmp_path} holds none of piqa_validation.jsonl" in capsys.readouterr().err
