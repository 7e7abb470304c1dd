"""Linear cost for every tree: the scans follow the heavy-last preorder of ``parent`` (largest child subtree
last), so their stacks stay below log2(L) + 1 entries on the worst trees one can build, and a Tree never
carries a stale plan. Checked on the native CPU kernels and the PyTorch path against ``tree_scan_ref``."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from grootl.tree import Tree, build_tree, native, tree_scan, tree_scan_ref
from grootl.tree.graph import heavy_last_preorder, stack_bound, subtree_sizes
from scan_inputs import random_inputs

F64 = torch.float64


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    monkeypatch.setenv("GROOTL_NATIVE", "1" if request.param == "native" else "0")
    if request.param == "native":
        assert native.available("cpu"), "the C++ kernels did not build"
    return request.param


def comb(length: int) -> list[int]:
    """A spine L-1, L-2, ... whose every node has one leaf hanging off, within the band (spans 1 and 2)."""
    parent = [-1] * length
    spine = list(range(length - 1, -1, -2))
    for hi, lo in zip(spine, spine[1:]):
        parent[lo] = hi
    for s in spine:
        if s - 1 >= 0 and parent[s - 1] == -1 and s - 1 != length - 1:
            parent[s - 1] = s
    return parent


def caterpillar(length: int) -> list[int]:
    """Spine nodes three apart with two leaves each (spans up to 3): the widest band-limited fan."""
    parent = [-1] * length
    for v in range(length - 1):
        hi = v + 3 - ((length - 1 - v) % 3) if (length - 1 - v) % 3 else v + 3
        parent[v] = min(hi, length - 1)
    return parent


def star(length: int) -> list[int]:
    """Every node a child of the root (a user-made tree: spans up to L-1)."""
    return [length - 1] * (length - 1) + [-1]


def binary(length: int) -> list[int]:
    """A complete binary tree on the reversed positions (the deepest balanced stacks)."""
    return [length - 1 - (length - 1 - v - 1) // 2 for v in range(length - 1)] + [-1]


def random_parent(length: int, rng: random.Random) -> list[int]:
    return [rng.randint(v + 1, min(length - 1, v + rng.choice([1, 3, length]))) for v in range(length - 1)] + [-1]


def deepest_preorder(parent: list[int]) -> list[int]:
    """The DFS preorder with the largest child subtree FIRST: the order that made the old stacks O(L)."""
    children = [[] for _ in parent]
    for v, p in enumerate(parent):
        if p >= 0:
            children[p].append(v)
    size = subtree_sizes(torch.tensor([parent]))[0].tolist()
    order, stack = [], [len(parent) - 1]
    while stack:
        v = stack.pop()
        order.append(v)
        stack.extend(sorted(children[v], key=lambda c: (size[c], c)))  # popped largest first
    return order


def adversarial_trees(length: int, seed: int = 0) -> dict[str, list[int]]:
    rng = random.Random(seed)
    return {"comb": comb(length), "caterpillar": caterpillar(length), "star": star(length),
            "binary": binary(length), "random": random_parent(length, rng)}


def stack_depths(parent: list[int], order: list[int]) -> tuple[int, int]:
    """Open entries of the forward (leaves to root) and backward (root to leaves) stacks, walked plainly."""
    pos = {v: i for i, v in enumerate(order)}
    last = {}
    for v, p in enumerate(parent):
        if p >= 0:
            last[p] = max(last.get(p, -1), pos[v])
    depth = h = 0
    for i in range(len(order) - 1, -1, -1):
        v = order[i]
        depth += (parent[v] >= 0 and last[parent[v]] == i) - (v in last)
        h = max(h, depth)
    depth = g = 0
    for i, v in enumerate(order):
        depth += (v in last) - (parent[v] >= 0 and last[parent[v]] == i)
        g = max(g, depth)
    return h, g


@pytest.mark.parametrize("length", [2, 3, 64, 1000])
def test_heavy_last_order_bounds_both_stacks(length):
    for name, parent in adversarial_trees(length).items():
        order = heavy_last_preorder(torch.tensor([parent]))[0].tolist()
        assert sorted(order) == list(range(length)) and order[0] == length - 1, name
        h, g = stack_depths(parent, order)
        assert max(h, g) <= stack_bound(length), (name, h, g)
    # what the bound is for: the largest-first order of the same comb keeps about L/2 sums open
    assert stack_depths(comb(length), deepest_preorder(comb(length)))[0] >= (length - 1) // 2


def test_kernel_plans_are_bounded_whatever_order_the_tree_holds():
    """Plans (native CPU) for user trees given their deepest order: scratch from L alone always suffices."""
    assert native.available("cpu")
    ext = native.load("cpu")
    length = 4096
    trees = adversarial_trees(length, seed=1)
    parent = torch.tensor(list(trees.values()))
    deep = torch.tensor([deepest_preorder(p) for p in trees.values()])
    plan = native._Plan.of(ext, Tree(parent, deep), torch.device("cpu"))
    bound = stack_bound(length)
    assert (plan.sizes[:, :2] <= bound).all(), plan.sizes
    assert (plan.sizes[:, 2] <= -(-length // ext.chunk_size()) * bound).all()
    assert native._bounds(ext, length) == [bound, bound, -(-length // ext.chunk_size()) * bound]


def scan_and_grads(fn, inputs, tree):
    xs = [x.clone().requires_grad_() for x in inputs]
    y, root = fn(*xs, tree, return_root_state=True)
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(x.shape, generator=g, dtype=x.dtype) for x in (y, root)]
    loss = (y * weights[0]).sum() + (root * weights[1]).sum()
    return [y.detach(), root.detach(), *torch.autograd.grad(loss, xs)]


@pytest.mark.parametrize("length", [37, 130])
def test_adversarial_trees_match_the_reference_with_gradients(path, length):
    trees = adversarial_trees(length, seed=length)
    parent = torch.tensor(list(trees.values()))
    deep = torch.tensor([deepest_preorder(p) for p in trees.values()])
    inputs = random_inputs(len(trees), 3, 4, length, F64, seed=length)
    for tree in (Tree(parent), Tree(parent, deep)):  # derived order, and a user's deepest valid order
        got = scan_and_grads(tree_scan, inputs, tree)
        want = scan_and_grads(tree_scan_ref, inputs, Tree(parent, deep))
        for name, a, b in zip(("y", "root", "du", "ddelta", "dA", "dB", "dC"), got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_built_trees_on_repeated_tokens_are_bounded(path):
    """The build's own trees: repeated tokens and random features at L = 2048."""
    length = 2048
    u, delta, _, B, _ = random_inputs(2, 4, 3, length, torch.float32, seed=2)
    for x in (u, delta, B):
        x[1] = x[1, :, torch.arange(length) % 5]  # row 1: five tokens repeated
    tree = build_tree(u, delta, B, torch.tensor([length, length]))
    assert torch.equal(tree.order, heavy_last_preorder(tree.parent))
    for b in range(2):
        h, g = stack_depths(tree.parent[b].tolist(), tree.order[b].tolist())
        assert max(h, g) <= stack_bound(length)


def test_replaced_or_edited_trees_get_a_fresh_plan(path):
    """A plan belongs to the exact parent/order tensors it was made from: replace() or an in-place edit of
    parent can never reuse it."""
    length = 40
    u, delta, A, B, C = random_inputs(2, 3, 2, length, F64, seed=3)
    tree = build_tree(u, delta, B, torch.tensor([length, length]))
    tree_scan(u, delta, A, B, C, tree)  # plans (and remembers) it
    other = Tree(torch.tensor([random_parent(length, random.Random(s)) for s in (4, 5)]))
    replaced = dataclasses.replace(tree, parent=other.parent, order=other.order)
    torch.testing.assert_close(tree_scan(u, delta, A, B, C, replaced), tree_scan_ref(u, delta, A, B, C, other))
    replaced_parent_only = dataclasses.replace(tree, parent=other.parent)  # order now wrong for parent
    with pytest.raises(ValueError, match="tree.order row 0 is not a DFS preorder"):
        tree_scan(u, delta, A, B, C, replaced_parent_only)
    chain = Tree.chain(2, length)
    edited = Tree.chain(2, length)
    tree_scan(u, delta, A, B, C, edited)
    edited.parent.copy_(other.parent)
    edited.order.copy_(other.order)
    torch.testing.assert_close(tree_scan(u, delta, A, B, C, edited), tree_scan_ref(u, delta, A, B, C, other))
    torch.testing.assert_close(tree_scan(u, delta, A, B, C, chain), tree_scan_ref(u, delta, A, B, C, chain))


def test_second_derivatives_raise_instead_of_being_silently_zero(path):
    u, delta, A, B, C = random_inputs(1, 3, 2, 9, F64, seed=6)
    xs = [x.clone().requires_grad_() for x in (u, delta, A, B, C)]
    tree = build_tree(u, delta, B, torch.tensor([9]))
    (gu,) = torch.autograd.grad(tree_scan(*xs, tree).square().sum(), xs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|no autograd formula was registered"):
        gu.sum().backward()
