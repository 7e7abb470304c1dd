"""The emulated CUDA kernels under ThreadSanitizer (the harness: tests/sanitizers.py)."""

from sanitizers import check_kernels_under


def test_emulated_cuda_kernels_have_no_data_race(tmp_path):
    """No two threads of a block touch one word in the same phase unless both only read or both use atomics
    (a missing barrier, a shared-memory or scratch race)."""
    check_kernels_under("thread", tmp_path)
