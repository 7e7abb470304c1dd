"""The native Mamba-2 tree scan (``grootl::mamba2_tree_scan``: kernels/tree_scan.h with a scalar decay per head,
grouped B and C) against the plain oracle ``grootl.tree.mamba2.tree_scan_ref`` in float64 on fresh random inputs:
y, the root state and all five gradients, every kernel output allocated NaN-filled, on the CPU kernel and on the
emulated CUDA build (CPU threads standing in for the GPU's)."""

from __future__ import annotations

import json

import pytest
import torch
from test_mamba2_tree import random_inputs  # first: it imports transformers' Mamba-2 before grootl hooks transformers

from grootl.tree import Tree, native
from grootl.tree import mamba2 as m2
from native_checks import bench_kernels, caterpillar, random_tree, torch_path

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
NAMES = ("y", "root", "dx", "ddt", "dA", "dB", "dC")

pytestmark = pytest.mark.usefixtures("poison_native_outputs")


def ssd_inputs(*shape, seed=0):
    """x, dt (after softplus), A (negative, one per head), B, C in float64 for (batch, L, H, P, G, N)."""
    return list(random_inputs(*shape, seed=seed))


def run_scan(fn, inputs, tree):
    """y, root and the gradients of a fixed random loss through both, in float64."""
    gen = torch.Generator().manual_seed(1)
    x, B = inputs[0], inputs[3]
    gy = torch.randn(x.shape, generator=gen, dtype=F64)
    gr = torch.randn(x.shape[0], x.shape[2], x.shape[3], B.shape[3], generator=gen, dtype=F64)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y, root = fn(*leaves, tree, return_root_state=True)
    loss = (y.double() * gy).sum() + (root.double() * gr).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # L = 1: the oracle never reads A
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    return [t.detach().double() for t in (y, root, *grads)]


def native_scan(*args, **kwargs):
    """grootl.tree.mamba2.tree_scan, failing unless the native Mamba-2 op ran."""
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        real = native._mamba2_tree_scan
        mp.setattr(native, "_mamba2_tree_scan", lambda *a: calls.append(1) or real(*a))
        out = m2.tree_scan(*args, **kwargs)
    assert calls, "the native Mamba-2 scan did not run"
    return out


def assert_close(got, want, rtol, atol):
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert torch.isfinite(a).all(), f"{name}: unwritten (NaN) elements"
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, b.abs().max().item()), msg=name)


def check_against_oracle(inputs, tree, dtype):
    """The native op on ``dtype`` inputs against the float64 oracle on the same (rounded) inputs."""
    low = [t.to(dtype) for t in inputs]
    got = run_scan(native_scan, low, tree)
    want = run_scan(m2.tree_scan_ref, [t.double() for t in low], tree)
    if dtype == F64:
        assert_close(got, want, 1e-10, 1e-10)
    elif dtype == F32:
        assert_close(got, want, 2e-4, 2e-4)
    else:  # bf16 inputs and outputs, float32 inside
        for name, a, b in zip(NAMES, got, want, strict=True):
            assert torch.isfinite(a).all(), f"{name}: unwritten (NaN) elements"
            assert (a - b).norm() <= 1e-2 * b.norm() + 1e-12, name  # L = 1: dA is 0


def built_tree(inputs):
    """The MST of mamba2.build_tree with per-row prompts of 0, 1, L // 2 and L positions."""
    x, dt, _, B, _ = inputs
    batch, length = x.shape[:2]
    context = torch.tensor([[0, 1, length // 2, length][i % 4] for i in range(batch)])
    return torch_path(m2.build_tree, x, dt, B, context)


# (batch, L, H, P, G, N): L = 1, groups 1/2/4, N = 1/16/128 (short L for the big N), L > one backward chunk (32),
# P and H / G odd
SHAPES = [(1, 1, 2, 3, 1, 1), (2, 37, 4, 3, 2, 16), (3, 40, 8, 2, 4, 5), (2, 70, 3, 5, 1, 16), (1, 9, 4, 3, 2, 128)]


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_mamba2_scan_matches_oracle_on_built_trees(cpu_kernels, shape, dtype):
    inputs = ssd_inputs(*shape, seed=shape[1])
    check_against_oracle(inputs, built_tree(inputs), dtype)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_cpu_mamba2_scan_matches_oracle_on_arbitrary_trees(cpu_kernels, groups):
    inputs = ssd_inputs(3, 45, 4, 3, groups, 6, seed=groups)
    check_against_oracle(inputs, random_tree(3, 45, seed=groups), F64)


def test_cpu_mamba2_scan_deep_stack(cpu_kernels):
    """About L/2 child sums open at once: deeper than a backward chunk."""
    check_against_oracle(ssd_inputs(1, 81, 2, 3, 2, 4, seed=2), caterpillar(81), F64)


def test_cpu_mamba2_scan_equals_the_folded_scan(cpu_kernels):
    """The same numbers as the Mamba-1 kernel on the folded layout (the route it replaces), float32."""
    inputs = [t.float() for t in ssd_inputs(2, 50, 6, 4, 2, 16, seed=7)]
    tree = built_tree(inputs)

    def folded(*args, return_root_state):
        return m2._folded_tree_scan(*args, return_root_state)

    for name, a, b in zip(NAMES, run_scan(native_scan, inputs, tree), run_scan(folded, inputs, tree), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()), msg=name)


def test_cpu_mamba2_scan_is_deterministic(cpu_kernels):
    inputs = ssd_inputs(2, 40, 4, 8, 2, 16, seed=3)
    tree = built_tree(inputs)
    first, again = (run_scan(native_scan, [t.float() for t in inputs], tree) for _ in range(2))
    for name, a, b in zip(NAMES, first, again, strict=True):
        assert torch.equal(a, b), name


def test_mamba2_scan_is_once_differentiable(cpu_kernels):
    inputs = [t.requires_grad_() for t in ssd_inputs(1, 6, 2, 2, 1, 3)]
    y = native_scan(*inputs, Tree.chain(1, 6))
    (gx,) = torch.autograd.grad(y.square().sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        gx.sum().backward()


def test_mamba2_scan_under_compile_fullgraph(cpu_kernels):
    """torch.compile(fullgraph=True) traces through the op (its fake implementation) and gives eager's numbers."""
    torch._dynamo.reset()
    inputs = [t.float() for t in ssd_inputs(2, 12, 4, 2, 2, 4, seed=1)]
    tree = built_tree(inputs)

    def loss(x, dt, A, B, C):
        y, root = m2.tree_scan(x, dt, A, B, C, tree, return_root_state=True, check_values=False)
        return y.square().sum() + root.sum()

    eager = [t.clone().requires_grad_() for t in inputs]
    compiled = [t.clone().requires_grad_() for t in inputs]
    want = loss(*eager)
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(*compiled)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, compiled), torch.autograd.grad(want, eager), strict=True):
        torch.testing.assert_close(a, b)


def test_mamba2_benchmark_runs(cpu_kernels, monkeypatch, tmp_path):
    """A smoke run of scripts/bench_kernels.py --mamba2 on a tiny layout."""
    bench = bench_kernels()
    monkeypatch.setitem(bench.MAMBA2, "tiny", (4, 3, 2, 8))
    out = tmp_path / "mamba2.json"
    argv = ["--mamba2", "tiny", "--lengths", "40", "--batch", "2", "--repeats", "1", "--bytes-lengths", "64"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert (row["H"], row["P"], row["G"], row["N"], row["L"]) == (4, 3, 2, 8, 40)
    assert row["native_s"] > 0 and row["folded_s"] > 0 and row["torch_s"] > 0 and "load_average" in row


# The emulated CUDA build (an emulated warp is 32 OS threads: small shapes). N = 5: 8 lanes, 3 idle, a group's 6
# channels in one block of 64 (padding channels); N = 16: 16 lanes, four groups; N = 128: 32 lanes x 4 states, a
# group's 18 channels over two blocks of 16.
EMULATED_CASES = [((1, 34, 4, 3, 2, 5), "built", F32), ((1, 12, 4, 5, 4, 16), "arbitrary", F64),
                  ((1, 6, 2, 9, 1, 128), "built", F64), ((1, 10, 2, 2, 1, 16), "built", BF16)]


@pytest.mark.parametrize("shape, tree, dtype", EMULATED_CASES, ids=["n5-g2-f32", "n16-g4-f64", "n128-f64", "n16-bf16"])
def test_emulated_cuda_mamba2_scan_matches_oracle(emulated_cuda, shape, tree, dtype):
    inputs = ssd_inputs(*shape, seed=shape[1])
    tree = built_tree(inputs) if tree == "built" else random_tree(shape[0], shape[1], seed=3)
    check_against_oracle(inputs, tree, dtype)
