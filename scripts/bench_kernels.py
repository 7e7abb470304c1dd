"""Benchmark the native tree-scan kernels; prints a table and writes JSON.

CPU: the C++ kernel against the plain oracle ``tree_scan_ref`` and the PyTorch ``tree_scan``, forward +
backward, plus the tree build (C++ vs PyTorch). GPU (CUDA): tree build + tree scan forward + backward
against the same kernels on the chain and mamba_ssm's ``selective_scan_fn`` (when installed) on the same
inputs (called as the GrootL mixer calls them: ``check_values=False``), time and peak memory, and the fraction of the copy bandwidth the least traffic would need.

    python scripts/bench_kernels.py --device cpu --out benchmarks/kernels_cpu.json
    python scripts/bench_kernels.py --device cuda --out benchmarks/kernels_gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from grootl.tree import Tree, build_tree, native, tree_scan, tree_scan_ref

SIZES = {"130m": (1536, 16), "370m": (2048, 16)}  # Mamba d_inner, d_state


def inputs(batch, d, n, length, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, d, length, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(batch, d, length, generator=g) - 2)
    A = -torch.exp(torch.randn(d, n, generator=g) * 0.5)
    B, C = torch.randn(batch, n, length, generator=g), torch.randn(batch, n, length, generator=g)
    out = [x.to(device, dtype) for x in (u, delta, B, C)]
    return out[0], out[1], A.to(device), out[2], out[3]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """Median seconds over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_path(fn):
    """``fn`` with the native dispatch off (GROOTL_NATIVE=0 while it runs)."""

    def run(*args, **kwargs):
        saved = os.environ.get("GROOTL_NATIVE")
        os.environ["GROOTL_NATIVE"] = "0"
        try:
            return fn(*args, **kwargs)
        finally:
            if saved is None:
                del os.environ["GROOTL_NATIVE"]
            else:
                os.environ["GROOTL_NATIVE"] = saved

    return run


def fwd_bwd(scan, u, delta, A, B, C, tree):
    def run():
        xs = [x.detach().requires_grad_() for x in (u, delta, A, B, C)]
        y = scan(*xs, tree)
        y.backward(torch.ones_like(y))

    return run


def bench_cpu(args):
    rows = []
    for batch in args.batch:
        for length in args.lengths:
            d, n = SIZES[args.size]
            u, delta, A, B, C = inputs(batch, d, n, length, "cpu")
            context = torch.full((batch,), length // 2)
            tree = native.build_tree(u, delta, B, context)
            row = {"batch": batch, "L": length, "D": d, "N": n, "context": length // 2}
            row["build_native_s"] = timed(lambda: native.build_tree(u, delta, B, context), "cpu", args.repeats)
            row["build_torch_s"] = timed(lambda: torch_path(build_tree)(u, delta, B, context), "cpu", args.repeats)
            row["native_s"] = timed(fwd_bwd(native.tree_scan, u, delta, A, B, C, tree), "cpu", args.repeats)
            row["torch_s"] = timed(fwd_bwd(torch_path(tree_scan), u, delta, A, B, C, tree), "cpu", args.repeats)
            if not args.skip_ref:
                row["ref_s"] = timed(fwd_bwd(tree_scan_ref, u, delta, A, B, C, tree), "cpu", args.repeats)
                row["speedup_vs_ref"] = row["ref_s"] / row["native_s"]
            row["speedup_vs_torch"] = row["torch_s"] / row["native_s"]
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def copy_bandwidth(device: str, numel: int = 2**28) -> float:
    """Bytes per second of a large on-device copy (read + write): the practical peak."""
    x = torch.empty(numel, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    seconds = timed(lambda: y.copy_(x), device, 5)
    return 2 * x.numel() * x.element_size() / seconds


def bench_cuda(args, device: str = "cuda"):
    """Per shape, ours: the tree build (with its plan), the checked plan of a tree from elsewhere and the
    forward apart, then build + forward + backward; the same kernels on the chain (the plain Mamba recurrence,
    no build): the overhead of the tree alone; mamba_ssm's selective_scan_fn forward + backward when
    installed. Peak memory is what a call allocates above its inputs. (``device`` is "cpu" only in the
    smoke test that runs this with the emulated CUDA extension.)"""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        selective_scan_fn = None
        print("mamba_ssm is not installed: no selective_scan_fn baseline (the chain baseline still runs)")
    peak_bw = copy_bandwidth(device, 2**28 if device == "cuda" else 2**20)
    rows = []
    for size in args.sizes:
        d, n = SIZES[size]
        for batch in args.batch:
            for length in args.lengths:
                u, delta, A, B, C = inputs(batch, d, n, length, device, torch.bfloat16)
                context = torch.full((batch,), length // 2, device=device)
                build = partial(native.build_tree, check_values=False)  # as the GrootL mixer calls them
                scan = partial(native.tree_scan, check_values=False)
                tree = build(u, delta, B, context)
                chain = Tree.chain(batch, length, device=device)
                row = {"size": size, "batch": batch, "L": length, "D": d, "N": n, "dtype": "bf16"}

                def ours():
                    xs = [x.detach().requires_grad_() for x in (u, delta, A, B, C)]
                    y = scan(*xs, build(xs[0].detach(), xs[1].detach(), xs[3].detach(), context))
                    y.backward(torch.ones_like(y))

                row["build_s"] = timed(lambda: build(u, delta, B, context), device, args.repeats)
                row["checked_plan_s"] = timed(lambda: native._Plan.checked(tree.parent, tree.order), device, args.repeats)
                with torch.no_grad():  # scratch is sized from L alone: no host sync
                    row["forward_s"] = timed(lambda: scan(u, delta, A, B, C, tree), device, args.repeats)
                row["ours_s"], row["ours_peak_mib"] = timed_peak(ours, args.repeats, device)
                row["chain_s"], row["chain_peak_mib"] = timed_peak(fwd_bwd(scan, u, delta, A, B, C, chain), args.repeats, device)
                row["ours_vs_chain"] = row["ours_s"] / row["chain_s"]
                # the least traffic a fused fwd + bwd needs: read u, delta, B, C (twice: forward and backward)
                # and gy, write y, du, d_delta, dB, dC
                elems = 2 * (2 * batch * d * length + 2 * batch * n * length) + batch * d * length
                elems += 3 * batch * d * length + 2 * batch * n * length
                row["bandwidth_fraction"] = elems * u.element_size() / row["ours_s"] / peak_bw
                if selective_scan_fn is not None:

                    def theirs():
                        xs = [x.detach().requires_grad_() for x in (u, delta, A, B, C)]
                        y = selective_scan_fn(xs[0], xs[1], xs[2], xs[3], xs[4])
                        y.backward(torch.ones_like(y))

                    row["selective_scan_s"], row["selective_scan_peak_mib"] = timed_peak(theirs, args.repeats, device)
                    row["time_ratio"] = row["ours_s"] / row["selective_scan_s"]
                    row["memory_ratio"] = row["ours_peak_mib"] / row["selective_scan_peak_mib"]
                rows.append(row)
                print(format_row(row), flush=True)
    return rows, {"copy_bandwidth_gb_s": peak_bw / 1e9}


def timed_peak(fn, repeats, device="cuda"):
    """(median seconds, peak MiB allocated above the inputs; None off CUDA)."""
    if device != "cuda":
        return timed(fn, device, repeats), None
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    seconds = timed(fn, "cuda", repeats)
    return seconds, (torch.cuda.max_memory_allocated() - base) / 2**20


def format_row(row):
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="130m", help="model size for the CPU run")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["130m", "370m"], help="GPU run")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-ref", action="store_true", help="skip the (slow) tree_scan_ref oracle")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.lengths is None:
        args.lengths = [512, 1024, 2048] if args.device == "cpu" else [512, 1024, 2048, 4096]
    if not native.available(args.device):
        raise SystemExit(f"no native kernels for {args.device} (see the warning above)")
    rows, extra = (bench_cpu(args), {}) if args.device == "cpu" else bench_cuda(args)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "timing": "median of --repeats runs after one warm-up; forward + backward",
        "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        **extra,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
