"""Benchmark the native tree-scan kernels; prints a table and writes JSON.

CPU: the C++ kernel against the plain oracle ``tree_scan_ref`` and the PyTorch ``tree_scan``, forward +
backward, plus the tree build (C++ vs PyTorch). GPU (CUDA): tree build + tree scan forward + backward
against the same kernels on the chain and mamba_ssm's ``selective_scan_fn`` (when installed) on the same
inputs (called as the GrootL mixer calls them: ``check_values=False``), time and peak memory, and the fraction of the copy bandwidth the least traffic would need.

    python scripts/bench_kernels.py --device cpu --out benchmarks/kernels_cpu.json
    python scripts/bench_kernels.py --device cuda --out benchmarks/kernels_gpu.json

The Mamba-2 tree build (grouped features; native vs PyTorch, same run):

    python scripts/bench_kernels.py --grouped mamba2-130m codestral-7b --lengths 512 2048 \
        --out benchmarks/grouped_build_cpu.json

The Mamba-2 tree scan, forward + backward: the native Mamba-2 op against today's folded route (the Mamba-1 kernel
on groups folded into the batch, the old dispatch, kept here for the comparison) and the PyTorch path, same run:

    python scripts/bench_kernels.py --mamba2 mamba2-130m grouped-g8 --lengths 512 \
        --out benchmarks/mamba2_scan_cpu.json

Bytes model (no timing; see ``launches``): the bytes the CUDA kernels as launched today, and the casts and
copies around them in grootl/tree/native.py, move per call against the minimum, and the threads each offers:

    python scripts/bench_kernels.py --bytes-only --out benchmarks/kernels_bytes.json
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
from typing import NamedTuple

import torch

from grootl.tree import Tree, build_tree, native, tree_scan, tree_scan_ref
from grootl.tree import mamba2
from grootl.tree.graph import build_grouped_tree

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


# Mamba-2 layouts of the grouped build: G, channels per group (heads per group x head dim), N
GROUPED = {"mamba2-130m": (1, 1536, 128), "codestral-7b": (8, 1024, 128)}


def bench_grouped_build(args):
    """The Mamba-2 tree build (graph.build_grouped_tree) on the native kernel and on the PyTorch path, same run."""
    rows = []
    for name in args.grouped:
        groups, c, n = GROUPED[name]
        for batch in args.batch:
            for length in args.lengths:
                g = torch.Generator().manual_seed(0)
                a, b = (torch.randn(batch, groups, m, length, generator=g).to(args.device) for m in (c, n))
                context = torch.full((batch,), length // 2, device=args.device)
                row = {"layout": name, "G": groups, "C": c, "N": n, "batch": batch, "L": length, "context": length // 2}
                row["native_s"] = timed(lambda: build_grouped_tree(a, b, context), args.device, args.repeats)
                row["torch_s"] = timed(lambda: torch_path(build_grouped_tree)(a, b, context), args.device, args.repeats)
                row["speedup"] = row["torch_s"] / row["native_s"]
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


# Mamba-2 scan layouts: H, P, G, N (Mamba2-130M's; Mamba-Codestral-7B's 8 groups, head dim and N with a quarter
# of its 128 heads, so that the PyTorch path fits in memory)
MAMBA2 = {"mamba2-130m": (24, 64, 1, 128), "grouped-g8": (32, 64, 8, 128)}


def mamba2_folded(x, dt, A, B, C, tree):
    """The route the native Mamba-2 op replaced: the Mamba-1 scan (native kernel where it serves) on the folded
    layout, tree rows repeated per group."""
    return mamba2._folded_tree_scan(x, dt, A, B, C, tree, False)


def bench_mamba2(args):
    """The Mamba-2 tree scan, forward + backward: native op, the folded route, the PyTorch path; same run."""
    rows = []
    for name in args.mamba2:
        heads, head_dim, groups, n = MAMBA2[name]
        for batch in args.batch:
            for length in args.lengths:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(batch, length, heads, head_dim, generator=g)
                dt = torch.nn.functional.softplus(torch.randn(batch, length, heads, generator=g) - 2)
                A = -torch.exp(torch.randn(heads, generator=g) * 0.5)
                B, C = (torch.randn(batch, length, groups, n, generator=g) for _ in range(2))
                x, dt, A, B, C = (t.to(args.device) for t in (x, dt, A, B, C))
                tree = mamba2.build_tree(x, dt, B, torch.full((batch,), length // 2, device=args.device))
                row = {"layout": name, "H": heads, "P": head_dim, "G": groups, "N": n, "batch": batch, "L": length,
                       "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
                row["native_s"] = timed(fwd_bwd(mamba2.tree_scan, x, dt, A, B, C, tree), args.device, args.repeats)
                row["folded_s"] = timed(fwd_bwd(mamba2_folded, x, dt, A, B, C, tree), args.device, args.repeats)
                row["torch_s"] = timed(fwd_bwd(torch_path(mamba2.tree_scan), x, dt, A, B, C, tree), args.device,
                                       args.repeats)
                row["speedup_vs_folded"] = row["folded_s"] / row["native_s"]
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


# ---- Bytes model of the CUDA kernels as launched today (kernels/cuda.cu, grootl/tree/native.py) ----
BYTES_RULES = (
    "A model, not a measurement. A kernel's loop over a row's nodes reads each tensor it touches once per loop (a "
    "neighbour read in the same loop, delta[v + 1], shares the line); per-row tensors that every channel block of a "
    "row reads (B, C, the tree) count once per loop (they stay in L2); a chunk pass's per-thread buffer of its chunk's "
    "nodes (local memory, reused in place) counts nothing; the slots between the chunked scan's passes count those "
    "a tree's local roots use (local_roots_per_chunk: measured on trees built from random inputs, about 2 of the 6 "
    "per chunk), written once and read once per pass that touches it, and nothing where a fused launch keeps them in "
    "shared memory; a torch cast or copy reads its source and "
    "writes its result once. "
    "Minimum: every input of a call read once and every output written once, in the caller's dtypes."
)
BYTES_MISSES = (
    "The chunked scan (kernels/chunk_scan.h) offers batch * D * lanes * L/64 threads (786,432 at batch 1, L=2048, "
    "D=1536, N=16: 32x the row-walking kernels' 24,576). Where a row fits a block (fused_mode: Mamba-1 layout, up "
    "to L=4096 at N=16) the forward is one launch near the minimum; the backward is one launch too where its blocks "
    "(a row and 32 channels each) fill the device (at least two per SM: batch 8 here), else its passes 1-2 are one "
    "launch and pass 3 another, which reads u, delta and gy again. Longer rows and Mamba-2 take a launch per pass, "
    "whose slots go through device memory. Not counted, and for a GPU to measure: the per-thread chunk buffers (the "
    "whole backward's lanes keep H, G and their dB/dC sums for 64 positions: 1 KiB per thread in fp32), which this "
    "model counts as on-chip though a GPU may spill them to L2; and whether the whole backward's 8x fewer blocks at "
    "batch 8 cost more time than its bytes save. dB/dC still go through per-group partials (one per 32 channels) that "
    "torch sums."
)
FORWARD_THREADS, BACKWARD_THREADS, BUILD_THREADS, CHUNK = 128, 512, 512, 32  # cuda.cu, kChunk
TILE, SLICES, PAIRS, ROWS_THREADS, ROWS_MAX_BLOCKS = 32, 8, 4, 256, 8192  # cuda.cu: the build's launches
SCAN_CHUNK, SLOTS = 64, 6  # chunk_scan.h: kScanChunk, kSlots (local-root slots per chunk, 2 * kMaxSpan)
FUSED_THREADS, FUSED_SHARED = 1024, 160 * 1024  # cuda.cu: kFusedThreads, kFusedShared (the fused kernel)
WHOLE_BACKWARD_BLOCKS = 2 * 132  # cuda.cu's whole_backward_blocks on an H200 (132 SMs)
K = 3  # neighbours per position (the mixer's default)
F32, I32, I64 = 4, 4, 8
# bytes per element of u, delta, B, C as the mixer passes them: under bf16 autocast u, B, C come from bf16
# matmuls and convolutions, delta is computed in float32 (softplus in work_dtype)
PRECISIONS = {"fp32": {"u": 4, "delta": 4, "B": 4, "C": 4}, "bf16": {"u": 2, "delta": 4, "B": 2, "C": 2}}
# the targets (issue 11): bytes moved by a scan forward + backward at batch 8, L=2048 and threads
TARGET_RATIO = {"fp32": 1.3, "bf16": 1.5}
TARGET_THREADS_FACTOR = 8


class Launch(NamedTuple):
    """One kernel launch ("kernel") or torch tensor op ("torch") of a call, or ``count`` alike launches (the build's
    phases): device-memory bytes they read and write in all and the threads each offers (a torch element-wise op:
    one per element)."""

    call: str
    name: str
    kind: str
    read: int
    written: int
    threads: int
    count: int = 1


def lane_shape(n: int) -> tuple[int, int]:
    """cuda.cu's lane_shape: lanes per channel and states per lane for N states."""
    lanes = 4
    while lanes < 32 and lanes < n:
        lanes *= 2
    per = 1
    while lanes * per < n:
        per *= 2
    return lanes, per


def fused_mode(batch: int, d: int, length: int, n: int, ks: int, backward: bool) -> str | None:
    """cuda.cu's fused_mode (the Mamba-1 layout): "forward", or for the backward "whole" where its blocks (a row and
    a channel group each) fill the device and "roots" (passes 1-2) otherwise; None where the row does not fit a block
    (its chunks, a lane group each, over FUSED_THREADS, or its shared memory over FUSED_SHARED)."""
    sc, lanes = -(-length // SCAN_CHUNK), lane_shape(n)[0]

    def fits(mode):
        grads, whole = mode != "forward", mode == "whole"
        shared = ((2 + grads) * sc * SLOTS * n + length + (sc * (1 + n) if whole else 0)) * F32 + (1 + grads) * length * ks
        return sc * lanes <= FUSED_THREADS and shared <= FUSED_SHARED

    if not backward:
        return "forward" if fits("forward") else None
    if batch * -(-d // (BACKWARD_THREADS // lanes)) >= WHOLE_BACKWARD_BLOCKS and fits("whole"):
        return "whole"
    return "roots" if fits("roots") else None


def local_roots_per_chunk(length: int, d: int = 64, n: int = 16, batch: int = 2) -> float:
    """Local roots per chunk of SCAN_CHUNK positions (nodes whose parent lies in another chunk, and the root) of trees
    built from random inputs with the whole row as prompt: the slots per chunk the chunked scan touches (of SLOTS)."""
    u, delta, _, B, _ = inputs(batch, d, n, length, "cpu", seed=length)
    parent = build_tree(u, delta, B, torch.full((batch,), length)).parent
    chunk = torch.arange(length) // SCAN_CHUNK
    crossing = (parent < 0) | (parent.div(SCAN_CHUNK, rounding_mode="floor") != chunk)
    return crossing.sum().item() / (batch * -(-length // SCAN_CHUNK))


def kernel_bytes(precision: str) -> int:
    """Bytes per element of the kernels' u, B, C (and y, gy, du): native._scan_dtype (their shared dtype, else
    float32). delta always reaches the kernels in float32."""
    dt = PRECISIONS[precision]
    return dt["u"] if dt["u"] == dt["B"] == dt["C"] else F32


def build_scratch_ints(length: int, k: int) -> int:
    """tree_build.h's build_scratch_ints (int32s per row)."""
    n = 5 * length + 2 + 10 * length * k + 3 * length
    return n + (n & 1)


def log2_ceil(n: int) -> int:
    """tree_build.h's log2_ceil: the build's Borůvka rounds and pointer-jumping steps for n nodes."""
    return max(n - 1, 0).bit_length()


def build_launches(add, batch: int, length: int, E: int, S: int, ks: int, tree: int, plan_out: int) -> None:
    """cuda.cu's launch_build: feature_kernel (blocks of TILE positions x SLICES channel slices; E, S elements of u and
    B read in ks bytes, delta in float32), then tree_build.h's phases, each one launch of a thread per element of all rows (GridRows, at
    most ROWS_MAX_BLOCKS blocks), fixed counts of rounds, then plan_kernel (a block per row). A phase's bytes: the
    scratch words its body reads and writes per element (an atomic counted both ways)."""
    T, rounds, steps = batch * length, log2_ceil(length), log2_ceil(2 * (length - 1))

    def phase(name, per, read, written, count=1):  # per: elements per row; read, written: bytes per element
        threads = min(batch * per, ROWS_THREADS * ROWS_MAX_BLOCKS)
        add("build", name, count * batch * per * read, count * batch * per * written, threads, count=count)

    passes = -(-(K + 1) // PAIRS)  # each pass over the pairs reads its positions' channels once (t - j: same lines)
    add("build", "feature_kernel", passes * (E * (ks + F32) + S * ks), T * (1 + K) * F32,
        batch * -(-length // TILE) * TILE * SLICES)
    phase("weights, in_tree = 0", length * K, 3 * F32, F32 + 1)
    phase("comp = self", length, 0, I32)
    phase("Borůvka: reset", length, 0, I64 + I32, rounds)
    phase("Borůvka: cheapest weight", length * K, 2 * I32 + F32 + 2 * I64, 2 * I64, rounds)
    phase("Borůvka: smallest id", length * K, 4 * I32 + F32 + 2 * I64, 2 * I32, rounds)
    phase("Borůvka: hook", length, 6 * I32, I32 + 1, rounds)
    phase("Borůvka: pointer jumping", length, 3 * I32, I32, 2 * sum(log2_ceil(length >> r) for r in range(rounds)))
    phase("Borůvka: relabel", length, 2 * I32, I32, rounds)
    phase("tours: successors", 2 * length * K, 2 * K, 2 * I32, 2)
    phase("tours: rank (pointer jumping)", 2 * length * K, 4 * I32, 2 * I32, 2 * (1 + 2 * steps))
    phase("rooting: parent, size", length, 2 * K * (1 + 2 * I32), I64 + I32)
    phase("rooting: order", 2 * length * K, 2 * K + I64 + I32, I64 / (2 * K))
    add("build", "plan_kernel", tree - T + 3 * T * I32, plan_out - 2 * T * I64 + 3 * T * I32, batch * BUILD_THREADS)


def launches(batch: int, d: int, n: int, length: int, precision: str, roots: float = SLOTS) -> list[Launch]:
    """What the calls build (build_tree), plan (a tree from elsewhere), forward and backward (tree_scan's
    autograd) launch today; roots: local roots per chunk, the slots a tree's scan touches (at most SLOTS)."""
    dt, ks = PRECISIONS[precision], kernel_bytes(precision)
    E, S, T = batch * d * length, batch * length * n, batch * length  # elements of u, of B, of a row tree
    lanes, per = lane_shape(n)
    chunks = -(-length // CHUNK)
    tree = T * (2 * I64 + 1)  # parent, order, flags: one read of the tree per loop
    plan_out = tree + batch * (chunks + 1 + 3) * I32
    out: list[Launch] = []

    def add(call, name, read, written, threads, kind="kernel", count=1):
        out.append(Launch(call, name, kind, int(read), int(written), int(threads), int(count)))

    def cast(call, name, numel, src, dst, copy=False):  # x.to(dst) (+ .contiguous()): free when nothing changes
        if src != dst or copy:
            add(call, name, numel * src, numel * dst, numel, "torch")

    # build: native._build_tree casts u, B to the kernels' dtype and delta to float32; B is a strided view of
    # x_proj's output
    cast("build", "u.to(dtype)", E, dt["u"], ks)
    cast("build", "delta.to(float32)", E, dt["delta"], F32)
    cast("build", "B.to(dtype).contiguous()", S, dt["B"], ks, copy=True)
    build_launches(add, batch, length, E, S, ks, tree, plan_out)
    # plan: a tree from elsewhere is checked (a thread per row), then planned (a block per row); one host sync
    add("plan", "check_kernel", 2 * T * I64 + 3 * T * I32, 3 * T * I32 + batch * I32, -(-batch // 64) * 64)
    add("plan", "plan_kernel", tree + 3 * T * I32, plan_out - 2 * T * I64 + 3 * T * I32, batch * BUILD_THREADS)
    # forward: u to the kernels' dtype, delta to float32, B and C to (batch, L, N); y back to u's dtype
    cast("forward", "u.to(dtype)", E, dt["u"], ks)
    cast("forward", "delta.to(float32)", E, dt["delta"], F32)
    for x in "BC":
        cast("forward", f"_states_last({x})", S, dt[x], ks, copy=True)
    # the chunked scan (kernels/chunk_scan.h, what runs for trees whose edges span <= 3 positions: the build's with
    # k <= 3, the chain): a chunk plan (a block per row), pass 1 and pass 3 on (channel blocks, chunks, rows), a
    # chunk's inputs read once per pass (its nodes' buffer in local memory, counted as on-chip), pass 2 a thread per
    # (row, channel, state) over the local roots; between passes only the slots (SLOTS states per chunk)
    fwd_blocks = -(-d // (FORWARD_THREADS // lanes)) * batch
    sc = -(-length // SCAN_CHUNK)
    slots = int(batch * d * sc * roots * n * F32)  # the slots the tree's local roots use, of SLOTS per chunk
    nodes = T * (I64 + I32)  # parent and the chunk plan's node list
    red = int(batch * sc * roots * 2 * I32)  # the reduced tree: slots and up slots

    def chunk_plan(call):
        add(call, "chunk_plan_kernel", 2 * T * I64 + 2 * T * I32, (3 * T + batch) * I32 + 2 * T * I32,
            batch * BUILD_THREADS)

    chunk_plan("forward")
    pass_threads = fwd_blocks * sc * FORWARD_THREADS
    ud = E * (ks + F32)  # u and delta, read once
    if fused_mode(batch, d, length, n, ks, backward=False):
        # one launch, a block per (channel, row): u and delta staged in shared memory once, the slots there too;
        # B and the tree read by pass 1 and pass 3, C by pass 3
        add("forward", "fused passes 1-3 (y)", ud + 3 * S * ks + 2 * nodes + red + 2 * d * n * F32,
            E * ks + batch * d * n * F32, batch * d * sc * lanes)
    else:
        add("forward", "pass 1 (local scans)", ud + S * ks + nodes + d * n * F32, 2 * slots, pass_threads)
        add("forward", "pass 2 (local roots)", 2 * slots + red, slots, batch * d * n)
        add("forward", "pass 3 (y)", ud + 2 * S * ks + nodes + slots + d * n * F32,
            E * ks + batch * d * n * F32, pass_threads)
    cast("forward", "y.to(u.dtype)", E, ks, dt["u"])
    # backward: gy to the kernel's dtype; passes 1-3 as the forward's (G too), du and d_delta written once, dB/dC
    # summed over a block's channels into per-group partials
    cast("backward", "gy.to(dtype)", E, dt["u"], ks)
    groups = -(-d // (BACKWARD_THREADS // lanes))
    chunk_plan("backward")
    mode = fused_mode(batch, d, length, n, ks, backward=True)
    if mode == "whole":
        # one launch, a block per (row, channel group) taking its channels in turn: u, delta, gy staged once per
        # channel, B, C and the tree read by pass 1 and pass 3; dA whole; each lane's dB/dC sums in its own buffers
        add("backward", "fused passes 1-3 (gradients)",
            ud + E * ks + 4 * S * ks + 2 * nodes + red + 2 * d * n * F32 + batch * d * n * F32,
            E * ks + E * F32 + batch * d * n * F32 + 2 * batch * groups * length * n * F32,
            batch * groups * sc * lanes)
    else:
        if mode == "roots":
            # one launch, a block per (channel, row): the slots in shared memory; out go the local roots' final
            # states and incoming gradients (Hr, Ginc) for pass 3
            add("backward", "fused passes 1-2 (local roots)",
                ud + E * ks + 2 * S * ks + nodes + red + d * n * F32 + batch * d * n * F32, 2 * slots,
                batch * d * sc * lanes)
        else:
            add("backward", "pass 1 (local scans)", ud + E * ks + 2 * S * ks + nodes + d * n * F32, 3 * slots,
                pass_threads)
            add("backward", "pass 2 (local roots)", 3 * slots + red + batch * d * n * F32, 2 * slots, batch * d * n)
        # pass 3 on blocks of channels per chunk; dA per chunk, then summed
        dA_chunks = sc * batch * d * n * F32
        add("backward", "pass 3 (gradients)", ud + E * ks + 2 * S * ks + nodes + 2 * slots + d * n * F32,
            E * ks + E * F32 + batch * d * sc * F32 + dA_chunks + 2 * batch * groups * length * n * F32,
            groups * sc * batch * BACKWARD_THREADS)
        add("backward", "d_delta chunk tails", batch * d * sc * 2 * F32, batch * d * sc * F32, batch * d * sc)
        add("backward", "dA over chunks", dA_chunks, batch * d * n * F32, batch * d * n, "torch")
    add("backward", "dA.sum(0)", batch * d * n * F32, d * n * F32, batch * d * n, "torch")
    for x in "BC":
        partials = batch * groups * length * n
        add("backward", f"d{x} partials .sum(1)", partials * F32, S * F32, partials, "torch")
        cast("backward", f"d{x} to {x}'s dtype", S, F32, dt[x])
    cast("backward", "du to u's dtype", E, ks, dt["u"])
    cast("backward", "d_delta to delta's dtype", E, F32, dt["delta"])
    return out


def minimum_bytes(batch: int, d: int, n: int, length: int, precision: str) -> dict[str, int]:
    """Per call, every input read once and every output written once, in the dtypes the caller holds."""
    dt = PRECISIONS[precision]
    E, S, T = batch * d * length, batch * length * n, batch * length
    tree = T * (2 * I64 + 1) + batch * (-(-length // CHUNK) + 1 + 3) * I32  # parent, order and the plan
    inputs = E * (dt["u"] + dt["delta"]) + S * (dt["B"] + dt["C"]) + d * n * F32 + tree
    return {
        "build": E * (dt["u"] + dt["delta"]) + S * dt["B"] + tree,
        "plan": tree,  # parent and order read, the plan written
        "forward": inputs + E * dt["u"],
        "backward": inputs + E * dt["u"] + E * (dt["u"] + dt["delta"]) + S * (dt["B"] + dt["C"]) + d * n * F32,
    }


def scratch_bytes(batch: int, d: int, n: int, length: int) -> dict[str, int]:
    """Scratch the chunked scan allocates (memory, not traffic): the slots between passes (2 buffers forward, 3
    backward), the chunk plan, and the backward's chunk tails and per-chunk dA."""
    sc = -(-length // SCAN_CHUNK)
    slots = batch * d * sc * SLOTS * n * F32
    plan = batch * (3 * length + 1 + 2 * length) * I32
    return {"forward": 2 * slots + plan, "backward": 3 * slots + plan + batch * d * sc * F32 + sc * batch * d * n * F32}


def saved_copies_bytes(batch: int, d: int, n: int, length: int, precision: str) -> int:
    """Copies of the caller's tensors the scan saves for its backward: the op saves its converted inputs (u in
    float32 when cast, B and C as (batch, L, N))."""
    dt, ks = PRECISIONS[precision], kernel_bytes(precision)
    return (batch * d * length * ks if ks != dt["u"] else 0) + batch * length * n * (2 * ks)


def bytes_model(d: int, n: int, batches: list[int], lengths: list[int]) -> list[dict]:
    """One row per (batch, L, precision): per call and for a scan's forward + backward (and with the build)."""
    rows = []
    for length in lengths:
        roots = local_roots_per_chunk(length)
        for batch in batches:
            for precision in PRECISIONS:
                ls = launches(batch, d, n, length, precision, roots)
                least = minimum_bytes(batch, d, n, length, precision)
                row = {"batch": batch, "L": length, "D": d, "N": n, "precision": precision, "local_roots_per_chunk": roots,
                       "calls": {}}
                for call in ("build", "plan", "forward", "backward"):
                    mine = [x for x in ls if x.call == call]
                    moved = sum(x.read + x.written for x in mine)
                    row["calls"][call] = {
                        "bytes": moved, "minimum": least[call], "ratio": moved / least[call], "launches": sum(x.count for x in mine),
                        "kernel_threads": max((x.threads for x in mine if x.kind == "kernel"), default=0),
                        "detail": [x._asdict() for x in mine]}
                calls = row["calls"]
                totals = {"scan_fwd_bwd": ("forward", "backward"), "build_fwd_bwd": ("build", "forward", "backward")}
                for name, parts in totals.items():
                    moved, least_sum = (sum(calls[c][key] for c in parts) for key in ("bytes", "minimum"))
                    row[name] = {"bytes": moved, "minimum": least_sum, "ratio": moved / least_sum}
                row["scan_threads"] = calls["forward"]["kernel_threads"]
                row["scratch_bytes"] = scratch_bytes(batch, d, n, length)
                row["saved_copies_bytes"] = saved_copies_bytes(batch, d, n, length, precision)
                rows.append(row)
    return rows


# threads the row-walking scan kernels offered at batch 1, L=2048, D=1536, N=16 (the baseline)
ROW_WALK_THREADS = 24_576


def bytes_verdict(rows: list[dict]) -> dict:
    """The issue's targets against the model: ratios at batch 8, L=2048; threads at batch 1, L=2048 against the
    row-walking kernels' (at D=1536, N=16)."""
    verdict = {}
    for row in rows:
        if row["batch"] == 8 and row["L"] == 2048:
            ratio = row["scan_fwd_bwd"]["ratio"]
            verdict[f"ratio_{row['precision']}"] = {"model": ratio, "target": TARGET_RATIO[row["precision"]],
                                                    "met": ratio <= TARGET_RATIO[row["precision"]]}
        if row["batch"] == 1 and row["L"] == 2048 and row["precision"] == "fp32" and (row["D"], row["N"]) == (1536, 16):
            target = TARGET_THREADS_FACTOR * ROW_WALK_THREADS
            verdict["scan_threads_batch1"] = {"model": row["scan_threads"], "target": target,
                                              "met": row["scan_threads"] >= target}
    return verdict


def print_bytes_table(rows: list[dict]) -> None:
    print(f"{'batch':>5} {'L':>6} {'prec':>5} | {'call':<13} {'GB moved':>9} {'GB min':>8} {'ratio':>6} "
          f"{'launches':>8} {'threads':>9}")
    for row in rows:
        entries = [(c, row["calls"][c]) for c in ("build", "plan", "forward", "backward")]
        entries += [("scan fwd+bwd", row["scan_fwd_bwd"]), ("build+fwd+bwd", row["build_fwd_bwd"])]
        for call, x in entries:
            print(f"{row['batch']:>5} {row['L']:>6} {row['precision']:>5} | {call:<13} {x['bytes'] / 1e9:>9.3f} "
                  f"{x['minimum'] / 1e9:>8.3f} {x['ratio']:>6.2f} {x.get('launches', ''):>8} "
                  f"{x.get('kernel_threads', ''):>9}")


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
    parser.add_argument("--bytes-only", action="store_true", help="only the CUDA kernels' bytes model (no timing)")
    parser.add_argument("--bytes-batch", type=int, nargs="+", default=[1, 8], help="batches of the bytes model")
    parser.add_argument("--bytes-lengths", type=int, nargs="+", default=[2048, 8192], help="lengths of the bytes model")
    parser.add_argument("--grouped", nargs="+", choices=sorted(GROUPED), default=None,
                        help="time only the Mamba-2 grouped tree build of these layouts, native vs PyTorch")
    parser.add_argument("--mamba2", nargs="+", choices=sorted(MAMBA2), default=None,
                        help="time only the Mamba-2 tree scan of these layouts: native op, folded route, PyTorch")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.lengths is None:
        args.lengths = [512, 1024, 2048] if args.device == "cpu" else [512, 1024, 2048, 4096]
    d, n = SIZES[args.size]
    bytes_rows = bytes_model(d, n, args.bytes_batch, args.bytes_lengths)
    print_bytes_table(bytes_rows)
    verdict = bytes_verdict(bytes_rows)
    print("targets (issue 11):", json.dumps(verdict), "\n" + BYTES_MISSES, flush=True)
    extra = {"bytes_model": {"rules": BYTES_RULES, "misses": BYTES_MISSES, "verdict": verdict, "rows": bytes_rows}}
    if args.bytes_only:
        rows = []
    elif not native.available(args.device):
        raise SystemExit(f"no native kernels for {args.device} (see the warning above)")
    elif args.grouped:
        rows = bench_grouped_build(args)
    elif args.mamba2:
        rows = bench_mamba2(args)
    else:
        rows, timing_extra = (bench_cpu(args), {}) if args.device == "cpu" else bench_cuda(args)
        extra |= timing_extra
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
