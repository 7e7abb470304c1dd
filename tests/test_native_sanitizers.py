"""The emulated CUDA kernels (tests/kernels/cuda_emulation.h) built with ThreadSanitizer and AddressSanitizer: no
data race between the emulated GPU threads, no access outside a tensor, a shared array or the scratch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


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
