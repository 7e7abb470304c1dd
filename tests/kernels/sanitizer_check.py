"""The emulated CUDA extension's kernels under a sanitizer, reported even where the numbers come out right:
``thread`` (a block's threads are OS threads there: a missing barrier, or two threads writing one word in the
same phase) or ``address`` (a read or write past a tensor, a shared array or the scratch). Run by
tests/sanitizers.py (tests/test_native_tsan.py, tests/test_native_asan.py) with the sanitizer's runtime preloaded:

    LD_PRELOAD=$(gcc -print-file-name=libtsan.so) python sanitizer_check.py thread BUILD_DIR

On a GPU the same calls run the real CUDA kernels, under NVIDIA's compute-sanitizer (scripts/gpu_check.sh):

    compute-sanitizer --tool racecheck --error-exitcode 1 python sanitizer_check.py cuda
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]
os.environ.pop("LD_PRELOAD", None)  # this process keeps the sanitizer; the compiler it starts must not

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

from grootl.tree import build_tree, graph, mamba2, native, tree_scan_ref  # noqa: E402
from scan_inputs import random_inputs  # noqa: E402

# N=16 (16 lanes), N=64 (32 lanes x 2), N=5 (idle lanes); D not a multiple of a block's channels
# the chunked kernels of (batch, D, N, L): a launch per pass (L=41), the fused kernel with the backward's pass 3
# apart (a block) and whole (three blocks)
SHAPES = [(2, 17, 16, 41), (1, 3, 64, 16), (3, 7, 5, 33)]
# the Mamba-2 scan (batch, L, H, P, G, N): two groups with padding channels; N=128 (32 lanes x 4) over two blocks
MAMBA2_SHAPES = [(2, 33, 4, 3, 2, 5), (1, 5, 2, 9, 1, 128)]


def extension(sanitizer: str, build_dir: Path):
    return cpp_extension.load(
        name=f"grootl_cuda_emulated_{sanitizer}_sanitizer",
        sources=[str(HERE / "cuda_emulated.cpp")],
        extra_cflags=["-O1", "-g", "-std=c++20", f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer",
                      "-DGROOTL_EMULATION_FLOAT32_ONLY"],
        extra_ldflags=[f"-fsanitize={sanitizer}"],
        extra_include_paths=[str(native.KERNELS), str(HERE)],
        build_directory=str(build_dir),
    )


def run(device: str) -> None:
    """Build trees on the device (from Mamba-1 and grouped features), plan trees made elsewhere, and scan forward
    and backward (Mamba-1 and Mamba-2 layouts, each on the chunked kernels for built trees and on the row-walking
    ones for a tree with long edges)."""
    for batch, d, n, length in SHAPES:
        u, delta, A, B, C = random_inputs(batch, d, n, length, torch.float32, seed=length, device=device)
        context = torch.tensor([length // 2, length, length - 3], device=device)[:batch]
        device_tree = native.build_tree(u, delta, B, context)
        os.environ["GROOTL_NATIVE"] = "0"
        torch_tree = build_tree(u, delta, B, context)  # no plan: the check and plan kernels make it
        del os.environ["GROOTL_NATIVE"]
        assert torch.equal(device_tree.parent, torch_tree.parent), "device tree != torch tree"
        if n == 5:  # manhattan sums in the features kernel, two passes over its (t, t - j) pairs (k = 5)
            wide = native.build_tree(u, delta, B, context, k=5, distance="manhattan")
            os.environ["GROOTL_NATIVE"] = "0"
            assert torch.equal(wide.parent, build_tree(u, delta, B, context, k=5, distance="manhattan").parent), "k=5"
            del os.environ["GROOTL_NATIVE"]
        a, b = torch.stack([u, delta], 1), torch.stack([B, B.flip(-1)], 1)  # two groups
        grouped = graph.build_grouped_tree(a, b, context)
        os.environ["GROOTL_NATIVE"] = "0"
        assert torch.equal(grouped.parent, graph.build_grouped_tree(a, b, context).parent), "grouped: device != torch"
        del os.environ["GROOTL_NATIVE"]
        # built trees (edges of at most 3 positions) run on the chunked kernels; a star (every node a child of the
        # root: long edges) on the row-walking ones
        star = torch.full((batch, length), length - 1, device=device)
        star[:, -1] = -1
        star = graph.Tree(star)
        for tree in (device_tree, torch_tree) + ((star,) if n == 16 else ()):
            leaves = [x.clone().requires_grad_() for x in (u, delta, A, B, C)]
            native.tree_scan(*leaves, tree).square().sum().backward()
            ref = [x.clone().requires_grad_() for x in (u, delta, A, B, C)]
            tree_scan_ref(*ref, tree).square().sum().backward()
            for a, b in zip(leaves, ref):
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
    for batch, length, heads, head_dim, groups, n in MAMBA2_SHAPES:
        g = torch.Generator().manual_seed(length)
        x = torch.randn(batch, length, heads, head_dim, generator=g)
        dt = torch.nn.functional.softplus(torch.randn(batch, length, heads, generator=g))
        A = -torch.rand(heads, generator=g) - 0.5
        B, C = (torch.randn(batch, length, groups, n, generator=g) for _ in range(2))
        inputs = [t.to(device) for t in (x, dt, A, B, C)]
        built = mamba2.build_tree(*inputs[:2], inputs[3], torch.tensor([length // 2, length], device=device)[:batch])
        star = torch.full((batch, length), length - 1, device=device)  # long edges: the row-walking kernels
        star[:, -1] = -1
        for tree in (built,) + ((graph.Tree(star),) if n == 5 else ()):
            grads = []
            for scan in (mamba2.tree_scan, mamba2.tree_scan_ref):
                leaves = [t.clone().requires_grad_() for t in inputs]
                scan(*leaves, tree).square().sum().backward()
                grads.append([t.grad for t in leaves])
            for a, b in zip(*grads):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    print("sanitizer check: kernels ran", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "cuda":
        run("cuda")
    else:
        emulated = extension(sys.argv[1], Path(sys.argv[2]))
        native._module_for = lambda device: emulated
        run("cpu")
