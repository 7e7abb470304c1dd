"""lm-eval's stock ``hf`` model on a GrootL directory: it passes no context lengths, so it scores the model
with an empty prompt (the tree is the chain): causal, and the same whatever the batch size.
``grootl eval`` (the ``grootl`` lm-eval model) is the route that gives the tree each request's context."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import AutoTokenizer

from conftest import ASSETS
from grootl.model import GrootLConfig, load_model, tiny_model

REQUESTS = [("Question: what colour is the sky?\nAnswer:", " blue"), ("The cat sat on the", " mat today"),
            ("One, two,", " three"), ("Name a fruit:", " a ripe banana")]


def loglikelihoods(model_dir, batch_size: int) -> list[float]:
    lm = HFLM(pretrained=str(model_dir), batch_size=batch_size, device="cpu", dtype="float64")
    requests = [Instance("loglikelihood", {}, pair, idx) for idx, pair in enumerate(REQUESTS)]
    return [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("grootl-model")
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    tiny_model(grootl=GrootLConfig(modulation=0.5), vocab_size=len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_stock_hf_model_scores_with_an_empty_prompt_at_any_batch_size(model_dir):
    one, four = loglikelihoods(model_dir, 1), loglikelihoods(model_dir, 4)
    torch.testing.assert_close(torch.tensor(four), torch.tensor(one), rtol=1e-9, atol=1e-9)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, dtype=torch.float64).eval()
    for (context, continuation), got in zip(REQUESTS, one):
        ctx, cont = tokenizer(context)["input_ids"], tokenizer(continuation)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = model(ids, context_lens=[0]).logits.log_softmax(-1)[0, len(ctx) - 1 : -1]
            told = model(ids, context_lens=[len(ctx)]).logits.log_softmax(-1)[0, len(ctx) - 1 : -1]
        expected = logp.gather(1, torch.tensor(cont)[:, None]).sum()
        assert got == pytest.approx(float(expected), abs=1e-9)
        assert abs(float(told.gather(1, torch.tensor(cont)[:, None]).sum()) - got) > 1e-6  # not the prompt's tree
