"""The Mamba-2 tree scan (grootl.tree.mamba2) against independent definitions in float64: brute-force
path products over X built in full, Kruskal's MST on distances of X built in full, a sequential
Mamba-2 recurrence and transformers' own chunked (SSD) scan."""

from __future__ import annotations

import dataclasses
import inspect
import random

import pytest
import torch
from transformers.models.mamba2 import modeling_mamba2

from grootl.tree import NonFiniteInputError, Tree, build_tree, edge_weights
from grootl.tree import graph
from grootl.tree import mamba2 as m2
from native_checks import allowed_edges, kruskal_edges, preorder, tree_edges

F64 = torch.float64


@pytest.fixture(autouse=True, params=["native", "torch"])
def implementation(request, monkeypatch):
    """Every test runs on the native CPU kernels (where they build) and on the pure-PyTorch path."""
    monkeypatch.setenv("GROOTL_NATIVE", "1" if request.param == "native" else "0")
    return request.param


def random_inputs(batch, length, heads, head_dim, groups, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, head_dim, generator=g, dtype=F64)
    dt = torch.nn.functional.softplus(torch.randn(batch, length, heads, generator=g, dtype=F64))
    A = -torch.exp(torch.randn(heads, generator=g, dtype=F64) * 0.5)
    B = torch.randn(batch, length, groups, n, generator=g, dtype=F64)
    C = torch.randn(batch, length, groups, n, generator=g, dtype=F64)
    return x, dt, A, B, C


def random_tree(batch, length, seed):
    """A random tree per row rooted at L-1 (every parent later than its child) and a random DFS preorder of it."""
    g = torch.Generator().manual_seed(seed)
    parent = torch.stack([torch.tensor([int(torch.randint(v + 1, length, (1,), generator=g)) for v in range(length - 1)]
                                       + [-1]) for _ in range(batch)])
    return parent, torch.stack([torch.tensor(preorder(p.tolist(), random.Random(seed))) for p in parent])


def full_X(x, dt, B):
    """X[b, t, h, p, n] = dt·x·B of the head's group, built in full."""
    Bh = B.repeat_interleave(x.shape[2] // B.shape[2], dim=2)
    return (dt[..., None] * x)[..., None] * Bh[:, :, :, None, :]


def brute_force(x, dt, A, B, C, parent):
    """H[v] = Σ over w in subtree(v) of (Π of Ā over the edges on the path w -> v)·X[w]; y = C·H."""
    X = full_X(x, dt, B)
    Ch = C.repeat_interleave(x.shape[2] // C.shape[2], dim=2)
    batch, length = parent.shape
    y = torch.zeros_like(x)
    for b in range(batch):
        H = torch.zeros_like(X[b])
        for w in range(length):
            decay, node = torch.ones_like(A), w
            H[node] += X[b, w]
            while parent[b, node] >= 0:
                decay = decay * torch.exp(dt[b, node + 1] * A)
                node = int(parent[b, node])
                H[node] += decay[:, None, None] * X[b, w]
        y[b] = torch.einsum("lhpn,lhn->lhp", H, Ch[b])
    return y


def kruskal_weight(weights, length, allowed):
    """Weight of a minimum spanning tree over the allowed edges ((lo, hi) -> weight)."""
    root = list(range(length))

    def find(v):
        while root[v] != v:
            v = root[v]
        return v

    total = 0.0
    for (lo, hi) in sorted(allowed, key=lambda e: weights[e]):
        a, b = find(lo), find(hi)
        if a != b:
            root[a] = b
            total += weights[(lo, hi)]
    return total


@pytest.mark.parametrize("groups,n", [(1, 5), (2, 3), (4, 128)])
def test_tree_scan_matches_brute_force_and_oracle(groups, n):
    length = 9
    x, dt, A, B, C = random_inputs(4, length, 4, 3, groups, n, seed=groups)
    ctx = torch.tensor([length, 5, 0, 2])
    tree = m2.build_tree(x, dt, B, ctx)
    expected = brute_force(x, dt, A, B, C, tree.parent)
    for fn in (m2.tree_scan, m2.tree_scan_ref):
        got = fn(x, dt, A, B, C, tree)
        assert got.dtype == F64 and got.shape == x.shape
        assert (got - expected).norm() / expected.norm() < 1e-10


@pytest.mark.parametrize("groups", [1, 3])
def test_gradients_and_root_state_match_the_oracle(groups):
    x, dt, A, B, C = random_inputs(2, 8, 6, 2, groups, 4, seed=7)
    tree = m2.build_tree(x, dt, B, torch.tensor([8, 4]))
    gy = torch.randn(2, 8, 6, 2, dtype=F64)
    grads = []
    for fn in (m2.tree_scan, m2.tree_scan_ref):
        inputs = [t.clone().requires_grad_() for t in (x, dt, A, B, C)]
        y, root = fn(*inputs, tree, return_root_state=True)
        assert root.shape == (2, 6, 2, 4)
        grads.append(torch.autograd.grad((y * gy).sum() + root.square().sum(), inputs))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_gradcheck():
    x, dt, A, B, C = random_inputs(1, 5, 2, 2, 2, 2, seed=3)
    tree = m2.build_tree(x, dt, B, torch.tensor([5]))
    inputs = [t.clone().requires_grad_() for t in (x, dt, A, B, C)]
    assert torch.autograd.gradcheck(lambda *ts: m2.tree_scan(*ts, tree), inputs)


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "manhattan"])
@pytest.mark.parametrize("groups", [1, 3])
def test_edge_weights_are_distances_of_X_built_in_full(distance, groups):
    x, dt, _, B, _ = random_inputs(2, 7, 6, 2, groups, 4, seed=groups)
    X = full_X(x, dt, B).flatten(2)
    got = m2.edge_weights(x, dt, B, k=3, distance=distance)
    for j in (1, 2, 3):
        a, b = X[:, j:], X[:, :-j]
        if distance == "cosine":
            want = 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)
        elif distance == "euclidean":
            want = (a - b).square().sum(-1)
        else:
            want = (a - b).abs().sum(-1)
        torch.testing.assert_close(got[:, j:, j - 1], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_build_tree_is_the_minimum_spanning_tree_per_row(groups):
    length = 12
    x, dt, _, B, _ = random_inputs(5, length, 8, 2, groups, 16, seed=groups)
    ctx, start = torch.tensor([12, 7, 0, 3, 12]), torch.tensor([0, 0, 0, 0, 4])
    tree = m2.build_tree(x, dt, B, ctx, start=start)
    X = full_X(x, dt, B).flatten(2)
    for b in range(5):
        parent, order = tree.parent[b].tolist(), tree.order[b].tolist()
        assert parent[-1] == -1 and order[0] == length - 1 and sorted(order) == list(range(length))
        assert all(parent[v] in order[: i + 1] for i, v in enumerate(order[1:]))  # preorder: parents first
        P = int(ctx[b])
        assert all(parent[t] == t + 1 for t in range(max(P - 1, 0), length - 1)), "the response stays a chain"
        allowed = allowed_edges(length, P, int(start[b]))
        weights = {(lo, hi): 1 - float(torch.nn.functional.cosine_similarity(X[b, lo], X[b, hi], dim=0))
                   for lo, hi in allowed}
        edges = {(min(v, p), max(v, p)) for v, p in enumerate(parent) if p >= 0}
        assert edges <= set(allowed)
        assert sum(weights[e] for e in edges) == pytest.approx(kruskal_weight(weights, length, allowed), abs=1e-9)
        alone = m2.build_tree(x[b : b + 1], dt[b : b + 1], B[b : b + 1], ctx[b : b + 1], start=start[b : b + 1])
        assert alone.parent[0].tolist() == parent, "a row's tree does not depend on the rest of the batch"


def sequential_mamba2(x, dt, A, B, C):
    """h[t] = exp(dt·A) h[t-1] + dt·x ⊗ B, y = h·C, head by head."""
    Bh = B.repeat_interleave(x.shape[2] // B.shape[2], dim=2)
    Ch = C.repeat_interleave(x.shape[2] // C.shape[2], dim=2)
    h = torch.zeros(*x.shape[:1], *x.shape[2:], B.shape[-1], dtype=x.dtype)
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t] * A)[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    return torch.stack(ys, 1), h


@pytest.mark.parametrize("groups", [1, 2])
def test_chain_scan_is_the_mamba2_recurrence_and_transformers_ssd(groups):
    x, dt, A, B, C = random_inputs(3, 21, 4, 3, groups, 5, seed=11)
    y, last = m2.chain_scan(x, dt, A, B, C, return_last_state=True)
    want, want_last = sequential_mamba2(x, dt, A, B, C)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, want_last, rtol=1e-10, atol=1e-10)
    ssd = inspect.unwrap(modeling_mamba2.mamba2_chunk_scan)  # transformers' PyTorch chunked scan
    ssd_y, ssd_last = ssd(x, dt, A, B, C, chunk_size=8, return_final_states=True)
    torch.testing.assert_close(ssd_y.to(F64), want, rtol=1e-5, atol=1e-5)  # it computes in float32
    torch.testing.assert_close(ssd_last.to(F64), want_last, rtol=1e-5, atol=1e-5)


def test_float32_inputs_give_float32_outputs():
    x, dt, A, B, C = (t.float() for t in random_inputs(2, 6, 4, 2, 2, 3))
    tree = m2.build_tree(x, dt, B, torch.tensor([6, 3]))
    y = m2.tree_scan(x, dt, A, B, C, tree)
    assert y.dtype == torch.float32
    want = m2.tree_scan_ref(*(t.double() for t in (x, dt, A, B, C)), tree)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_problem():
    x, dt, A, B, C = random_inputs(2, 6, 4, 2, 2, 3)
    tree = Tree.chain(2, 6)
    with pytest.raises(ValueError, match=r"dt must be \(batch, L, H\)"):
        m2.tree_scan(x, dt[:, :, :3], A, B, C, tree)
    with pytest.raises(ValueError, match="heads of x must split evenly into B's 3 groups"):
        m2.build_tree(x, dt, torch.randn(2, 6, 3, 3, dtype=F64), torch.tensor([6, 6]))
    with pytest.raises(ValueError, match=r"A must be \(H,\)"):
        m2.tree_scan(x, dt, A[:2], B, C, tree)
    with pytest.raises(ValueError, match="C must have B's shape"):
        m2.tree_scan(x, dt, A, B, C[..., :2], tree)
    with pytest.raises(ValueError, match="context_lens must lie in"):
        m2.build_tree(x, dt, B, torch.tensor([7, 2]))
    with pytest.raises(ValueError, match="context_lens must have shape"):
        m2.build_tree(x, dt, B[:, :, :1], torch.tensor([6]))
    bad = x.clone()
    bad[1, 2, 0, 0] = float("nan")
    with pytest.raises(NonFiniteInputError, match="x contains NaN"):
        m2.build_tree(bad, dt, B, torch.tensor([6, 6]))


def test_grouped_build_bad_inputs_name_the_problem():
    a, b, ctx = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 5, 6), torch.tensor([6, 6])
    with pytest.raises(ValueError, match=r"^a must be a 4-D tensor, got shape 3x4x6$"):
        graph.build_grouped_tree(a[0], b, ctx)
    with pytest.raises(ValueError, match=r"b must be \(batch, G, N, L\) = \(2, 3, N, 6\) to match a 2x3x4x6; got 2x2x5"):
        graph.build_grouped_tree(a, b[:, :2], ctx)
    with pytest.raises(ValueError, match="got 2x3x5x5"):
        graph.build_grouped_tree(a, b[..., :5], ctx)
    with pytest.raises(ValueError, match="b must be a floating tensor"):
        graph.build_grouped_tree(a, b.long(), ctx)
    with pytest.raises(ValueError, match=r"context_lens must have shape \(2,\)"):
        graph.build_grouped_tree(a, b, ctx[:1])
    with pytest.raises(ValueError, match="distance must be one of"):
        graph.build_grouped_tree(a, b, ctx, distance="cos")
    bad = b.clone()
    bad[1, 2, 0, 0] = float("inf")
    with pytest.raises(NonFiniteInputError, match=r"b contains NaN or inf \(shape 2x3x5x6\)"):
        graph.build_grouped_tree(a, bad, ctx)


def tie_inputs(dtype, groups, length=40, heads=6, head_dim=2, n=4, seed=0):
    """Rows whose edge weights tie in real arithmetic, the same numbers in every dtype (made in bfloat16):
    repeated tokens (four (x, dt, B) triples), x proportional to one vector (power-of-two factors of either
    sign), zero x amid random ones, and the repeated tokens with x scaled by 2^-30 (tiny features)."""
    g = torch.Generator().manual_seed(seed)
    x0, dt0 = torch.randn(4, heads, head_dim, generator=g), torch.rand(4, heads, generator=g) + 0.1
    B0 = torch.randn(4, groups, n, generator=g)
    token = torch.randint(0, 4, (length,), generator=g)
    repeated = [x0[token], dt0[token], B0[token]]
    scale = 2.0 ** torch.randint(-3, 4, (length,), generator=g) * (torch.randint(0, 2, (length,), generator=g) * 2 - 1)
    proportional = [x0[0] * scale[:, None, None], dt0[:1].expand(length, -1), B0[:1].expand(length, -1, -1)]
    zeros = [torch.randn(length, heads, head_dim, generator=g), torch.rand(length, heads, generator=g) + 0.1,
             torch.randn(length, groups, n, generator=g)]
    zeros[0][torch.rand(length, generator=g) < 0.5] = 0
    tiny = [repeated[0] * 2.0**-30, repeated[1], repeated[2]]
    rows = [repeated, proportional, zeros, tiny]
    return [torch.stack([r[i] for r in rows]).to(torch.bfloat16).to(dtype) for i in range(3)]


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "manhattan"])
@pytest.mark.parametrize("groups", [1, 3])
def test_ties_give_one_tree_in_every_dtype(groups, distance):
    """Ties in real arithmetic resolve by edge id alike in float64, float32 and bfloat16, to Kruskal's tree;
    tiny features keep their unscaled twin's tree (the norm clamp is relative)."""
    context = torch.tensor([40, 40, 40, 40])
    trees = [m2.build_tree(*tie_inputs(dtype, groups), context, distance=distance)
             for dtype in (F64, torch.float32, torch.bfloat16)]
    for tree in trees[1:]:
        assert torch.equal(tree.parent, trees[0].parent) and torch.equal(tree.order, trees[0].order)
    x, dt, B = tie_inputs(F64, groups)
    for row in range(3):  # the tiny row's exact weights are below nine digits' reach for the sums
        X = full_X(x[row : row + 1], dt[row : row + 1], B[row : row + 1]).flatten(2)[0]
        assert tree_edges(trees[0].parent[row]) == kruskal_edges(X, 40, 0, distance), row
    if distance == "cosine":
        assert torch.equal(trees[0].parent[3], trees[0].parent[0]), "tiny features changed the tree"
    assert not torch.equal(trees[0].parent[0], Tree.chain(1, 40).parent[0]), "the test needs a tree other than the chain"


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "manhattan"])
def test_grouped_route_equals_build_tree(distance):
    """One group through the grouped weights and graph.spanning_tree gives grootl.tree.build_tree's tree (native
    kernels included), bit for bit in the weights; B shared by all groups gives that tree too."""
    ctx, start = torch.tensor([40, 40, 40, 40, 25, 40]), torch.tensor([0, 0, 0, 0, 3, 7])
    ties = tie_inputs(torch.float32, 1)
    x, dt, _, B, _ = random_inputs(2, 40, 6, 2, 1, 4, seed=5)
    rand = [t.float() for t in (x, dt, B)]
    x, dt, B = (torch.cat([a, b]) for a, b in zip(ties, rand))
    u = (dt[..., None] * x).flatten(2).transpose(1, 2)  # (batch, H·P, L)
    weights = m2.edge_weights(x, dt, B, 3, distance)
    assert torch.equal(weights, edge_weights(u, torch.ones_like(u), B[:, :, 0].transpose(1, 2), 3, distance))
    want = build_tree(u, torch.ones_like(u), B[:, :, 0].transpose(1, 2), ctx, distance=distance, start=start)
    for tree in (graph.spanning_tree(weights, ctx, start), m2.build_tree(x, dt, B, ctx, distance=distance, start=start)):
        assert torch.equal(tree.parent, want.parent) and torch.equal(tree.order, want.order)
    shared = m2.build_tree(x[:4], dt[:4], B[:4].expand(-1, -1, 3, -1), ctx[:4], distance=distance)
    assert torch.equal(shared.parent, want.parent[:4])


def test_scans_check_and_order_a_tree_once(monkeypatch, implementation):
    """On either path a tree is checked and its scan order derived once, then kept with it (a built tree's by its
    build): later scans check nothing again and give the same output. The PyTorch path's copy of the tree for the
    groups is kept with it too."""
    length = 10
    x, dt, A, B, C = random_inputs(2, length, 4, 2, 2, 3, seed=4)
    built = m2.build_tree(x, dt, B, torch.tensor([length, 6]))
    parent, order = random_tree(2, length, seed=4)
    hand_made = Tree(parent, order)
    calls = []
    for name in ("check_tree", "heavy_last_preorder"):
        monkeypatch.setattr(graph, name, lambda *args, real=getattr(graph, name), name=name: (calls.append(name), real(*args))[1])
    first = m2.tree_scan(x, dt, A, B, C, built)
    assert calls == []
    torch.testing.assert_close(first, m2.tree_scan_ref(x, dt, A, B, C, built), rtol=1e-10, atol=1e-10)
    assert torch.equal(m2.tree_scan(x, dt, A, B, C, built), first) and calls == []
    y = m2.tree_scan(x, dt, A, B, C, hand_made)
    assert calls == ["check_tree", "heavy_last_preorder"]  # the spies see what the scans do
    assert torch.equal(m2.tree_scan(x, dt, A, B, C, hand_made), y) and len(calls) == 2
    torch.testing.assert_close(y, brute_force(x, dt, A, B, C, parent), rtol=1e-10, atol=1e-10)
    if implementation == "torch":
        folded = graph.repeat_rows(built, 2)
        assert torch.equal(folded.parent[1::2], built.parent) and graph.repeat_rows(built, 2) is folded


def test_edited_and_hand_made_trees_scan_as_their_parents_say():
    """A tree edited in place, replaced, or made by hand in any DFS order is scanned as its parents say (no stale
    repeated tree); a bad row is named as the caller's row."""
    length = 9
    x, dt, A, B, C = random_inputs(2, length, 4, 2, 2, 3, seed=8)
    tree = m2.build_tree(x, dt, B, torch.tensor([length, length]))
    m2.tree_scan(x, dt, A, B, C, tree)
    parent, order = random_tree(2, length, seed=0)
    assert not torch.equal(order, graph.heavy_last_preorder(parent)), "the test needs an order the scans do not use"
    replaced = dataclasses.replace(tree, parent=parent, order=order)
    hand_made = Tree(parent.clone(), order.clone())
    tree.parent.copy_(parent)
    tree.order.copy_(order)
    want = brute_force(x, dt, A, B, C, parent)
    for t in (tree, replaced, hand_made):
        torch.testing.assert_close(m2.tree_scan(x, dt, A, B, C, t), want, rtol=1e-10, atol=1e-10)
    bad = parent.clone()
    bad[1, 0], bad[1, 1] = 1, 0  # a cycle in row 1
    with pytest.raises(ValueError, match="tree.parent row 1 is not a tree"):
        m2.tree_scan(x, dt, A, B, C, Tree(bad, order))

