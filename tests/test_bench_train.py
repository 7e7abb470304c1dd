"""scripts/bench_train.py's summary of repeated rounds: medians, and ratios to LoRA taken within each round."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "scripts" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def arm(name, tokens_per_s, cpu_ms, peak_mb):
    return {"family": "mamba2", "arm": name, "length": 256, "batch": 2, "tokens_per_s": tokens_per_s,
            "ms_per_step": 512_000 / tokens_per_s, "cpu_ms_per_step": cpu_ms, "peak_mb": peak_mb}


def test_ratios_are_taken_within_rounds():
    # round 2 ran under load: both arms slowed down 4x, their ratio did not change
    rounds = [{"lora": arm("lora", 100.0, 10.0, 50.0), "grootl": arm("grootl", 90.0, 11.0, 55.0)},
              {"grootl": arm("grootl", 22.5, 44.0, 55.0), "lora": arm("lora", 25.0, 40.0, 50.0)},
              {"lora": arm("lora", 100.0, 10.0, 50.0), "grootl": arm("grootl", 80.0, 12.5, 60.0)}]
    lora, grootl = bench_train().summarize(rounds, ["lora", "grootl"])
    assert (lora["arm"], grootl["arm"], grootl["rounds"]) == ("lora", "grootl", 3)
    assert grootl["tokens_per_s_vs_lora"] == 0.9  # median of 0.9, 0.9, 0.8
    assert grootl["tokens_per_s_vs_lora_per_round"] == [0.9, 0.9, 0.8]
    assert grootl["tokens_per_s"] == 80.0 and lora["tokens_per_s"] == 100.0  # medians of each arm's own figures
    assert abs(grootl["tokens_per_cpu_s_vs_lora"] - 10 / 11) < 1e-12
    assert grootl["peak_vs_lora"] == 1.1 and lora["tokens_per_s_vs_lora"] == 1.0


def test_without_a_lora_arm_there_are_no_ratios():
    (full,) = bench_train().summarize([{"full": arm("full", 50.0, 20.0, 80.0)}], ["full"])
    assert full["tokens_per_s_vs_lora"] is None and full["peak_vs_lora"] is None
    assert "tokens_per_s_vs_lora_per_round" not in full
