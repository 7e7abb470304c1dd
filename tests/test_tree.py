"""The tree-scan core against independent definitions: brute-force path products, networkx MSTs,
a sequential selective scan, autograd's gradcheck."""

from __future__ import annotations

import math

import networkx as nx
import pytest
import torch

from grootl.tree import NonFiniteInputError, Tree, build_tree, chain_scan, edge_weights, tree_scan, tree_scan_ref
from scan_inputs import random_inputs
from grootl.tree.graph import edge_mask

F64 = torch.float64


@pytest.fixture(autouse=True, params=["native", "torch"])
def implementation(request, monkeypatch):
    """Every test runs on the native CPU kernels (where they build) and on the pure-PyTorch path."""
    monkeypatch.setenv("GROOTL_NATIVE", "1" if request.param == "native" else "0")
    return request.param


def brute_force(u, delta, A, B, C, parent):
    """H[v] = sum over w in subtree(v) of (product of the edge transitions on the path w -> v) * X[w]."""
    batch, d, length = u.shape
    y = torch.zeros(batch, d, length, dtype=u.dtype)
    for b in range(batch):
        H = torch.zeros(length, d, A.shape[1], dtype=u.dtype)
        for w in range(length):
            x_w = (delta[b, :, w] * u[b, :, w])[:, None] * B[b, :, w][None, :]
            prod, node = torch.ones_like(A), w
            H[node] += x_w
            while parent[b, node] >= 0:
                prod = prod * torch.exp(delta[b, :, node + 1, None] * A)
                node = int(parent[b, node])
                H[node] += prod * x_w
        y[b] = torch.einsum("ldn,nl->dl", H, C[b])
    return y


def sequential_selective_scan(u, delta, A, B, C):
    """Mamba's recurrence h[t] = exp(delta A) h[t-1] + delta B u, y = C h (no D skip)."""
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, -1)


def assert_valid_tree(tree: Tree, context_lens, k=3):
    batch, length = tree.parent.shape
    for b in range(batch):
        parent, order = tree.parent[b].tolist(), tree.order[b].tolist()
        assert parent[length - 1] == -1 and sorted(order) == list(range(length)) and order[0] == length - 1
        seen = {length - 1}
        for v in order[1:]:
            assert parent[v] in seen, "every node comes after its parent"
            seen.add(v)
            span = abs(parent[v] - v)
            assert span == 1 or (span <= k and max(parent[v], v) < context_lens[b]), (b, v, parent[v])


def tree_weight(tree: Tree, weights, b):
    total = 0.0
    for v, p in enumerate(tree.parent[b].tolist()):
        if p >= 0:
            lo, hi = min(v, p), max(v, p)
            total += float(weights[b, hi, hi - lo - 1])
    return total


LENGTHS = [1, 2, 7, 12]


@pytest.mark.parametrize("length", LENGTHS)
def test_tree_scan_matches_brute_force(length):
    batch = 7
    u, delta, A, B, C = random_inputs(batch, 5, 3, length, seed=length)
    ctx = torch.tensor([0, 1, 2, 3, max(length - 1, 0), length, length // 2])
    ctx = ctx.clamp_max(length)
    tree = build_tree(u, delta, B, ctx)
    assert_valid_tree(tree, ctx.tolist())
    expected = brute_force(u, delta, A, B, C, tree.parent)
    for fn in (tree_scan, tree_scan_ref):
        got = fn(u, delta, A, B, C, tree)
        assert got.dtype == F64
        assert ((got - expected).norm() / expected.norm().clamp_min(1e-300)) < 1e-10


def test_empty_batch():
    u, delta, A, B, C = random_inputs(0, 4, 3, 6)
    tree = build_tree(u, delta, B, torch.zeros(0, dtype=torch.long))
    y, root = tree_scan(u, delta, A, B, C, tree, return_root_state=True)
    assert y.shape == (0, 4, 6) and root.shape == (0, 4, 3)


def test_root_state_is_the_root_h():
    u, delta, A, B, C = random_inputs(3, 4, 2, 9)
    tree = build_tree(u, delta, B, torch.tensor([9, 4, 0]))
    y, root = tree_scan(u, delta, A, B, C, tree, return_root_state=True)
    y_ref, root_ref = tree_scan_ref(u, delta, A, B, C, tree, return_root_state=True)
    torch.testing.assert_close(root, root_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.einsum("bdn,bn->bd", root, C[:, :, -1]), y[:, :, -1])


def test_gradcheck_all_inputs():
    u, delta, A, B, C = random_inputs(2, 3, 2, 8, seed=3)
    tree = build_tree(u, delta, B, torch.tensor([8, 5]))
    inputs = [x.clone().requires_grad_() for x in (u, delta, A, B, C)]
    assert torch.autograd.gradcheck(lambda *xs: tree_scan(*xs, tree), inputs)
    assert torch.autograd.gradcheck(lambda *xs: tree_scan(*xs, tree, return_root_state=True)[1], inputs)


def test_gradients_match_reference_autograd():
    u, delta, A, B, C = random_inputs(3, 4, 3, 10, seed=4)
    tree = build_tree(u, delta, B, torch.tensor([10, 6, 2]))
    w = torch.randn(3, 4, 10, dtype=F64)
    grads = []
    for fn in (tree_scan, tree_scan_ref):
        xs = [x.clone().requires_grad_() for x in (u, delta, A, B, C)]
        (fn(*xs, tree) * w).sum().backward()
        grads.append([x.grad for x in xs])
    for g, g_ref in zip(*grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "manhattan"])
def test_mst_weight_equals_networkx(distance):
    batch, length, k = 6, 23, 3
    u, delta, A, B, C = random_inputs(batch, 4, 3, length, seed=5)
    ctx = torch.tensor([length, 0, 2, 3, 11, 17])
    tree = build_tree(u, delta, B, ctx, k=k, distance=distance)
    assert_valid_tree(tree, ctx.tolist(), k)
    weights, mask = edge_weights(u, delta, B, k, distance), edge_mask(ctx, length, k)
    for b in range(batch):
        g = nx.Graph()
        for t, j in mask[b].nonzero().tolist():
            g.add_edge(t - j - 1, t, weight=float(weights[b, t, j]))
        reference = nx.minimum_spanning_tree(g).size(weight="weight")
        assert math.isclose(tree_weight(tree, weights, b), reference, rel_tol=1e-12, abs_tol=1e-12)


def test_edge_weights_match_materialised_features():
    u, delta, A, B, C = random_inputs(2, 5, 4, 9, seed=6)
    X = (delta * u)[:, :, None, :] * B[:, None, :, :]  # (b, D, N, L)
    X = X.flatten(1, 2)
    for distance, fn in [
        ("cosine", lambda x, y: 1 - torch.nn.functional.cosine_similarity(x, y, dim=0)),
        ("euclidean", lambda x, y: ((x - y) ** 2).sum()),
        ("manhattan", lambda x, y: (x - y).abs().sum()),
    ]:
        w = edge_weights(u, delta, B, 3, distance)
        for b in range(2):
            for t in range(1, 9):
                for j in range(1, min(3, t) + 1):
                    torch.testing.assert_close(w[b, t, j - 1], fn(X[b, :, t], X[b, :, t - j]))


def test_ties_are_deterministic_and_give_the_chain():
    u = torch.ones(2, 4, 15)
    delta = torch.full((2, 4, 15), 0.5)
    B = torch.ones(2, 3, 15)
    ctx = torch.tensor([15, 9])
    first = build_tree(u, delta, B, ctx)
    for _ in range(3):
        again = build_tree(u, delta, B, ctx)
        assert torch.equal(again.parent, first.parent) and torch.equal(again.order, first.order)
    assert torch.equal(first.parent, Tree.chain(2, 15).parent)


def test_zero_prompt_features_give_no_nan():
    u, delta, A, B, C = random_inputs(2, 4, 3, 12, dtype=torch.float32)
    u[:, :, :6] = 0  # an all-padding prompt
    tree = build_tree(u, delta, B, torch.tensor([6, 12]))
    assert_valid_tree(tree, [6, 12])
    assert torch.isfinite(tree_scan(u, delta, A, B, C, tree)).all()


@pytest.mark.parametrize("context", [0, 1, 2])
def test_short_context_is_the_chain_and_the_selective_scan(context):
    u, delta, A, B, C = random_inputs(3, 4, 3, 10, seed=context)
    tree = build_tree(u, delta, B, torch.full((3,), context))
    assert torch.equal(tree.parent, Tree.chain(3, 10).parent)
    expected = sequential_selective_scan(u, delta, A, B, C)
    torch.testing.assert_close(tree_scan(u, delta, A, B, C, tree), expected, rtol=1e-12, atol=1e-12)
    y, h_last = chain_scan(u, delta, A, B, C, return_last_state=True)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_causal_at_response_positions():
    batch, length = 4, 14
    ctx = torch.tensor([3, 7, 10, 0])
    u, delta, A, B, C = random_inputs(batch, 4, 3, length, seed=8)
    base = tree_scan(u, delta, A, B, C, build_tree(u, delta, B, ctx))
    for b in range(batch):
        for t in range(int(ctx[b]), length):
            for which in range(3):
                x = [u.clone(), delta.clone(), B.clone()]
                x[which][b, :, t] += 1.0 + torch.rand(x[which].shape[1], dtype=F64)
                y = tree_scan(x[0], x[1], A, x[2], C, build_tree(x[0], x[1], x[2], ctx))
                torch.testing.assert_close(y[b, :, :t], base[b, :, :t], rtol=0, atol=1e-12)
                assert not torch.allclose(y[b, :, t:], base[b, :, t:])


def test_left_padding_is_kept_out_of_the_tree():
    u, delta, A, B, C = random_inputs(1, 4, 3, 10, seed=9)
    pad = 4
    padded = [torch.cat([x.new_zeros(*x.shape[:-1], pad), x], -1) for x in (u, delta, B, C)]
    padded[1][..., :pad] = 0.7  # transitions at padding positions are not 1
    alone = build_tree(u, delta, B, torch.tensor([10]))
    with_pad = build_tree(padded[0], padded[1], padded[2], torch.tensor([10 + pad]), start=torch.tensor([pad]))
    assert torch.equal(with_pad.parent[0, pad:], torch.where(alone.parent[0] < 0, -1, alone.parent[0] + pad))
    y_alone = tree_scan(u, delta, A, B, C, alone)
    y_pad = tree_scan(padded[0], padded[1], A, padded[2], padded[3], with_pad)
    torch.testing.assert_close(y_pad[..., pad:], y_alone, rtol=1e-12, atol=1e-12)


def test_low_precision_inputs_are_computed_in_float32():
    u, delta, A, B, C = random_inputs(2, 4, 3, 9, dtype=torch.float32, seed=10)
    tree = build_tree(u, delta, B, torch.tensor([9, 5]))
    ref = tree_scan(u, delta, A, B, C, tree)
    low = [x.to(torch.bfloat16) for x in (u, delta, B, C)]
    y = tree_scan(low[0], low[1], A, low[2], low[3], tree)
    assert y.dtype == torch.bfloat16
    exact = tree_scan(*(x.float() for x in (low[0], low[1])), A, low[2].float(), low[3].float(), tree)
    torch.testing.assert_close(y.float(), exact, rtol=1e-2, atol=1e-2)
    assert (y.float() - ref).norm() / ref.norm() < 5e-2


def test_bad_input_names_the_argument():
    u, delta, A, B, C = random_inputs(2, 4, 3, 9)
    ctx = torch.tensor([9, 5])
    cases = [
        (lambda: build_tree(u[0], delta, B, ctx), "u must be a 3-D tensor"),
        (lambda: build_tree(u, delta[:, :, :8], B, ctx), "u and delta must have the same shape"),
        (lambda: build_tree(u, delta, B[:1], ctx), "B must be (batch, N, L)"),
        (lambda: build_tree(u, delta, B, torch.tensor([9])), "context_lens must have shape (2,)"),
        (lambda: build_tree(u, delta, B, torch.tensor([10, 1])), "context_lens must lie in [0, L=9]"),
        (lambda: build_tree(u, delta, B, torch.tensor([-1, 1])), "context_lens must lie in [0, L=9]"),
        (lambda: build_tree(u, delta, B, torch.tensor([1.5, 2.0])), "context_lens must hold integers"),
        (lambda: build_tree(u, delta, B, ctx, distance="cos"), "distance must be one of"),
        (lambda: build_tree(u.masked_fill(u > 1, float("nan")), delta, B, ctx), "u contains NaN"),
        (lambda: tree_scan(u, delta, A[:2], B, C, Tree.chain(2, 9)), "A must be (D, N) = (4, 3)"),
        (lambda: tree_scan(u, delta, A, B, C[:, :2], Tree.chain(2, 9)), "C must have B's shape"),
        (lambda: tree_scan(u, delta, A, B, C, Tree.chain(2, 8)), "tree must be for (batch, L) = (2, 9)"),
        (lambda: tree_scan(u, delta, A, B, C.masked_fill(C > 1, float("inf")), Tree.chain(2, 9)), "C contains NaN"),
        (lambda: tree_scan(u, delta, A.long(), B, C, Tree.chain(2, 9)), "A must be a floating tensor"),
        (lambda: tree_scan(u, delta, A, B, C.int(), Tree.chain(2, 9)), "C must be a floating tensor"),
        (lambda: build_tree(u, delta.long(), B, ctx), "delta must be a floating tensor"),
        (lambda: tree_scan(u, delta, A.to("meta"), B, C, Tree.chain(2, 9)), "A is on meta but u is on cpu"),
        (lambda: build_tree(u, delta, B.to("meta"), ctx), "B is on meta but u is on cpu"),
        (lambda: tree_scan(u, delta, A, B, C, Tree(Tree.chain(2, 9).parent.int(), Tree.chain(2, 9).order)),
         "tree.parent must hold int64"),
        (lambda: build_tree(u, delta, B, ctx, start=torch.tensor([2, 6])), "row 1 has start 6 > context_lens 5"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert message in str(err.value)
        assert isinstance(err.value, NonFiniteInputError) == ("NaN" in message)


def test_unchecked_values_skip_the_value_checks_and_stay_safe():
    """check_values=False (the mixer's call): shapes are still checked; NaN inputs still give a valid tree
    (a spanning tree rooted at L-1) and NaN outputs rather than an error or a crash."""
    u, delta, A, B, C = random_inputs(2, 4, 3, 9)
    ctx = torch.tensor([9, 5])
    with pytest.raises(ValueError, match="B must be"):
        build_tree(u, delta, B[:1], ctx, check_values=False)
    nan_u = u.clone()
    nan_u[0, :, 3] = float("nan")
    tree = build_tree(nan_u, delta, B, ctx, check_values=False)
    assert_spanning_tree_rooted_at_end(tree)
    y = tree_scan(nan_u, delta, A, B, C, tree, check_values=False)
    assert y[0].isnan().any() and torch.isfinite(y[1]).all()  # row 1 holds no NaN
    same = build_tree(u, delta, B, ctx, check_values=False)
    assert torch.equal(same.parent, build_tree(u, delta, B, ctx).parent)
    torch.testing.assert_close(chain_scan(u, delta, A, B, C, check_values=False), chain_scan(u, delta, A, B, C))


def assert_spanning_tree_rooted_at_end(tree: Tree) -> None:
    for parent in tree.parent.tolist():
        length = len(parent)
        assert parent[-1] == -1 and sum(p == -1 for p in parent) == 1
        for v in range(length):  # every node reaches the root
            seen, w = 0, v
            while parent[w] != -1 and seen <= length:
                w, seen = parent[w], seen + 1
            assert w == length - 1
