"""scripts/bench_kernels.py's bytes model: its minimum against the bytes of a real call's tensors, and a run."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from grootl.tree import native
from grootl.tree.graph import DISTANCES

REPO = Path(__file__).resolve().parents[1]
NATIVE_CPU = pytest.mark.skipif(not native.available("cpu"), reason="no native CPU kernel")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "scripts" / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@NATIVE_CPU
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_minimum_bytes_equal_the_tensors_of_a_real_call(bench, precision):
    """Each call's minimum is the bytes of the tensors the caller passes and gets back, counted on a real build
    and a real scan forward + backward with the mixer's dtypes (bf16: u, B, C in bf16, delta in float32)."""
    batch, d, n, length = 2, 5, 3, 37
    g = torch.Generator().manual_seed(0)
    lowp = torch.bfloat16 if precision == "bf16" else torch.float32
    u = torch.randn(batch, d, length, generator=g).to(lowp)
    delta = torch.rand(batch, d, length, generator=g)
    A = -torch.rand(d, n, generator=g)
    B, C = (torch.randn(batch, n, length, generator=g).to(lowp) for _ in range(2))
    context = torch.tensor([length // 2, length])
    start = torch.zeros_like(context)
    built = torch.ops.grootl.build_tree(u.float(), delta, B.float(), context, start, 3, DISTANCES.index("cosine"))
    tree = native.build_tree(u, delta, B, context)
    xs = [x.detach().requires_grad_() for x in (u, delta, A, B, C)]
    y = native.tree_scan(*xs, tree)
    y.backward(torch.ones_like(y))
    least = bench.minimum_bytes(batch, d, n, length, precision)
    assert least["build"] == nbytes(u, delta, B, *built)
    assert least["plan"] == nbytes(*built)
    assert least["forward"] == nbytes(u, delta, A, B, C, *built) + nbytes(y)
    grads = [x.grad for x in xs]
    assert least["backward"] == nbytes(u, delta, A, B, C, *built) + nbytes(y) + nbytes(*grads)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_model_takes_the_kernels_dtype(bench, precision):
    """The model's kernel dtype for u, B, C is the one native._scan_dtype picks for the caller's tensors."""
    dtypes = {4: torch.float32, 2: torch.bfloat16}
    u, B, C = (torch.zeros(1, dtype=dtypes[bench.PRECISIONS[precision][x]]) for x in "uBC")
    assert torch.empty(0, dtype=native._scan_dtype(u, B, C)).element_size() == bench.kernel_bytes(precision)


def test_bytes_only_run_writes_the_model(bench, tmp_path):
    out = tmp_path / "bytes.json"
    assert bench.main(["--bytes-only", "--bytes-batch", "1", "8", "--bytes-lengths", "64", "--out", str(out)]) == 0
    model = json.loads(out.read_text())["meta"]["bytes_model"]
    assert [(r["batch"], r["precision"]) for r in model["rows"]] == [(1, "fp32"), (1, "bf16"), (8, "fp32"), (8, "bf16")]
    for row in model["rows"]:
        for call in row["calls"].values():  # what a call moves is never below the bytes it must read and write
            assert call["bytes"] >= call["minimum"] > 0
            assert call["bytes"] == sum(x["read"] + x["written"] for x in call["detail"])
        assert row["scan_fwd_bwd"]["bytes"] == row["calls"]["forward"]["bytes"] + row["calls"]["backward"]["bytes"]
    rows = {(r["batch"], r["precision"]): r for r in model["rows"]}
    # under bf16 the slots and delta stay float32: more bytes over a smaller minimum
    assert rows[8, "bf16"]["scan_fwd_bwd"]["ratio"] > rows[8, "fp32"]["scan_fwd_bwd"]["ratio"]
    assert rows[8, "fp32"]["scan_threads"] == 8 * rows[1, "fp32"]["scan_threads"]
