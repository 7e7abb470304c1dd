"""lm-eval scores the Mamba-2 families through the `grootl` model: λ=0 equals lm-eval's own `hf` model
on the stock checkpoint, and with the tree on a request scores the same alone or in a batch (each row
gets its own context length)."""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lm_eval
import pytest
import torch
import transformers
from lm_eval.tasks import TaskManager

from grootl.evaluation.tasks import render_offline_tasks
from grootl.model import families

from conftest import ASSETS

TASKS = ["piqa", "lambada_openai"]
importlib.import_module("grootl.evaluation.lm")  # registers the grootl lm-eval model


@pytest.fixture(scope="module")
def fixture_tasks(tmp_path_factory) -> TaskManager:
    rendered = render_offline_tasks(ASSETS / "eval", tmp_path_factory.mktemp("tasks"))
    return TaskManager(include_path=str(rendered), include_defaults=False)


def evaluate(task_manager, model: str, batch_size: int, **model_args) -> dict:
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS, batch_size=batch_size,
                                   device="cpu", task_manager=task_manager, log_samples=True, limit=8)


def loglikelihoods(results: dict) -> dict[str, list[float]]:
    return {task: [resp[0][0] for sample in sorted(samples, key=lambda s: s["doc_id"]) for resp in sample["resps"]]
            for task, samples in results["samples"].items()}


@pytest.mark.parametrize("model_type", ["mamba2", "zamba"])  # the other hybrids share Mamba-2's mixer and wrapper
def test_grootl_eval_scores_a_family(model_type, fixture_tasks, tmp_path):
    torch.manual_seed(0)
    stock = tmp_path / "stock"
    families.FAMILIES[model_type].causal_lm.stock_causal_lm(families.tiny_config(model_type)).save_pretrained(stock)
    transformers.AutoTokenizer.from_pretrained(ASSETS / "tokenizer").save_pretrained(stock)
    hf = loglikelihoods(evaluate(fixture_tasks, "hf", 4, pretrained=str(stock)))
    plain = loglikelihoods(evaluate(fixture_tasks, "grootl", 4, pretrained=str(stock), modulation=0))
    for task in TASKS:
        assert plain[task] == pytest.approx(hf[task], abs=1e-4)
    alone = loglikelihoods(evaluate(fixture_tasks, "grootl", 1, pretrained=str(stock), modulation=0.5))
    batched = loglikelihoods(evaluate(fixture_tasks, "grootl", 8, pretrained=str(stock), modulation=0.5))
    for task in TASKS:
        assert batched[task] == pytest.approx(alone[task], abs=1e-4)
        assert alone[task] != pytest.approx(plain[task], abs=1e-4), "the tree changes the scores"
