"""The native kernels are torch custom ops (``torch.ops.grootl.*``) with fake implementations: a function that
builds a tree and scans it compiles with ``fullgraph=True`` and exports with ``torch.export``, and gives the
eager numbers, gradients included."""

from __future__ import annotations

import pytest
import torch

from grootl.tree import build_tree, chain_scan, native, tree_scan
from scan_inputs import random_inputs


@pytest.fixture(autouse=True)
def cpu_kernels():
    assert native.available("cpu"), "the C++ kernels did not build"


def on(device, *xs):
    return [x.to(device) for x in xs]


def tree_branch(u, delta, A, B, C, context_lens):
    tree = build_tree(u, delta, B, context_lens)
    return tree_scan(u, delta, A, B, C, tree)


def chain_branch(u, delta, A, B, C):
    return chain_scan(u, delta, A, B, C)


def inputs(length=40):
    u, delta, A, B, C = random_inputs(2, 5, 4, length, torch.float32, seed=1)
    return u, delta, A, B, C, torch.tensor([length, length // 2])


def grads(fn, *args):
    xs = [x.clone().requires_grad_() if x.is_floating_point() else x for x in args]
    y = fn(*xs)
    y.square().sum().backward()
    return [y.detach(), *(x.grad for x in xs if x.is_floating_point())]


@pytest.mark.parametrize("fn", [tree_branch, chain_branch], ids=["tree", "chain"])
def test_compile_fullgraph_matches_eager_with_gradients(fn):
    torch._dynamo.reset()
    args = inputs() if fn is tree_branch else inputs()[:5]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for got, want in zip(grads(compiled, *args), grads(fn, *args)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    longer = inputs(57) if fn is tree_branch else inputs(57)[:5]  # another length: recompiles or stays dynamic
    torch.testing.assert_close(compiled(*longer), fn(*longer), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compile_fullgraph_on_cuda():
    torch._dynamo.reset()
    args = on("cuda", *inputs(300))
    compiled = torch.compile(tree_branch, fullgraph=True)  # inductor: the graph around the custom ops compiles
    for got, want in zip(grads(compiled, *args), grads(tree_branch, *args)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class TreeBranch(torch.nn.Module):
    def forward(self, u, delta, A, B, C, context_lens):
        return tree_branch(u, delta, A, B, C, context_lens)


def test_export_matches_eager():
    args = inputs()
    program = torch.export.export(TreeBranch(), args)
    targets = {str(node.target) for node in program.graph.nodes}
    assert {"grootl.build_tree.default", "grootl.tree_scan.default"} <= targets, targets
    torch.testing.assert_close(program.module()(*args), tree_branch(*args), rtol=1e-6, atol=1e-6)
    other = inputs()[:5] + (torch.tensor([3, 40]),)  # other prompt lengths, same shapes
    torch.testing.assert_close(program.module()(*other), tree_branch(*other), rtol=1e-6, atol=1e-6)
