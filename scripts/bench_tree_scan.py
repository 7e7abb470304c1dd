"""Benchmark the pure-PyTorch tree scan against a chain selective scan written in the same style.

Mamba-130M sizes (D=1536, N=16). For each (batch, L): build_tree time, then forward+backward time,
peak memory and bytes saved for backward of
  - chain:      grootl.tree.chain_scan (the same leaves-to-root machinery on the chain),
  - tree:       build_tree + grootl.tree.tree_scan (the GrootL branch),
  - autograd:   the textbook loop h = a*h + X with autograd (what a naive port keeps for backward).
Each measurement runs in a fresh process so peak RSS is its own. Prints a table, writes JSON.

    python scripts/bench_tree_scan.py [--lengths 256 1024 2048] [--batches 1 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

D, N = 1536, 16
os.environ["GROOTL_NATIVE"] = "0"  # this measures the pure-PyTorch path; see bench_kernels.py


def _inputs(batch, length):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, D, length, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(batch, D, length, generator=g) - 2)
    A = -torch.exp(torch.randn(D, N, generator=g) * 0.5)
    B = torch.randn(batch, N, length, generator=g)
    C = torch.randn(batch, N, length, generator=g)
    return u, delta, A, B, C


def _autograd_chain(u, delta, A, B, C):
    h = u.new_zeros(u.shape[0], D, N)
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, -1)


def _measure(method, batch, length, threads, queue):
    torch.set_num_threads(threads)
    _time_one(method, 1, 16)  # pay one-off lazy initialisation outside the measurement
    queue.put(_time_one(method, batch, length))


def _time_one(method, batch, length):
    from grootl.tree import build_tree, chain_scan, tree_scan

    xs = [x.requires_grad_() for x in _inputs(batch, length)]
    context = torch.full((batch,), length // 2)  # half prompt, half response, as in instruction tuning
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    build = 0.0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if method == "tree":
            tree = build_tree(*(x.detach() for x in xs[:2]), xs[3].detach(), context)
            build = time.perf_counter() - t0
            y = tree_scan(*xs, tree)
        elif method == "chain":
            y = chain_scan(*xs)
        else:
            y = _autograd_chain(*xs)
    t1 = time.perf_counter()
    y.backward(torch.ones_like(y))
    t2 = time.perf_counter()
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024  # ru_maxrss is KiB on Linux
    return dict(method=method, batch=batch, length=length, build_s=build, forward_s=t1 - t0,
                backward_s=t2 - t1, total_s=t2 - t0, peak_rss_bytes=peak, saved_for_backward_bytes=saved[0])


def run(method, batch, length, threads):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(method, batch, length, threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--methods", nargs="+", default=["chain", "tree", "autograd"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/tree_scan_cpu.json"))
    args = parser.parse_args()

    rows = []
    print(f"{'B':>2} {'L':>5} {'method':>8} {'build s':>8} {'fwd+bwd s':>10} {'x chain':>8} {'peak MiB':>9} {'saved MiB':>10}")
    for batch in args.batches:
        for length in args.lengths:
            chain_time = None
            for method in args.methods:
                r = run(method, batch, length, args.threads)
                if method == "chain":
                    chain_time = r["total_s"]
                r["ratio_vs_chain"] = r["total_s"] / chain_time if chain_time else None
                rows.append(r)
                ratio = f"{r['ratio_vs_chain']:.2f}" if r["ratio_vs_chain"] else "-"
                print(f"{batch:>2} {length:>5} {method:>8} {r['build_s']:>8.3f} {r['total_s']:>10.3f} {ratio:>8} "
                      f"{r['peak_rss_bytes'] / 2**20:>9.0f} {r['saved_for_backward_bytes'] / 2**20:>10.1f}")
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device="cpu",
                cpu=platform.processor() or platform.machine(), threads=args.threads, torch=torch.__version__,
                D=D, N=N, context="L/2 per row")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
