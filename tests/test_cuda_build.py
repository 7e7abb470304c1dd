"""CI compile check: nvcc builds the CUDA tree-scan extension from the shipped sources (it cannot run here
without a GPU; tests/test_native_cuda.py runs it where one exists). Skipped where no CUDA toolkit is found."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cuda_home() -> Path | None:
    for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").is_file():
            return Path(candidate)
    nvcc = shutil.which("nvcc")
    return Path(nvcc).resolve().parents[1] if nvcc else None


@pytest.mark.slow
@pytest.mark.skipif(cuda_home() is None, reason="no CUDA toolkit (nvcc) on this machine")
def test_cuda_extension_compiles(tmp_path):
    env = dict(
        os.environ,
        CUDA_HOME=str(cuda_home()),
        TORCH_CUDA_ARCH_LIST=os.environ.get("GROOTL_TEST_CUDA_ARCH", "9.0"),  # one arch keeps it to ~2 min
        TORCH_EXTENSIONS_DIR=str(tmp_path),  # a fresh cache: really compile
        MAX_JOBS=str(os.cpu_count() or 2),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "grootl.tree.native", "--cuda-only"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"nvcc build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    built = list(tmp_path.rglob("grootl_tree_cuda*.so"))
    assert built, f"no extension library under {tmp_path}: {proc.stdout}"
    assert "ok:" in proc.stdout
    objects = list(tmp_path.rglob("cuda.cuda.o"))
    assert objects and objects[0].stat().st_size > 0, "cuda.cu was not compiled by nvcc"
