"""Benchmark the pure-PyTorch tree scan against a chain selective scan written in the same style.

Mamba-130M sizes (D=1536, N=16). For each (batch, L): build_tree time, then forward+backward time,
peak memory and bytes saved for backward of
  - chain:      grootl.tree.chain_scan (the same leaves-to-root machinery on the chain),
  - tree:       build_tree + grootl.tree.tree_scan (the GrootL branch),
  - autograd:   the textbook loop h = a*h + X with autograd (what a naive port keeps for backward).
Each measurement runs in a fresh process so peak RSS is its own. Prints a table, writes JSON.

    python scripts/bench_tree_scan.py [--lengths 256 1024 2048] [--batches 1 4] [--out FILE]

``--scale`` measures instead how the native kernels' build + scan cost grows with the prompt (the whole sequence
as prompt, D=32, N=16, batch 1, random and repeated-token features): forward+backward time per position and
the peak memory the call adds, per L (default 4096 and 32768), into benchmarks/tree_scan_scale_cpu.json.
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
from functools import partial
from pathlib import Path

import torch

D, N = 1536, 16
SCALE_D = 32  # --scale: the channels of one head-sized slice, as in issue 11's measurement


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
    os.environ["GROOTL_NATIVE"] = "0"  # this measures the pure-PyTorch path; see bench_kernels.py
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


def _scale_inputs(length, features):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, SCALE_D, length, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(1, SCALE_D, length, generator=g) - 2)
    A = -torch.exp(torch.randn(SCALE_D, N, generator=g) * 0.5)
    B, C = torch.randn(1, N, length, generator=g), torch.randn(1, N, length, generator=g)
    if features == "repeated":  # a prompt of 7 distinct tokens over and over
        tokens = torch.randint(0, 7, (length,), generator=g)
        u, delta, B = (x[..., tokens] for x in (u[..., :7], delta[..., :7], B[..., :7]))
    return u, delta, A, B, C


def _measure_scale(length, features, threads, queue):
    from grootl.tree import build_tree, native, tree_scan
    from grootl.tree.graph import stack_bound

    build_tree = partial(build_tree, check_values=False)  # as the GrootL mixer calls them
    tree_scan = partial(tree_scan, check_values=False)
    torch.set_num_threads(threads)
    assert native.available("cpu"), "the C++ kernels did not build"
    warm = [x.requires_grad_() for x in _scale_inputs(64, features)]
    tree_scan(*warm, build_tree(warm[0].detach(), warm[1].detach(), warm[3].detach(), torch.tensor([64]))).sum().backward()
    xs = [x.requires_grad_() for x in _scale_inputs(length, features)]
    gy = torch.ones(1, SCALE_D, length)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        tree = build_tree(xs[0].detach(), xs[1].detach(), xs[3].detach(), torch.tensor([length]))
        y = tree_scan(*xs, tree)
        y.backward(gy)
        times.append(time.perf_counter() - t0)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024
    plan = native._Plan.of(native.load("cpu"), tree, torch.device("cpu"))
    sizes = plan.sizes[0].tolist()
    queue.put(dict(length=length, features=features, fwd_bwd_s=min(times), us_per_position=min(times) / length * 1e6,
                   peak_added_bytes=peak, forward_stack=sizes[0], backward_stack=sizes[1], checkpoint_entries=sizes[2],
                   stack_bound=stack_bound(length)))


def scale_main(args) -> None:
    rows = []
    print(f"{'L':>6} {'features':>9} {'fwd+bwd s':>10} {'us/pos':>7} {'peak MiB':>9} {'stacks':>8} {'bound':>5}")
    for features in ("random", "repeated"):
        for length in args.lengths:
            r = _spawn(_measure_scale, length, features, args.threads)
            rows.append(r)
            print(f"{length:>6} {features:>9} {r['fwd_bwd_s']:>10.3f} {r['us_per_position']:>7.2f} "
                  f"{r['peak_added_bytes'] / 2**20:>9.1f} {r['forward_stack']:>3}/{r['backward_stack']:<4} {r['stack_bound']:>5}")
    ratios = {}
    for features in ("random", "repeated"):
        per = {r["length"]: r["us_per_position"] for r in rows if r["features"] == features}
        ratios[features] = per[max(per)] / per[min(per)]
        print(f"{features}: time per position at L={max(per)} is {ratios[features]:.2f}x that at L={min(per)}")
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device="cpu", path="native",
                cpu=platform.processor() or platform.machine(), threads=args.threads, torch=torch.__version__,
                D=SCALE_D, N=N, batch=1, context="whole sequence", runs="best of 3 (build + forward + backward)",
                load_average_after=os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, per_position_ratio=ratios, results=rows), indent=2))
    print(f"wrote {args.out}")


def _spawn(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def run(method, batch, length, threads):
    return _spawn(_measure, method, batch, length, threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", action="store_true", help="native build+scan cost vs prompt length (see above)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--methods", nargs="+", default=["chain", "tree", "autograd"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.scale:
        args.lengths = args.lengths or [4096, 32768]
        args.out = args.out or Path("benchmarks/tree_scan_scale_cpu.json")
        return scale_main(args)
    args.lengths = args.lengths or [256, 1024, 2048]
    args.out = args.out or Path("benchmarks/tree_scan_cpu.json")

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
