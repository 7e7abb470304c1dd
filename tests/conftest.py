"""Shared test fixtures. Tests never download: tiny random models, assets in tests/assets/, and
../shared/data when it exists (tests that need it skip cleanly where it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never touch a hub; lm-eval, datasets and transformers read these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(1)  # one thread per xdist worker: the workers already fill the cores

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "tests" / "assets"
SHARED_DATA = REPO.parent / "shared" / "data"


# Files that take minutes, started first so that xdist's ``--dist loadfile`` does not leave them for last on one
# worker while the other idles (the rest follow in collection order).
SLOW_FILES = ("test_native_tsan.py", "test_cuda_build.py", "test_native_asan.py", "test_native_cuda.py",
              "test_native_ssd.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist would otherwise start the files with most tests first
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)  # stable: the order inside each file stays


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` (real tokenizer, offline benchmark splits); skips the test where absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present on this machine")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------ native kernels (tests/test_native*.py)
def _poisoned(*shape, dtype, device):
    """NaN for floats, an out-of-range value for ints: what an unwritten element would hold."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, 123 if dtype == torch.uint8 else -7, dtype=dtype, device=device)


@pytest.fixture
def poison_native_outputs(monkeypatch):
    """Every output the native kernels write is allocated poisoned, so an element a kernel forgets fails."""
    from grootl.tree import native

    monkeypatch.setattr(native, "_alloc", _poisoned)


@pytest.fixture(scope="session")
def cpu_kernels():
    """The C++ kernels, built (a failed build fails the test instead of falling back to PyTorch)."""
    import warnings

    from grootl.tree import native

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.available("cpu"), "the C++ kernels did not build"


@pytest.fixture(scope="session")
def emulated_cuda_build(cpu_kernels, tmp_path_factory):
    """kernels/cuda.cu's host code and kernels compiled for the CPU through tests/kernels/cuda_emulation.h."""
    from torch.utils import cpp_extension

    from grootl.tree import native

    here = REPO / "tests" / "kernels"
    # one build for all xdist workers: torch locks the directory while one of them compiles
    root = tmp_path_factory.getbasetemp()
    build = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "cuda_emulated"
    build.mkdir(exist_ok=True)
    return cpp_extension.load(
        name="grootl_cuda_emulated",
        sources=[str(here / "cuda_emulated.cpp")],
        extra_cflags=["-O1", "-std=c++20"],
        extra_include_paths=[str(native.KERNELS), str(here)],
        build_directory=str(build),
    )


@pytest.fixture
def emulated_cuda(emulated_cuda_build, monkeypatch):
    """The emulated CUDA extension serves CPU tensors in this test; the device its tensors live on."""
    from grootl.tree import native

    monkeypatch.setattr(native, "_module_for", lambda device: emulated_cuda_build)
    return "cpu"
