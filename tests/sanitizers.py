"""The emulated CUDA kernels (tests/kernels/cuda_emulation.h) built with a sanitizer and run by
tests/kernels/sanitizer_check.py. One test file per sanitizer, so that xdist's ``--dist loadfile`` runs them on
different workers (each build and run takes minutes); conftest.py schedules them first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# per sanitizer: its name in reports, the runtimes to preload (libstdc++ too for ASan, so that it can intercept
# C++ throws), its options variable and options
SANITIZERS = {
    "thread": ("ThreadSanitizer", ["libtsan.so"], "TSAN_OPTIONS",
               "ignore_noninstrumented_modules=1 report_signal_unsafe=0 halt_on_error=0"),
    "address": ("AddressSanitizer", ["libasan.so", "libstdc++.so"], "ASAN_OPTIONS", "detect_leaks=0"),
}


def gcc_file(name: str) -> str | None:
    """A runtime library of the gcc on PATH (e.g. a sanitizer's), where there is one."""
    try:
        found = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return found if Path(found).is_absolute() and Path(found).is_file() else None


def check_kernels_under(sanitizer: str, build_dir: Path) -> None:
    """Builds the emulated kernels with ``sanitizer`` in ``build_dir``, runs every kernel (build, plan, scan
    forward and backward) and fails on any report; skips where the sanitizer's runtime is missing or cannot
    start on this machine."""
    tag, libraries, options_variable, options = SANITIZERS[sanitizer]
    preload = [gcc_file(name) for name in libraries]
    if None in preload:
        pytest.skip(f"no {tag} runtime ({', '.join(libraries)}) for this gcc")
    env = {**os.environ, "LD_PRELOAD": " ".join(preload), options_variable: options}
    script = [sys.executable, str(REPO / "tests/kernels/sanitizer_check.py"), sanitizer, str(build_dir)]
    done = subprocess.run(script, capture_output=True, text=True, env=env)
    output = done.stdout + done.stderr
    if f"FATAL: {tag}" in output or f"{tag}: CHECK failed" in output:
        pytest.skip(f"{tag} cannot start here: {output.strip().splitlines()[-1]}")
    for report in (f"WARNING: {tag}", f"ERROR: {tag}"):
        assert report not in output, output[output.index(report):][:6000]
    assert done.returncode == 0 and "sanitizer check: kernels ran" in output, output[-4000:]
