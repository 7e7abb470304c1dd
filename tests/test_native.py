"""The native C++ tree kernels (kernels/cpu.cpp, grootl.tree.native) against the plain oracle ``tree_scan_ref``
and the PyTorch tree build, and how the extensions are built, cached and shipped. Every kernel output is
allocated NaN-filled (``poison_native_outputs``), so an element a kernel forgets to write fails the comparison."""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import json
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch

from grootl.tree import Tree, build_tree, chain_scan, graph, native, tree_scan, tree_scan_ref
from grootl.tree.scan import chain_tree_scan
from scan_inputs import random_inputs
from native_checks import (
    F32, F64, REPO, SHAPES, TOL, assert_close, bench_kernels, caterpillar, check_autocast_dtypes_make_no_copies,
    check_grouped_tree, check_half_precision, check_plans, check_runs_identical, check_ties_give_one_tree,
    grouped_inputs, plan_cases, random_tree, run_both, run_scan, torch_path,
)

pytestmark = pytest.mark.usefixtures("poison_native_outputs")


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


def test_cpu_autocast_dtypes_make_no_copies(cpu_kernels):
    check_autocast_dtypes_make_no_copies("cpu", (2, 19, 8, 40))


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


def test_build_cache_is_keyed_by_the_sources_and_the_install(monkeypatch, tmp_path):
    """The same sources in place keep their build; a changed source gets a new one; a second install (other
    path, same sources) gets its own, since torch would recompile a build whose command holds other paths."""
    names = {}
    for where in ("a", "b"):
        copy = tmp_path / where
        copy.mkdir()
        for f in native.KERNELS.iterdir():
            if f.is_file():
                (copy / f.name).write_bytes(f.read_bytes())
        monkeypatch.setattr(native, "KERNELS", copy)
        names[where] = native._extension_name("cpu")
        assert native._extension_name("cpu") == names[where]
    assert names["a"] != names["b"]
    (tmp_path / "b" / "tree_scan.h").write_text((tmp_path / "b" / "tree_scan.h").read_text() + "\n// changed\n")
    assert native._extension_name("cpu") not in names.values()


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "manhattan"])
def test_cpu_ties_give_one_tree(cpu_kernels, distance):
    check_ties_give_one_tree("cpu", distance)


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "manhattan"])
@pytest.mark.parametrize("groups", [2, 3])
def test_cpu_grouped_tree_equals_torch_and_kruskal(cpu_kernels, groups, distance):
    check_grouped_tree("cpu", groups, distance)


def test_grouped_build_benchmark_runs(cpu_kernels, monkeypatch, tmp_path):
    """A smoke run of scripts/bench_kernels.py --grouped on a tiny layout."""
    bench = bench_kernels()
    monkeypatch.setitem(bench.GROUPED, "tiny", (3, 8, 4))
    out = tmp_path / "grouped.json"
    argv = ["--grouped", "tiny", "--lengths", "40", "--batch", "2", "--repeats", "1", "--bytes-lengths", "64"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["G"], row["C"], row["N"], row["L"]) == (3, 8, 4, 40) and row["native_s"] > 0 and row["torch_s"] > 0
