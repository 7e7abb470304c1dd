"""The CUDA extension (kernels/cuda.cu: host code and kernels) under the checks of tests/native_checks.py: on a GPU
where there is one, and on every machine through tests/kernels/cuda_emulation.h, with CPU threads standing in
for the GPU's (smaller shapes there: an emulated warp is 32 OS threads). Kernel outputs are poisoned."""

from __future__ import annotations

import argparse
import os
from functools import partial

import pytest
import torch

from grootl.tree import Tree, build_tree, graph, mamba2, native, tree_scan_ref
from native_checks import (
    CUDA, F64, NAMES, SHAPES, TOL, assert_close, bench_kernels, run_both, run_scan, short_edge_tree,
    check_autocast_dtypes_make_no_copies, check_deep_stack, check_grouped_tree, check_half_precision, check_plans,
    check_runs_identical, check_scan_matches_reference, check_ties_give_one_tree, check_tree_equals_cpu_tree,
    plan_cases, torch_path,
)
from scan_inputs import random_inputs

pytestmark = pytest.mark.usefixtures("poison_native_outputs")


# N=5: 8 lanes, 3 idle; N=16: 16 lanes; N=64: 32 lanes x 2 states; D not a multiple of a block's channels
EMULATED_SHAPES = [(3, 7, 5, 33), (2, 17, 16, 67), (1, 3, 64, 20)]


@pytest.mark.parametrize("shape", EMULATED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_cuda_scan_matches_reference(emulated_cuda, shape):
    check_scan_matches_reference(emulated_cuda, shape)


def test_emulated_cuda_deep_stack(emulated_cuda):
    check_deep_stack(emulated_cuda, 101)


def test_emulated_cuda_bf16(emulated_cuda):
    check_half_precision(emulated_cuda, (2, 20, 16, 40))


def test_emulated_cuda_autocast_dtypes_make_no_copies(emulated_cuda):
    check_autocast_dtypes_make_no_copies(emulated_cuda, (2, 19, 8, 20))


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "manhattan"])
@pytest.mark.parametrize("k", [1, 3])
def test_emulated_cuda_tree_equals_cpu_tree(emulated_cuda, distance, k):
    check_tree_equals_cpu_tree(emulated_cuda, distance, batch=4, length=97, d=9, k=k)


def test_emulated_cuda_ties_give_one_tree(emulated_cuda):  # one distance: the others share its code path
    check_ties_give_one_tree(emulated_cuda, "cosine")


def test_emulated_cuda_grouped_tree_equals_torch_and_kruskal(emulated_cuda):  # the distances share the host code
    check_grouped_tree(emulated_cuda, 3, "cosine")


@pytest.mark.parametrize("length", [1, 33, 150])
def test_emulated_cuda_plans_match_stack_simulation(emulated_cuda, length):
    check_plans(emulated_cuda, plan_cases(emulated_cuda, batch=3, length=length))


def test_emulated_cuda_runs_are_identical(emulated_cuda):
    check_runs_identical(emulated_cuda, (2, 40, 16, 37))


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_emulated_cuda_serves_the_model(emulated_cuda_build, monkeypatch, autocast):
    """A GrootL model's loss and gradients are the same whichever extension serves its tree ops (under bf16
    autocast the scans get bf16 u and float32 delta: both extensions take them in float32)."""
    from grootl.model import tiny_model

    model = tiny_model()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    lens = torch.tensor([14, 5])

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids, context_lens=lens, labels=ids).loss
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    # the two scan kernels on both extensions (the CPU's one-call chain + tree kernel rounds a bf16 y once instead
    # of twice: test_cpu_chain_tree_scan_equals_the_two_scans compares it)
    monkeypatch.setattr(native, "serves_chain_tree", lambda device: False)
    on_cpu_kernels = loss_and_grads()
    served = []
    monkeypatch.setattr(native, "_module_for", lambda device: served.append(device) or emulated_cuda_build)
    for a, b in zip(loss_and_grads(), on_cpu_kernels, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert served, "the model never reached the native kernels"


# The build's phases run as launches over all rows' elements (the emulation: 2 blocks of 32 threads, so every row
# below spans several blocks and a block several rows), its features by tiles of 32 positions x 8 channel slices
# and passes of 4 (t, t - j) pairs: lengths across tiles, channel counts below and above the slices, k above 3.
SPANNING = [((3, 5, 3, 80), 5, "cosine", 1, torch.float64), ((2, 9, 40, 70), 4, "manhattan", 2, torch.float32),
            ((2, 20, 7, 45), 3, "euclidean", 1, torch.float32)]


@pytest.mark.parametrize("shape,k,distance,groups,dtype", SPANNING, ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_emulated_cuda_build_over_blocks_equals_torch(emulated_cuda, shape, k, distance, groups, dtype):
    """Rows that span many blocks give the PyTorch path's tree, ties (a row of one repeated position) and prompts
    with left padding included; grouped features (Mamba-2) too."""
    batch, c, n, length = shape
    context, start = torch.tensor([length, length // 2, length])[:batch], torch.tensor([0, 0, 7])[:batch]
    g = torch.Generator().manual_seed(length)
    a, b = torch.randn(batch, groups, c, length, generator=g), torch.randn(batch, groups, n, length, generator=g)
    a[1], b[1] = a[1, ..., :1], b[1, ..., :1]  # row 1: every position alike
    a, b = a.to(dtype), b.to(dtype)
    if groups == 1:  # Mamba-1's build: u = a, delta = 1, B = b
        build = partial(build_tree, a[:, 0], torch.ones_like(a[:, 0]), b[:, 0])
    else:
        build = partial(graph.build_grouped_tree, a, b)
    ours = build(context, k=k, distance=distance, start=start)
    assert isinstance(ours.plan().payload, native._Plan), "the tree did not come from the kernel"
    theirs = torch_path(build, context, k=k, distance=distance, start=start)
    assert torch.equal(ours.parent, theirs.parent) and torch.equal(ours.order, theirs.order)


def test_emulated_cuda_build_needs_all_its_rounds(emulated_cuda, length=128):
    """The worst cases of the fixed round counts (ceil(log2 L) = 7 each): chain weights |X[t] - X[t-1]| = 1 + the
    trailing zeros of t pair the components up in every Borůvka round, weights rising along the chain make one
    pointer chain through all 128 nodes. Both trees are the chain."""
    t = torch.arange(1, length, dtype=torch.float64)
    ruler = (t.long() & -t.long()).log2() + 1
    X = torch.stack([torch.cat([t.new_zeros(1), ruler.cumsum(0)]), torch.cat([t.new_zeros(1), t.cumsum(0)])])
    u = X[:, None].float()
    tree = build_tree(u, torch.ones_like(u), torch.ones_like(u), torch.zeros(2, dtype=torch.long),
                      distance="manhattan")
    assert torch.equal(tree.parent, Tree.chain(2, length).parent)
    assert torch.equal(tree.order, Tree.chain(2, length).order)


def test_gpu_benchmark_runs_on_the_emulated_extension(emulated_cuda, monkeypatch):
    """A smoke run of scripts/bench_kernels.py's GPU part, so a GPU session does not find its bugs."""
    bench = bench_kernels()
    monkeypatch.setitem(bench.SIZES, "tiny", (32, 16))
    args = argparse.Namespace(sizes=["tiny"], batch=[1], lengths=[33], repeats=1)
    (row,), extra = bench.bench_cuda(args, device=emulated_cuda)
    assert row["build_s"] > 0 and row["ours_s"] > 0 and row["chain_s"] > 0 and row["bandwidth_fraction"] > 0
    assert extra["copy_bandwidth_gb_s"] > 0


def test_cuda_build_without_gpu_picks_archs(monkeypatch, capsys):
    """No GPU and no TORCH_CUDA_ARCH_LIST (torch's own lookup fails with 'list index out of range'): the build
    compiles for default archs, says so, and leaves the environment as it was."""
    seen = {}

    def load(**kwargs):
        seen["archs"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
        return "module"

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(native, "_cpp_extension", lambda: argparse.Namespace(load=load))
    assert native._compile("cuda") == "module"
    assert seen["archs"] == native.DEFAULT_CUDA_ARCHS and "TORCH_CUDA_ARCH_LIST" not in os.environ
    assert "TORCH_CUDA_ARCH_LIST" in capsys.readouterr().err
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    native._compile("cuda")
    assert seen["archs"] == "9.0"


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [*SHAPES[2:], (2, 9, 64, 40)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_scan_matches_reference_fp32(shape):
    check_scan_matches_reference("cuda", shape)


@CUDA
@pytest.mark.gpu
def test_cuda_deep_stack():
    check_deep_stack("cuda", 1001)


@CUDA
@pytest.mark.gpu
def test_cuda_scan_bf16():
    check_half_precision("cuda", (2, 70, 16, 300))


@CUDA
@pytest.mark.gpu
def test_cuda_autocast_dtypes_make_no_copies():
    check_autocast_dtypes_make_no_copies("cuda", (2, 70, 16, 300))


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("distance", ["cosine", "euclidean", "manhattan"])
def test_cuda_tree_equals_cpu_tree(distance):
    check_tree_equals_cpu_tree("cuda", distance, batch=6, length=300, d=64)


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("distance", ["cosine", "euclidean", "manhattan"])
def test_cuda_ties_give_one_tree(distance):
    check_ties_give_one_tree("cuda", distance)


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("distance", ["cosine", "euclidean", "manhattan"])
def test_cuda_grouped_tree_equals_torch_and_kruskal(distance):
    check_grouped_tree("cuda", 3, distance)


@CUDA
@pytest.mark.gpu
def test_cuda_plans_match_stack_simulation():
    check_plans("cuda", plan_cases("cuda", length=300))


@CUDA
@pytest.mark.gpu
def test_cuda_runs_are_identical():
    check_runs_identical("cuda", (2, 96, 16, 257))


@CUDA
@pytest.mark.gpu
def test_cuda_chunked_kernels_each_way_match_reference():
    """Each way the GPU runs the chunked scan against the float64 reference: the whole backward in the fused kernel
    (at a batch whose blocks fill the device), its passes 1-2 there and pass 3 apart (batch 1), and a launch per pass
    (a row too long for a block)."""
    ext = native.load("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases = [(8, ext.channel_group(16) * -(-2 * sms // 8), 16, 300), (1, 40, 16, 300), (2, 24, 16, 5000)]
    backwards = []
    for batch, d, n, length in cases:
        backwards.append(ext.chunked_kernels(batch, d, length, n, 8)[1])
        inputs = random_inputs(batch, d, n, length, F64, seed=length + d)
        assert_close(*run_both(inputs, short_edge_tree(batch, length, seed=d), device="cuda"), *TOL[F64])
    assert backwards == ["fused", "fused passes 1-2", "per pass"]


def chunked_calls(ext, monkeypatch) -> list[str]:
    """Names of the chunked (sequence-parallel) kernels ``ext`` serves from now on, as they are called."""
    calls = []
    for name in ("forward_chunked", "backward_chunked", "mamba2_forward_chunked", "mamba2_backward_chunked"):
        kernel = getattr(ext, name)
        monkeypatch.setattr(ext, name, lambda *args, _k=kernel, _n=name: calls.append(_n) or _k(*args))
    return calls


# (batch, D, N, L) around the emulated chunk of 8 positions: L = 1, L < C, L = C, L = C + 1, L not a multiple of C;
# N = 1, 5 (idle lanes), 16, 128 (32 lanes x 4); every row a different short-edge tree. The rows of the last shape
# are too long for the emulated fused kernel (a block per row): it takes a launch per pass. Of the others, those with
# 3 blocks or more run the backward whole in the fused kernel, the rest its passes 1-2 there and pass 3 apart.
CHUNKED_SHAPES = [(5, 2, 5, 19), (1, 2, 1, 1), (2, 3, 16, 8), (3, 2, 128, 9), (2, 17, 4, 5), (2, 3, 16, 40)]


def test_emulated_cuda_chunked_shapes_reach_every_kernel(emulated_cuda_build):
    kinds = [tuple(emulated_cuda_build.chunked_kernels(b, d, length, n, 8)) for b, d, n, length in CHUNKED_SHAPES]
    assert {forward for forward, _ in kinds} == {"fused", "per pass"}
    assert {backward for _, backward in kinds} == {"fused", "fused passes 1-2", "per pass"}


# every shape in float64; float32 and bf16 (the kernels' float accumulation, bf16 inputs) on the small ones, the
# whole fused backward's first among them
CHUNKED_CASES = [(shape, F64) for shape in CHUNKED_SHAPES] + [
    (shape, dtype) for dtype in (torch.float32, torch.bfloat16) for shape in (*CHUNKED_SHAPES[:3], CHUNKED_SHAPES[4])]


@pytest.mark.parametrize("shape,dtype", CHUNKED_CASES, ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_emulated_cuda_chunked_scan_matches_reference(emulated_cuda, emulated_cuda_build, monkeypatch, shape, dtype):
    """Trees with edges of at most 3 positions run on the chunked kernels, forward and backward, against the float64
    reference: hand-made trees that cross chunk boundaries every way, and random minimum spanning trees."""
    assert emulated_cuda_build.scan_chunk() == 8 and emulated_cuda_build.max_span() == 3
    calls = chunked_calls(emulated_cuda_build, monkeypatch)
    batch, d, n, length = shape
    inputs = random_inputs(batch, d, n, length, F64, seed=length + n)
    tree = short_edge_tree(batch, length, seed=n)
    if dtype == torch.bfloat16:
        got = run_scan(native.tree_scan, [x.to(dtype) for x in inputs], tree)
        ref = run_scan(tree_scan_ref, [x.to(dtype).double() for x in inputs], tree)
        for name, a, b in zip(NAMES, got, ref):
            assert torch.isfinite(a).all(), name
            assert (a - b).norm() <= 1e-2 * b.norm() + 1e-6, name
    else:
        assert_close(run_scan(native.tree_scan, [x.to(dtype) for x in inputs], tree), run_scan(tree_scan_ref, inputs, tree),
                     *TOL[dtype])
    assert calls == ["forward_chunked", "backward_chunked"]


# (batch, L, H, P, G, N): two groups, padding channels, N = 128, L around the chunk
CHUNKED_MAMBA2_SHAPES = [(2, 17, 4, 3, 2, 5), (1, 8, 2, 2, 1, 128), (2, 1, 2, 3, 1, 4)]


@pytest.mark.parametrize("shape", CHUNKED_MAMBA2_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_cuda_chunked_mamba2_scan_matches_reference(emulated_cuda, emulated_cuda_build, monkeypatch, shape):
    """The Mamba-2 layout (a scalar decay per head, grouped B and C) on the chunked kernels, gradients included."""
    calls = chunked_calls(emulated_cuda_build, monkeypatch)
    batch, length, heads, head_dim, groups, n = shape
    g = torch.Generator().manual_seed(length)
    x = torch.randn(batch, length, heads, head_dim, generator=g, dtype=F64)
    dt = torch.nn.functional.softplus(torch.randn(batch, length, heads, generator=g, dtype=F64))
    A = -torch.rand(heads, generator=g, dtype=F64) - 0.5
    B, C = (torch.randn(batch, length, groups, n, generator=g, dtype=F64) for _ in range(2))
    tree = short_edge_tree(batch, length, seed=length)
    gr = torch.randn(batch, heads, head_dim, n, generator=g, dtype=F64)
    results = []
    for scan in (mamba2.tree_scan, mamba2.tree_scan_ref):
        leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C)]
        y, root = scan(*leaves, tree, return_root_state=True)
        (y.square().sum() + (root * gr).sum()).backward()
        results.append([y.detach(), root.detach()] + [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves])
    for name, a, b in zip(("y", "root", "dx", "ddt", "dA", "dB", "dC"), *results):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    assert calls == ["mamba2_forward_chunked", "mamba2_backward_chunked"]
