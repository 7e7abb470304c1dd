"""Native tree-scan kernels (kernels/, grootl.tree.native) against the plain oracle ``tree_scan_ref`` and the
PyTorch tree build. Every kernel output is allocated NaN-filled here, so an element a kernel forgets to
write fails the comparison. GPU tests run the same checks on the CUDA kernels and skip without CUDA."""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import json
import os
import random
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from grootl.tree import Tree, build_tree, chain_scan, graph, native, tree_scan, tree_scan_ref
from grootl.tree.graph import heavy_last_preorder
from grootl.tree.scan import chain_tree_scan
from scan_inputs import random_inputs

REPO = Path(__file__).resolve().parents[1]
F64, F32 = torch.float64, torch.float32
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def poisoned(*shape, dtype, device):
    """NaN for floats, an out-of-range value for ints: what an unwritten element would hold."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, 123 if dtype == torch.uint8 else -7, dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(native, "_alloc", poisoned)


@pytest.fixture(scope="module")
def cpu_kernels():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed build is a failure here, not a fallback
        assert native.available("cpu"), "the C++ kernels did not build"


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


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_scan_matches_reference_on_built_trees(cpu_kernels, shape, dtype):
    batch, d, n, length = shape
    inputs = random_inputs(batch, d, n, length, dtype, seed=length)
    # per-row context lengths covering 0, 1, 2 and L
    context = torch.tensor([[0, 1, 2, length][i % 4] if i < 4 else length // 2 for i in range(batch)])
    tree = build_tree(*inputs[:2], inputs[3], context)
    assert_close(*run_both(inputs, tree), *TOL[dtype])


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_cpu_scan_matches_reference_on_arbitrary_trees(cpu_kernels, dtype):
    inputs = random_inputs(3, 5, 4, 71, dtype, seed=3)
    assert_close(*run_both(inputs, random_tree(3, 71, seed=5)), *TOL[dtype])


def test_cpu_scan_deep_stack(cpu_kernels):
    tree = caterpillar(101)
    inputs = random_inputs(1, 6, 3, 101, F64, seed=4)
    assert_close(*run_both(inputs, tree), *TOL[F64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_cpu_scan_half_precision(cpu_kernels, dtype):
    check_half_precision("cpu", (2, 19, 8, 40), dtype)


def test_cpu_scan_is_deterministic(cpu_kernels):
    check_runs_identical("cpu", (2, 40, 16, 50))


def chain_tree_ref(modulation):
    """The merge of the two scans written out with the oracle: chain + modulation * tree, and its last state."""
    def scan(u, delta, A, B, C, tree, return_root_state=False):
        chain = Tree.chain(u.shape[0], u.shape[-1])
        y, h = tree_scan_ref(u, delta, A, B, C, chain, return_root_state=True)
        y_tree, H = tree_scan_ref(u, delta, A, B, C, tree, return_root_state=True)
        return y + modulation * y_tree, h + modulation * H
    return scan


def chain_tree_native(modulation):
    def scan(u, delta, A, B, C, tree, return_root_state=False):
        assert native.serves_chain_tree(u.device)
        return chain_tree_scan(u, delta, A, B, C, tree, modulation, return_last_state=return_root_state)
    return scan


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
def test_cpu_chain_tree_scan_matches_reference(cpu_kernels, shape, dtype):
    """The one-call chain + modulation * tree scan against the oracle on built trees (per-row prompts 0, 1, 2,
    L) and on arbitrary trees in random DFS preorders, gradients through y and the last state included; and
    chain_scan, which runs on it with modulation 0."""
    batch, d, n, length = shape
    inputs = random_inputs(batch, d, n, length, dtype, seed=length + 1)
    context = torch.tensor([[0, 1, 2, length][i % 4] for i in range(batch)])
    for tree, modulation in ((build_tree(*inputs[:2], inputs[3], context), 0.3),
                             (random_tree(batch, length, seed=length), 1.7)):
        ours = run_scan(chain_tree_native(modulation), inputs, tree)
        assert_close(ours, run_scan(chain_tree_ref(modulation), inputs, tree), *TOL[dtype])
    # modulation 0: the same kernel, tree skipped, serves chain_scan
    chain = Tree.chain(batch, length)
    ours = run_scan(lambda *a, return_root_state: chain_scan(*a[:5], return_last_state=return_root_state), inputs, chain)
    assert_close(ours, run_scan(tree_scan_ref, inputs, chain), *TOL[dtype])


def test_cpu_chain_tree_scan_equals_the_two_scans(cpu_kernels):
    """The one-call kernel, the two native scan kernels and the PyTorch path agree (bf16 inputs: float32 inside)."""
    inputs = random_inputs(2, 19, 8, 40, torch.bfloat16, seed=9)
    tree = random_tree(2, 40, seed=2)
    ours = run_scan(chain_tree_native(0.3), inputs, tree)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "serves_chain_tree", lambda device: False)
        two_calls = run_scan(lambda *a, **k: chain_tree_scan(*a, 0.3, return_last_state=True), inputs, tree)
    torch_out = torch_path(run_scan, lambda *a, **k: chain_tree_scan(*a, 0.3, return_last_state=True), inputs, tree)
    for other in (two_calls, torch_out):
        assert_close(ours, other, 2e-2, 2e-2)


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "manhattan"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_cpu_tree_equals_torch_tree(cpu_kernels, distance, k):
    batch, length = 5, 41
    u, delta, _, B, _ = random_inputs(batch, 9, 4, length, F32, seed=k)
    context = torch.tensor([0, 1, 2, length, 30])
    start = torch.tensor([0, 0, 0, 3, 10])  # left padding, kept out of the k-neighbour edges
    ours = native.build_tree(u, delta, B, context, k=k, distance=distance, start=start)
    theirs = torch_path(build_tree, u, delta, B, context, k=k, distance=distance, start=start)
    assert torch.equal(ours.parent, theirs.parent)
    assert torch.equal(ours.order, theirs.order)


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


@pytest.mark.parametrize("length", [1, 2, 31, 32, 33, 200])
def test_cpu_plans_match_stack_simulation(cpu_kernels, length):
    check_plans("cpu", plan_cases("cpu", length=length))


def test_cpu_tree_single_position_and_ties(cpu_kernels):
    one = native.build_tree(*[torch.ones(2, 3, 1)] * 3, torch.tensor([1, 0]))
    assert one.parent.tolist() == [[-1], [-1]] and one.order.tolist() == [[0], [0]]
    # all features equal: every weight ties, the smaller edge id wins, exactly as in the torch build
    x = torch.ones(1, 4, 12)
    ours = native.build_tree(x, x, x[:, :2], torch.tensor([12]))
    theirs = torch_path(build_tree, x, x, x[:, :2], torch.tensor([12]))
    assert torch.equal(ours.parent, theirs.parent) and torch.equal(ours.order, theirs.order)


def test_cpu_bad_tree_is_a_clear_error(cpu_kernels):
    inputs = random_inputs(2, 3, 2, 6)
    chain = Tree.chain(2, 6)
    shuffled = chain.order.clone()
    shuffled[1, 1:] = shuffled[1, 1:].flip(0)  # children before parents in row 1
    with pytest.raises(ValueError, match="tree.order row 1 is not a DFS preorder"):
        native.tree_scan(*inputs, Tree(chain.parent, shuffled))
    parent = chain.parent.clone()
    parent[0, 2] = 9
    with pytest.raises(ValueError, match="tree.parent row 0"):
        native.tree_scan(*inputs, Tree(parent, chain.order))


def test_public_api_dispatches_to_native(cpu_kernels, monkeypatch):
    calls = []
    for name in ("_tree_scan", "_build_tree"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    u, delta, A, B, C = random_inputs(2, 3, 4, 9)
    tree = build_tree(u, delta, B, torch.tensor([5, 9]))
    y = tree_scan(u, delta, A, B, C, tree)
    assert calls == ["_build_tree", "_tree_scan"]
    torch.testing.assert_close(torch_path(tree_scan, u, delta, A, B, C, tree), y)
    assert calls == ["_build_tree", "_tree_scan"], "GROOTL_NATIVE=0 must take the PyTorch path"
    a, b = grouped_inputs(F32, 2)
    monkeypatch.setattr(native, "_build_grouped_tree", lambda *a, _real=native._build_grouped_tree:
                        calls.append("_build_grouped_tree") or _real(*a))
    grouped = graph.build_grouped_tree(a, b, torch.full((6,), 40))
    assert calls[2:] == ["_build_grouped_tree"]
    assert torch.equal(torch_path(graph.build_grouped_tree, a, b, torch.full((6,), 40)).parent, grouped.parent)
    assert calls[2:] == ["_build_grouped_tree"], "GROOTL_NATIVE=0 must take the PyTorch path"


def test_native_disabled_by_env(monkeypatch):
    monkeypatch.setenv("GROOTL_NATIVE", "0")
    assert not native.available("cpu")
    with pytest.raises(RuntimeError, match="GROOTL_NATIVE=0"):
        native.tree_scan(*random_inputs(1, 2, 2, 3), Tree.chain(1, 3))


def test_failed_build_warns_once_with_compiler_output(monkeypatch):
    def broken(kind, verbose=False):
        raise RuntimeError("Error building extension\ncpu.cpp:12:3: error: expected ';' before '}' token")

    monkeypatch.setattr(native, "_compile", broken)
    monkeypatch.setattr(native, "_modules", {})
    with pytest.warns(RuntimeWarning, match=r"(?s)using the PyTorch path.*expected ';'"):
        assert not native.available("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native.available("cpu")  # no second warning


def test_real_compiler_error_is_reported(monkeypatch, tmp_path):
    broken = tmp_path / "kernels"
    broken.mkdir()
    (broken / "cpu.cpp").write_text('#include "no_such_header.h"\n' + (native.KERNELS / "cpu.cpp").read_text())
    monkeypatch.setattr(native, "KERNELS", broken)
    monkeypatch.setattr(native, "_modules", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match=r"(?s)could not build the native cpu.*no_such_header.h"):
        assert native.load("cpu") is None


def test_kernel_sources_ship_with_the_package():
    files = importlib.resources.files("grootl.kernels")
    for name in (*native.CPU_SOURCES, *native.CUDA_SOURCES, "tree_scan.h", "tree_build.h"):
        assert files.joinpath(name).is_file(), name
    assert (native.KERNELS / "tree_scan.h").is_file()


def test_wheel_ships_kernel_sources(tmp_path):
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("grootl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (*native.CPU_SOURCES, *native.CUDA_SOURCES, "tree_scan.h", "tree_build.h"):
        assert f"grootl/kernels/{name}" in names, name


def test_build_kernels_command(cpu_kernels, capsys):
    assert native.main(["--cpu-only"]) == 0
    assert "ok:" in capsys.readouterr().out


def test_first_compile_says_so_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing cached here
    monkeypatch.setattr(native, "_modules", {})
    monkeypatch.setattr(native, "_compile", lambda kind: argparse.Namespace(kind=kind))
    assert native.load("cpu").kind == "cpu" and native.load("cpu").kind == "cpu"
    err = capsys.readouterr().err
    assert err.count("compiling the native cpu kernels once") == 1 and str(tmp_path) in err


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


def test_build_cache_is_keyed_by_the_sources_not_the_path(monkeypatch, tmp_path):
    names = []
    for where in ("a", "b"):
        copy = tmp_path / where
        copy.mkdir()
        for f in native.KERNELS.iterdir():
            if f.is_file():
                (copy / f.name).write_bytes(f.read_bytes())
        monkeypatch.setattr(native, "KERNELS", copy)
        names.append(native._extension_name("cpu"))
    assert names[0] == names[1]
    (tmp_path / "b" / "tree_scan.h").write_text((tmp_path / "b" / "tree_scan.h").read_text() + "\n// changed\n")
    assert native._extension_name("cpu") != names[0]


# ------------------------------------------------------------------------------------- CUDA extension
# The same checks run the CUDA extension (kernels/cuda.cu: host code and kernels) on a GPU where there is
# one, and on every machine through tests/kernels/cuda_emulation.h, with CPU threads standing in for the GPU's
# (smaller shapes there: an emulated warp is 32 OS threads).


@pytest.fixture(scope="module")
def emulated_cuda_build(cpu_kernels, tmp_path_factory):
    from torch.utils import cpp_extension

    here = Path(__file__).parent / "kernels"
    return cpp_extension.load(
        name="grootl_cuda_emulated",
        sources=[str(here / "cuda_emulated.cpp")],
        extra_cflags=["-O1", "-std=c++20"],
        extra_include_paths=[str(native.KERNELS), str(here)],
        build_directory=str(tmp_path_factory.mktemp("cuda_emulated")),
    )


@pytest.fixture
def emulated_cuda(emulated_cuda_build, monkeypatch):
    """The emulated CUDA extension serves CPU tensors in this test; the device its tensors live on."""
    monkeypatch.setattr(native, "_module_for", lambda device: emulated_cuda_build)
    return "cpu"


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


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "manhattan"])
def test_cpu_ties_give_one_tree(cpu_kernels, distance):
    check_ties_give_one_tree("cpu", distance)


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


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "manhattan"])
@pytest.mark.parametrize("groups", [2, 3])
def test_cpu_grouped_tree_equals_torch_and_kruskal(cpu_kernels, groups, distance):
    check_grouped_tree("cpu", groups, distance)


def check_runs_identical(device, shape):
    batch, d, n, length = shape
    inputs = random_inputs(batch, d, n, length, F32, seed=5, device=device)
    tree = native.build_tree(inputs[0], inputs[1], inputs[3], torch.tensor([length // 2, length], device=device))
    again = native.build_tree(inputs[0], inputs[1], inputs[3], torch.tensor([length // 2, length], device=device))
    assert torch.equal(tree.parent, again.parent) and torch.equal(tree.order, again.order)
    first, again = (run_scan(native.tree_scan, inputs, tree, device) for _ in range(2))
    for name, a, b in zip(NAMES, first, again):
        assert torch.equal(a, b), name


# N=5: 8 lanes, 3 idle; N=16: 16 lanes; N=64: 32 lanes x 2 states; D not a multiple of a block's channels
EMULATED_SHAPES = [(3, 7, 5, 33), (2, 17, 16, 67), (1, 3, 64, 20)]


@pytest.mark.parametrize("shape", EMULATED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_cuda_scan_matches_reference(emulated_cuda, shape):
    check_scan_matches_reference(emulated_cuda, shape)


def test_emulated_cuda_deep_stack(emulated_cuda):
    check_deep_stack(emulated_cuda, 101)


def test_emulated_cuda_bf16(emulated_cuda):
    check_half_precision(emulated_cuda, (2, 20, 16, 40))


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


def gcc_file(name: str) -> str | None:
    """A runtime library of the gcc on PATH (e.g. a sanitizer's), where there is one."""
    try:
        found = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return found if Path(found).is_absolute() and Path(found).is_file() else None


# per sanitizer: its name in reports, the runtimes to preload (libstdc++ too for ASan, so that it can intercept
# C++ throws), its options variable and options
SANITIZERS = {
    "thread": ("ThreadSanitizer", ["libtsan.so"], "TSAN_OPTIONS",
               "ignore_noninstrumented_modules=1 report_signal_unsafe=0 halt_on_error=0"),
    "address": ("AddressSanitizer", ["libasan.so", "libstdc++.so"], "ASAN_OPTIONS", "detect_leaks=0"),
}


@pytest.mark.parametrize("sanitizer", SANITIZERS)
def test_emulated_cuda_kernels_under_sanitizer(tmp_path, sanitizer):
    """Every kernel (build, plan, scan forward and backward) instrumented. thread: no two threads touch one
    word in the same phase unless both only read or both use atomics. address: no access outside a tensor,
    a shared array or the scratch."""
    tag, libraries, options_variable, options = SANITIZERS[sanitizer]
    preload = [gcc_file(name) for name in libraries]
    if None in preload:
        pytest.skip(f"no {tag} runtime ({', '.join(libraries)}) for this gcc")
    env = {**os.environ, "LD_PRELOAD": " ".join(preload), options_variable: options}
    script = [sys.executable, str(REPO / "tests/kernels/sanitizer_check.py"), sanitizer, str(tmp_path)]
    done = subprocess.run(script, capture_output=True, text=True, env=env)
    output = done.stdout + done.stderr
    if f"FATAL: {tag}" in output or f"{tag}: CHECK failed" in output:
        pytest.skip(f"{tag} cannot start here: {output.strip().splitlines()[-1]}")
    for report in (f"WARNING: {tag}", f"ERROR: {tag}"):
        assert report not in output, output[output.index(report):][:6000]
    assert done.returncode == 0 and "sanitizer check: kernels ran" in output, output[-4000:]


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


def bench_kernels():
    """scripts/bench_kernels.py as a module."""
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "scripts" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_grouped_build_benchmark_runs(cpu_kernels, monkeypatch, tmp_path):
    """A smoke run of scripts/bench_kernels.py --grouped on a tiny layout."""
    bench = bench_kernels()
    monkeypatch.setitem(bench.GROUPED, "tiny", (3, 8, 4))
    out = tmp_path / "grouped.json"
    argv = ["--grouped", "tiny", "--lengths", "40", "--batch", "2", "--repeats", "1", "--bytes-lengths", "64"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["G"], row["C"], row["N"], row["L"]) == (3, 8, 4, 40) and row["native_s"] > 0 and row["torch_s"] > 0


def test_gpu_benchmark_runs_on_the_emulated_extension(emulated_cuda, monkeypatch):
    """A smoke run of scripts/bench_kernels.py's GPU part, so a GPU session does not find its bugs."""
    bench = bench_kernels()
    monkeypatch.setitem(bench.SIZES, "tiny", (32, 16))
    args = argparse.Namespace(sizes=["tiny"], batch=[1], lengths=[33], repeats=1)
    (row,), extra = bench.bench_cuda(args, device=emulated_cuda)
    assert row["build_s"] > 0 and row["ours_s"] > 0 and row["chain_s"] > 0 and row["bandwidth_fraction"] > 0
    assert extra["copy_bandwidth_gb_s"] > 0


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
