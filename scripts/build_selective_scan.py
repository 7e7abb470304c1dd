"""Build mamba-ssm's selective-scan CUDA kernel just in time from its source distribution, for this machine's
GPU only, so that ``scripts/bench_kernels.py`` can compare against ``selective_scan_fn`` where mamba-ssm is not
installed and no package index can be reached (the sdist is ~200 KB to carry; the wheel build compiles every
arch and takes far longer).

    python scripts/build_selective_scan.py mamba_ssm-2.3.2.post1.tar.gz --out /tmp/mamba_site
    PYTHONPATH=/tmp/mamba_site python scripts/bench_kernels.py --device cuda

``--out`` then holds ``selective_scan_cuda`` and a ``mamba_ssm`` package cut down to ``ops`` and ``utils``
(its ``__init__`` would import the whole model zoo). TORCH_CUDA_ARCH_LIST picks other archs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
from pathlib import Path

SOURCES = ["selective_scan.cpp"] + [
    f"selective_scan_{part}.cu"
    for part in (
        "fwd_fp32", "fwd_fp16", "fwd_bf16",
        "bwd_fp32_real", "bwd_fp32_complex", "bwd_fp16_real", "bwd_fp16_complex", "bwd_bf16_real", "bwd_bf16_complex",
    )
]
NVCC_FLAGS = [
    "-O3", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "-lineinfo",
]  # as mamba-ssm's setup.py builds it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sdist", type=Path, help="mamba_ssm-*.tar.gz")
    parser.add_argument("--out", type=Path, required=True, help="folder to put on PYTHONPATH")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not args.sdist.is_file():
        print(f"{args.sdist}: no such file", file=sys.stderr)
        return 1
    src = args.out / "src"
    with tarfile.open(args.sdist) as tar:
        tar.extractall(src, filter="data")
    (root,) = [p for p in src.iterdir() if (p / "csrc" / "selective_scan").is_dir()]
    package = args.out / "mamba_ssm"
    shutil.rmtree(package, ignore_errors=True)
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""mamba_ssm cut down to ops and utils (scripts/build_selective_scan.py)."""\n')
    for sub in ("ops", "utils"):
        shutil.copytree(root / "mamba_ssm" / sub, package / sub)

    from torch.utils import cpp_extension

    csrc = root / "csrc" / "selective_scan"
    cpp_extension.load(
        name="selective_scan_cuda",
        sources=[str(csrc / s) for s in SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=NVCC_FLAGS,
        extra_include_paths=[str(csrc)],
        build_directory=str(args.out),
        verbose=args.verbose,
    )
    print(f"built {args.out}/selective_scan_cuda*.so; use PYTHONPATH={args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
