"""A GrootL model compiles with ``torch.compile(fullgraph=True)`` and exports with ``torch.export``, with the
tree on (a prompt from labels or context_lens) and off (no prompt), with and without the cache, and gives the
eager numbers, gradients included. The fused CUDA kernels (mamba-ssm, causal-conv1d) are not custom ops: tracing
uses grootl's chain scan instead (:func:`grootl.model.mixer.fast_kernels`). The native kernels must be built
(the default): the pure-PyTorch path (``GROOTL_NATIVE=0``) checks trees on the host and has data-dependent
loops, so it neither compiles with ``fullgraph=True`` nor exports; plain ``torch.compile`` works there."""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import pytest
import torch

from grootl.model import tiny_model
from grootl.tree import native

LENGTH = 24


@pytest.fixture(autouse=True)
def cpu_kernels():
    assert native.available("cpu"), "the C++ kernels did not build"
    torch._dynamo.reset()


def model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = tiny_model({"modulation": 0.3}, num_hidden_layers=1)
    ids = torch.randint(0, model.config.vocab_size, (2, LENGTH))
    labels = ids.clone()
    labels[0, :12] = -100  # prompts of 12 and 5 tokens: the tree mixes them
    labels[1, :5] = -100
    return model, ids, labels


def loss_and_grads(model, ids, labels):
    model.zero_grad()
    out = model(ids, labels=labels)
    loss = out.loss if labels is not None else out.logits.square().mean()
    loss.backward()
    return [out.logits.detach(), loss.detach(), *(p.grad.clone() for p in model.parameters())]


@pytest.mark.parametrize("prompt", ["labels", "none"])
def test_compile_fullgraph_training_forward_matches_eager(prompt):
    model, ids, labels = model_and_batch()
    model.train()
    labels = labels if prompt == "labels" else None
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings():  # the no-prompt warning is eager-only: it must not break the graph
        warnings.simplefilter("ignore")
        got = loss_and_grads(compiled, ids, labels)
    with pytest.warns(UserWarning, match="empty prompt") if labels is None else nullcontext():  # eager warns
        want = loss_and_grads(model, ids, labels)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_export_matches_eager():
    model, ids, _ = model_and_batch()
    model.eval()
    context_lens = torch.tensor([LENGTH, 7])
    program = torch.export.export(model, (ids,), kwargs={"context_lens": context_lens, "use_cache": False})
    targets = {str(node.target) for node in program.graph.nodes}
    assert {"grootl.build_tree.default", "grootl.chain_tree_scan.default"} <= targets, targets  # the one-call scan
    for lens in (context_lens, torch.tensor([0, 19])):  # other prompt lengths, same shapes: the same program
        got = program.module()(ids, context_lens=lens, use_cache=False).logits
        torch.testing.assert_close(got, model(ids, context_lens=lens, use_cache=False).logits, rtol=1e-5, atol=1e-6)
    other = model(ids, context_lens=torch.tensor([0, 19]), use_cache=False).logits
    assert not torch.allclose(other, model(ids, context_lens=context_lens, use_cache=False).logits)  # the tree is on


@torch.no_grad()
def test_compile_fullgraph_prefill_and_decode_with_cache():
    model, ids, _ = model_and_batch()
    model.eval()
    context_lens = torch.tensor([LENGTH, 7])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got, want = (m(ids, context_lens=context_lens, use_cache=True) for m in (compiled, model))
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
    token = torch.randint(0, model.config.vocab_size, (2, 1))  # one decoded position from each cache
    torch.testing.assert_close(compiled(token, cache=got.cache, use_cache=True).logits,
                               model(token, cache=want.cache, use_cache=True).logits, rtol=1e-5, atol=1e-6)


def test_compile_on_the_pytorch_path_matches_eager(monkeypatch):
    """Without the native kernels plain ``torch.compile`` (graph breaks allowed) gives the eager numbers."""
    monkeypatch.setenv("GROOTL_NATIVE", "0")
    model, ids, labels = model_and_batch()
    model.eval()
    want = model(ids, labels=labels).logits
    got = torch.compile(model, backend="eager")(ids, labels=labels).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
