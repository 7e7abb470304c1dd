"""The emulated CUDA kernels under AddressSanitizer (the harness: tests/sanitizers.py)."""

from sanitizers import check_kernels_under


def test_emulated_cuda_kernels_stay_inside_their_memory(tmp_path):
    """No read or write outside a tensor, a shared array or the scratch."""
    check_kernels_under("address", tmp_path)
