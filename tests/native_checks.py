"""Shared checks of the native tree kernels (kernels/, grootl.tree.native): each takes the device whose
extension serves it (the C++ kernels, the emulated CUDA build, a GPU), so the CPU, emulated-CUDA and GPU
tests run the same comparisons against the plain oracle ``tree_scan_ref`` and the PyTorch tree build."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from grootl.tree import Tree, build_tree, graph, native, tree_scan, tree_scan_ref
from grootl.tree.scan import chain_tree_scan
from grootl.tree.graph import heavy_last_preorder
from scan_inputs import random_inputs

REPO = Path(__file__).resolve().parents[1]
F64, F32 = torch.float64, torch.float32
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def torch_path(fn, *args, **kwargs):
    """Call a grootl.tree function on its PyTorch path (native dispatch off)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GROOTL_NATIVE", "0")
        return fn(*args, **kwargs)


def preorder(parent: list[int], rng: random.Random) -> list[int]:
    """A DFS preorder from the root L-1, children in random order."""
    children = [[] for _ in parent]
    for v, p in enumerate(parent):
        if p >= 0:
            children[p].append(v)
    order, stack = [], [len(parent) - 1]
    while stack:
        v = stack.pop()
        order.append(v)
        kids = children[v][:]
        rng.shuffle(kids)
        stack.extend(reversed(kids))
    return order


def random_tree(batch: int, length: int, seed: int = 0) -> Tree:
    """Arbitrary trees rooted at L-1 (not only MSTs): long and short jumps, random child order."""
    rng = random.Random(seed)
    parents, orders = [], []
    for _ in range(batch):
        parent = [rng.randint(v + 1, min(length - 1, v + rng.choice([1, 3, length]))) for v in range(length - 1)]
        parent.append(-1)
        parents.append(parent)
        orders.append(preorder(parent, rng))
    return Tree(torch.tensor(parents), torch.tensor(orders))


def caterpillar(length: int) -> Tree:
    """A spine L-1, L-3, ... with one leaf per spine node, spine child visited first: in the leaves-to-root
    sweep about L/2 partial sums are open at once (deeper than a backward chunk)."""
    parent, order = [-1] * length, []
    spine = list(range(length - 1, -1, -2))
    for a, b in zip(spine, spine[1:]):
        parent[b] = a
    for s in spine:
        if s - 1 >= 0 and s - 1 not in spine:
            parent[s - 1] = s
    order = spine + [s - 1 for s in reversed(spine) if s - 1 >= 0 and parent[s - 1] == s and s - 1 not in spine]
    return Tree(torch.tensor([parent]), torch.tensor([order]))


def batched(tree: Tree, batch: int) -> Tree:
    """The same one-row tree on every row."""
    return Tree(tree.parent.expand(batch, -1).contiguous(), tree.order.expand(batch, -1).contiguous())


def run_scan(fn, inputs, tree, device="cpu"):
    """Forward (y, root) of ``fn`` and the gradients of a fixed random loss through both outputs, on the CPU."""
    gen = torch.Generator().manual_seed(1)
    (batch, d, _), n = inputs[0].shape, inputs[2].shape[1]
    gy, gr = torch.randn(batch, d, inputs[0].shape[2], generator=gen), torch.randn(batch, d, n, generator=gen)
    xs = [x.detach().to(device).requires_grad_() for x in inputs]
    y, root = fn(*xs, Tree(tree.parent.to(device), tree.order.to(device)), return_root_state=True)
    loss = (y * gy.to(device, y.dtype)).sum() + (root * gr.to(device, root.dtype)).sum()
    grads = torch.autograd.grad(loss, xs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)]
    return [t.detach().cpu().double() for t in (y, root, *grads)]


def run_both(inputs, tree, device="cpu"):
    """Native (on ``device``) and reference results."""
    return run_scan(native.tree_scan, inputs, tree, device), run_scan(tree_scan_ref, inputs, tree)


NAMES = ("y", "root", "du", "ddelta", "dA", "dB", "dC")


def assert_close(native_out, ref_out, rtol, atol):
    for name, a, b in zip(NAMES, native_out, ref_out):
        assert torch.isfinite(a).all(), f"{name}: unwritten (NaN) elements"
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, b.abs().max().item()), msg=name)


# (batch, D, N, L): odd L, L = 1, L > one backward chunk (32), D not a multiple of the CPU (16) or GPU (32) group
SHAPES = [(1, 1, 1, 1), (2, 3, 4, 2), (3, 7, 5, 33), (2, 17, 16, 67), (4, 33, 3, 45)]


TOL = {F64: (1e-10, 1e-10), F32: (2e-4, 2e-4)}


def simulated_plan(parent: list[int], order: list[int]) -> tuple[list[int], list[int], list[int]]:
    """The scan plan of one row by walking its two stacks step by step: flags, checkpoint offsets, sizes."""
    length, chunk = len(parent), native.load("cpu").chunk_size()
    children = [0] * length
    for p in parent:
        if p >= 0:
            children[p] += 1
    pos = {v: i for i, v in enumerate(order)}
    last = {p: max(pos[v] for v in range(length) if parent[v] == p) for p in set(parent) if p >= 0}
    flags = [(1 if children[v] else 0) | (2 if parent[v] >= 0 and last[parent[v]] == i else 0) for i, v in enumerate(order)]
    depth, h_depth, ckpt = 0, 0, [0] * -(-length // chunk)
    for i in range(length - 1, -1, -1):  # forward: leaves to root; a last child opens, its parent closes
        if i == length - 1 or i % chunk == chunk - 1:
            ckpt[i // chunk] = depth
        depth += (flags[i] >> 1 & 1) - (flags[i] & 1)
        h_depth = max(h_depth, depth)
    depth = g_depth = 0
    for f in flags:  # backward: root to leaves; a parent opens, its last child closes
        depth += (f & 1) - (f >> 1 & 1)
        g_depth = max(g_depth, depth)
    offsets = [sum(ckpt[:c]) for c in range(len(ckpt) + 1)]
    return flags, offsets, [h_depth, g_depth, offsets[-1]]


def check_plans(device, trees):
    """Each tree's plan (the build's own where it made the tree, the chain's closed form, else the checked one of
    the heavy-last order derived from parent) against the simulation; the checked plan of the same order agrees."""
    for tree in trees:
        ext = native._module_for(torch.device(device))
        plan = native._Plan.of(ext, tree, torch.device(device))
        assert torch.equal(plan.order.cpu(), heavy_last_preorder(tree.parent.cpu()))
        for b, (parent, order) in enumerate(zip(tree.parent.tolist(), plan.order.tolist())):
            flags, offsets, sizes = simulated_plan(parent, order)
            assert plan.flags[b].tolist() == flags
            assert plan.ckpt_offset[b].tolist() == offsets
            assert plan.sizes[b].tolist() == sizes
        bounds = native._bounds(ext, tree.parent.shape[1])
        assert (plan.sizes.cpu() <= torch.tensor(bounds, dtype=torch.int32)).all()
        checked = native._Plan.checked(tree.parent, plan.order)
        for name in ("flags", "ckpt_offset", "sizes"):
            assert torch.equal(getattr(checked, name), getattr(plan, name)), name


def plan_cases(device, batch=4, length=70):
    u, delta, _, B, _ = random_inputs(batch, 5, 4, length, F32, seed=length, device=device)
    context = torch.tensor([length, 0, length // 2, min(3, length)][:batch], device=device)
    on = lambda t: Tree(t.parent.to(device), t.order.to(device))  # noqa: E731
    return [native.build_tree(u, delta, B, context, k=k) for k in (1, 3)] + [
        on(random_tree(batch, length, seed=3)),
        on(batched(caterpillar(length), batch)),
        Tree.chain(batch, length, device=device),  # planned in closed form
    ]


def check_scan_matches_reference(device, shape):
    batch, d, n, length = shape
    inputs = random_inputs(batch, d, n, length, F32, seed=length)
    context = torch.tensor([[0, 1, 2, length][i % 4] for i in range(batch)])
    for tree in (torch_path(build_tree, *inputs[:2], inputs[3], context), random_tree(batch, length, seed=1)):
        assert_close(*run_both(inputs, tree, device=device), *TOL[F32])


def check_deep_stack(device, length):
    inputs = random_inputs(1, 6, 3, length, F64, seed=4)
    assert_close(*run_both(inputs, caterpillar(length), device=device), *TOL[F64])


def check_half_precision(device, shape, dtype=torch.bfloat16):
    batch, d, n, length = shape
    inputs = random_inputs(batch, d, n, length, F32, seed=3)
    tree = torch_path(build_tree, *inputs[:2], inputs[3], torch.tensor([length * 2 // 3, length])[:batch])
    low = run_scan(native.tree_scan, [x.to(dtype) for x in inputs], tree, device)
    ref = run_scan(tree_scan_ref, [x.to(dtype).float() for x in inputs], tree)  # the same rounded inputs
    for name, a, b in zip(NAMES, low, ref):
        assert torch.isfinite(a).all(), name
        assert (a - b).norm() / b.norm() < 1e-2, name


class DtypeConversions(TorchDispatchMode):
    """Records the dtype conversions (``aten._to_copy``) of tensors with ``numel`` elements."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].numel() == self.numel and out.dtype != args[0].dtype:
            self.seen.append(f"{args[0].dtype} -> {out.dtype}")
        return out


def check_autocast_dtypes_make_no_copies(device, shape):
    """The models' autocast case: u, B, C in bf16 beside delta and A in float32. The native scan (and the CPU's
    chain + tree scan) converts no (batch, D, L) tensor, forward or backward (no float32 copy of u, y, gy or du),
    and matches the reference on the same values."""
    batch, d, n, length = shape
    assert d != n  # B-sized tensors must not count
    u, delta, A, B, C = random_inputs(batch, d, n, length, F32, seed=4)
    u, B, C = (x.to(torch.bfloat16) for x in (u, B, C))
    tree = torch_path(build_tree, u.float(), delta, B.float(), torch.tensor([length // 2, length])[:batch])
    tree = Tree(tree.parent.to(device), tree.order.to(device))
    gy = torch.randn(batch, d, length, generator=torch.Generator().manual_seed(2)).to(device, torch.bfloat16)
    scans = [tree_scan] + ([lambda *xs: chain_tree_scan(*xs, 0.5)] if native.serves_chain_tree(device) else [])
    for scan in scans:
        leaves = [x.to(device).requires_grad_() for x in (u, delta, A, B, C)]
        with DtypeConversions(u.numel()) as conversions:
            y = scan(*leaves, tree)
            grads = torch.autograd.grad((y * gy).sum(), leaves)
        assert y.dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16
        assert conversions.seen == [], conversions.seen
    ref = [x.float().requires_grad_() for x in (u, delta, A, B, C)]
    y_ref = tree_scan_ref(*ref, Tree(tree.parent.cpu(), tree.order.cpu()))
    ref_grads = torch.autograd.grad((y_ref * gy.cpu().float()).sum(), ref)
    leaves = [x.to(device).requires_grad_() for x in (u, delta, A, B, C)]
    y = tree_scan(*leaves, tree)
    grads = torch.autograd.grad((y * gy).sum(), leaves)
    for name, a, b in zip(("y",) + NAMES[2:], (y, *grads), (y_ref, *ref_grads)):
        a, b = a.detach().cpu().double(), b.double()
        assert (a - b).norm() / b.norm() < 1e-2, name


def check_tree_equals_cpu_tree(device, distance, batch, length, d, k=3):
    u, delta, _, B, _ = random_inputs(batch, d, 16, length, F32, seed=11)
    for x in (u, delta, B):
        x[1] = x[1, :, :1]  # row 1: every position alike, so weights tie
    context = torch.tensor([0, length, 2, length, length // 2, length - 1])[:batch]
    start = torch.tensor([0, 0, 0, 3, 20, 5])[:batch]
    cpu = torch_path(build_tree, u, delta, B, context, k=k, distance=distance, start=start)  # == the C++ tree
    dev = native.build_tree(*(x.to(device) for x in (u, delta, B, context)), k=k, distance=distance, start=start.to(device))
    assert torch.equal(cpu.parent, dev.parent.cpu()) and torch.equal(cpu.order, dev.order.cpu())


def tie_inputs(dtype, length=60, d=12, n=6, seed=0):
    """Rows whose edge weights tie in real arithmetic, built exactly in ``dtype``: repeated tokens (four feature
    vectors), features proportional to one vector (power-of-two factors of either sign), zero features amid
    random ones, and repeated tokens under a shared scale of 2^-30 (tiny features)."""
    g = torch.Generator().manual_seed(seed)
    u0, B0 = torch.randn(d, 4, generator=g), torch.randn(n, 4, generator=g)
    delta0 = torch.nn.functional.softplus(torch.randn(d, 4, generator=g))
    token = torch.randint(0, 4, (length,), generator=g)
    repeated = [u0[:, token], delta0[:, token], B0[:, token]]
    scale = 2.0 ** torch.randint(-3, 4, (length,), generator=g) * (torch.randint(0, 2, (length,), generator=g) * 2 - 1)
    proportional = [u0[:, :1] * scale, delta0[:, :1].expand(d, length), B0[:, :1].expand(n, length)]
    zeros = [torch.randn(d, length, generator=g), torch.rand(d, length, generator=g) + 0.1, torch.randn(n, length, generator=g)]
    zeros[0][:, torch.rand(length, generator=g) < 0.5] = 0
    tiny = [repeated[0] * 2.0**-30, repeated[1], repeated[2]]
    rows = [repeated, proportional, zeros, tiny]
    return [torch.stack([r[i] for r in rows]).to(dtype) for i in range(3)]


def check_ties_give_one_tree(device, distance):
    """The PyTorch build and ``device``'s kernel give one tree per row on inputs whose weights tie in real
    arithmetic, in fp64, fp32 and bf16 alike (the ties are exact in each, so the trees agree across dtypes too);
    tiny features keep the tree of their unscaled twin (relative norm clamp)."""
    context = torch.tensor([60, 60, 60, 60])
    trees = []
    for dtype in (F64, F32, torch.bfloat16):
        u, delta, B = tie_inputs(dtype)
        ref = torch_path(build_tree, u, delta, B, context, distance=distance)
        dev = native.build_tree(*(x.to(device) for x in (u, delta, B, context)), distance=distance)
        assert torch.equal(dev.parent.cpu(), ref.parent) and torch.equal(dev.order.cpu(), ref.order), dtype
        trees.append(ref.parent)
    assert all(torch.equal(t, trees[0]) for t in trees), "ties resolved differently across dtypes"
    if distance == "cosine":
        assert torch.equal(trees[0][3], trees[0][0]), "tiny features changed the tree"
    assert not torch.equal(trees[0][0], Tree.chain(1, 60).parent[0]), "the test needs a tree other than the chain"


def grouped_inputs(dtype, groups, length=40, c=5, n=4, seed=0):
    """Grouped features a (6, G, c, L), b (6, G, n, L), the same numbers in every dtype (made in bfloat16). Rows 0-3
    have weights that tie in real arithmetic: repeated tokens (four (a, b) pairs), a proportional to one vector
    (power-of-two factors of either sign), zero a amid random ones, and the repeated tokens with a scaled by 2^-30
    (tiny features); rows 4-5 are random."""
    g = torch.Generator().manual_seed(seed)
    a0, b0 = torch.randn(groups, c, 4, generator=g), torch.randn(groups, n, 4, generator=g)
    token = torch.randint(0, 4, (length,), generator=g)
    repeated = [a0[..., token], b0[..., token]]
    scale = 2.0 ** torch.randint(-3, 4, (length,), generator=g) * (torch.randint(0, 2, (length,), generator=g) * 2 - 1)
    proportional = [a0[..., :1] * scale, b0[..., :1].expand(-1, -1, length)]
    zeros = [torch.randn(groups, c, length, generator=g), torch.randn(groups, n, length, generator=g)]
    zeros[0][..., torch.rand(length, generator=g) < 0.5] = 0
    tiny = [repeated[0] * 2.0**-30, repeated[1]]
    rows = [repeated, proportional, zeros, tiny] + [
        [torch.randn(groups, c, length, generator=g), torch.randn(groups, n, length, generator=g)] for _ in range(2)]
    return [torch.stack([r[i] for r in rows]).to(torch.bfloat16).to(dtype) for i in range(2)]


GROUPED_CONTEXT, GROUPED_START = torch.tensor([40, 40, 40, 40, 40, 25]), torch.tensor([0, 0, 0, 0, 0, 3])


def allowed_edges(length, context_len, start, k=3):
    """The token graph's edges (lo, hi) of one row."""
    edges = [(t - 1, t) for t in range(1, length)]
    return edges + [(t - j, t) for t in range(length) for j in range(2, k + 1) if t - j >= start and t < context_len]


def exact_weight(X, lo, hi, distance):
    """The distance of two rows of features X built in full, in float64."""
    a, b = X[hi].double(), X[lo].double()
    if distance == "cosine":
        return 1 - float(torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-300))
    return float((a - b).square().sum() if distance == "euclidean" else (a - b).abs().sum())


def kruskal_edges(X, context_len, start, distance, k=3):
    """Kruskal's minimum spanning tree of one row of features X (L, features) built in full, weights in float64
    rounded to nine significant digits (so ties in real arithmetic tie here), ties towards the smaller edge id."""
    length = X.shape[0]
    root = list(range(length))

    def find(v):
        while root[v] != v:
            v = root[v]
        return v

    chosen = set()
    weight = {e: float(f"{exact_weight(X, *e, distance):.9e}") for e in allowed_edges(length, context_len, start, k)}
    for lo, hi in sorted(weight, key=lambda e: (weight[e], e[1] * k + (e[1] - e[0] - 1))):
        ra, rb = find(lo), find(hi)
        if ra != rb:
            root[ra] = rb
            chosen.add((lo, hi))
    return chosen


def tree_edges(parent):
    return {(min(v, p), max(v, p)) for v, p in enumerate(parent.tolist()) if p >= 0}


def check_grouped_tree(device, groups, distance):
    """graph.build_grouped_tree on ``device``'s native kernel equals the PyTorch build in fp64, fp32 and bf16; tie
    rows give one tree in every dtype, Kruskal's (tiny features: their unscaled twin's); random rows give Kruskal's
    tree in fp64 and a tree within the comparison grid of its weight in the others."""
    trees = []
    for dtype in (F64, F32, torch.bfloat16):
        a, b = grouped_inputs(dtype, groups)
        on = [x.to(device) for x in (a, b, GROUPED_CONTEXT, GROUPED_START)]
        ours = graph.build_grouped_tree(*on[:3], distance=distance, start=on[3])
        assert isinstance(ours.plan().payload, native._Plan), "the tree did not come from the kernel"
        theirs = torch_path(graph.build_grouped_tree, a, b, GROUPED_CONTEXT, distance=distance, start=GROUPED_START)
        assert torch.equal(ours.parent.cpu(), theirs.parent) and torch.equal(ours.order.cpu(), theirs.order), dtype
        trees.append(theirs.parent)
    assert all(torch.equal(t[:4], trees[0][:4]) for t in trees), "ties resolved differently across dtypes"
    a, b = grouped_inputs(F64, groups)
    X = (a[:, :, :, None] * b[:, :, None]).flatten(1, 3).transpose(1, 2)  # (6, L, G·c·n)
    for row in (0, 1, 2, 4, 5):  # the tiny row's exact weights are below nine digits' reach for the sums
        want = kruskal_edges(X[row], int(GROUPED_CONTEXT[row]), int(GROUPED_START[row]), distance)
        assert tree_edges(trees[0][row]) == want, row
        for tree in trees[1:]:  # rounding may reorder random weights closer than the fp32 comparison grid
            weight = sum(exact_weight(X[row], *e, distance) for e in tree_edges(tree[row]))
            best = sum(exact_weight(X[row], *e, distance) for e in want)
            assert weight <= best + 40 * 2.0**-14 * max(1.0, abs(best)), row
    if distance == "cosine":
        assert torch.equal(trees[0][3], trees[0][0]), "tiny features changed the tree"
    assert not torch.equal(trees[0][0], Tree.chain(1, 40).parent[0]), "the test needs a tree other than the chain"


def check_runs_identical(device, shape):
    batch, d, n, length = shape
    inputs = random_inputs(batch, d, n, length, F32, seed=5, device=device)
    tree = native.build_tree(inputs[0], inputs[1], inputs[3], torch.tensor([length // 2, length], device=device))
    again = native.build_tree(inputs[0], inputs[1], inputs[3], torch.tensor([length // 2, length], device=device))
    assert torch.equal(tree.parent, again.parent) and torch.equal(tree.order, again.order)
    first, again = (run_scan(native.tree_scan, inputs, tree, device) for _ in range(2))
    for name, a, b in zip(NAMES, first, again):
        assert torch.equal(a, b), name


def bench_kernels():
    """scripts/bench_kernels.py as a module."""
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "scripts" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


# Trees whose edges join positions at most 3 apart (what the chunked CUDA scan takes), made by hand to stress its
# chunk boundaries, and minimum spanning trees of random weights on the k = 3 graph.
def short_edge_trees(length: int, seed: int = 0) -> list[list[int]]:
    """Parent lists of one row each: the chain; a hairpin (down every other position from the root, back up over
    the others: edges point forward and backward across every boundary, twice); a ladder (three chains v -> v + 3:
    three crossing edges at every boundary, a reduced tree of many local roots); a comb (a spine v -> v + 3 with
    leaves hanging forward and backward); a random MST."""
    last = length - 1
    chain = [v + 1 for v in range(last)] + [-1]
    down = list(range(last, -1, -2))  # the root, then every other position going down
    up = [v for v in range(length) if v not in set(down)]
    path = down + up  # each node's parent is the one before it on the path
    hairpin = [-1] * length
    for child, parent in zip(path[1:], path):
        hairpin[child] = parent
    ladder = [v + 3 if v + 3 < length else last for v in range(last)] + [-1]
    comb = [-1] * length
    spine = set(range(last, -1, -3))
    for v in range(last):
        comb[v] = v + 3 if v in spine else (v + 1 if (v // 3) % 2 else v - 1 if v - 1 >= 0 and v - 1 in spine else v + 1)
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(1, length, 3, generator=g, dtype=F64)
    mst = graph.spanning_tree(weights, torch.tensor([length])).parent[0].tolist()
    trees = [chain, hairpin, ladder, comb, mst]
    for parent in trees:
        assert parent[last] == -1 and all(0 < abs(p - v) <= 3 for v, p in enumerate(parent[:last])), parent
    return trees


def short_edge_tree(batch: int, length: int, seed: int = 0) -> Tree:
    """Rows of different short-edge trees (orders derived: the scans plan them)."""
    trees = short_edge_trees(length, seed)
    return Tree(torch.tensor([trees[(seed + b) % len(trees)] for b in range(batch)]))
