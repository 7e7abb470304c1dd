"""Training throughput and peak memory per optimizer step: full fine-tuning, LoRA and GrootL arms on
the same model and the same batches (prompt = the first ``--context`` fraction of each row). Beside wall time, each arm's process
CPU time per step (all its threads): on a shared machine its ratio to LoRA's is less swayed by other load than
the wall-time ratio, though not immune: ``--rounds R`` runs every arm R times, alternating the arm order, and
reports the median of the per-round ratios (each round's arms run back to back, under about the same load).

    python scripts/bench_train.py                                   # tiny random-init model on CPU
    python scripts/bench_train.py --size 130m --device cuda --lengths 512 2048 --precision bf16 --grad-ckpt
    python scripts/bench_train.py --family mamba2 bamba --size 130m --arms lora grootl --rounds 3 \
        --out benchmarks/train_families_cpu.json                    # a Mamba-2 and a hybrid (Bamba)

Each arm runs in its own subprocess, so CPU peak memory (peak RSS above the RSS after building the
model and optimizer) and CUDA peak memory (``max_memory_allocated``) are per arm. Models are random
init (``--size 130m``: Mamba-130M's shape, Mamba2-130M's, or a Bamba of 200M parameters with Mamba-2
layers around 2 attention layers): throughput does not depend on the weights. LoRA adapts each
family's projections (``grootl.model.families``). Prints a table and writes JSON (default
``benchmarks/train_<size>_<device>.json``, ``train_<families>_<size>_<device>.json`` for others).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
_BAMBA = {"model_type": "bamba", "mamba_expand": 2, "mamba_n_groups": 1, "num_key_value_heads": 4,
          "tie_word_embeddings": False}
SIZES = {  # model.config of a recipe, by family and size
    "mamba": {
        "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "state_size": 8, "vocab_size": 512},
        "130m": {"hidden_size": 768, "num_hidden_layers": 24, "state_size": 16, "vocab_size": 50280},
    },
    "mamba2": {
        "tiny": {"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 16, "head_dim": 8,
                 "n_groups": 2, "state_size": 16, "chunk_size": 64, "vocab_size": 512},
        "130m": {"model_type": "mamba2", "hidden_size": 768, "num_hidden_layers": 24, "num_heads": 24, "head_dim": 64,
                 "n_groups": 1, "state_size": 128, "chunk_size": 256, "vocab_size": 50280},
    },
    "bamba": {
        "tiny": {**_BAMBA, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "attn_layer_indices": [1],
                 "num_attention_heads": 4, "mamba_n_heads": 16, "mamba_d_head": 8, "mamba_d_state": 16,
                 "mamba_chunk_size": 64, "vocab_size": 512},
        "130m": {**_BAMBA, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 16,
                 "attn_layer_indices": [5, 11], "num_attention_heads": 12, "mamba_n_heads": 24, "mamba_d_head": 64,
                 "mamba_d_state": 128, "mamba_chunk_size": 256, "vocab_size": 50280},
    },
}
ARMS = ("full", "lora", "grootl")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_arm(args) -> dict:
    """One arm at one length, in this process: warm-up steps, then timed optimizer steps."""
    from grootl.model.families import FAMILIES
    from grootl.train.modeling import build_model
    from grootl.train.recipe import load_recipe

    torch.manual_seed(0)
    device = torch.device(args.device)
    config = SIZES[args.model][args.size]
    lora = {"target_modules": list(FAMILIES[args.model].lora_targets)} if args.model in FAMILIES else {}
    recipe = load_recipe(values={
        "output_dir": str(REPO / "runs" / "bench"), "method": args.arm,
        "model": {"init": "random", "tokenizer": "unused", "config": config}, "lora": lora,
    })
    model = build_model(recipe, Path(recipe.output_dir)).to(device)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    generator = torch.Generator().manual_seed(1)  # the same batches for every arm
    vocab = config["vocab_size"]
    batches = []
    for _ in range(args.warmup + args.steps):
        ids = torch.randint(2, vocab, (args.batch, args.length), generator=generator)
        context = int(args.length * args.context)
        labels = ids.clone()
        labels[:, :context] = -100
        batches.append({"input_ids": ids.to(device), "labels": labels.to(device),
                        "context_lens": torch.full((args.batch,), context, device=device)})
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(batch):
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    baseline = rss_bytes()
    for batch in batches[: args.warmup]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    for batch in batches[args.warmup:]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {
        "family": args.model, "arm": args.arm, "length": args.length, "batch": args.batch,
        "params": sum(p.numel() for p in model.parameters()), "trainable_params": sum(p.numel() for p in trainable),
        "ms_per_step": 1000 * seconds / args.steps,
        "cpu_ms_per_step": 1000 * cpu_seconds / args.steps,
        "tokens_per_s": args.batch * args.length * args.steps / seconds,
        "peak_mb": peak / 2**20,
    }


def environment(args) -> dict:
    """When, where and with what the benchmark ran."""
    import peft
    import transformers

    import grootl

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} {_cpu_model()}", "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "grootl": grootl.__version__, "cpu_count": os.cpu_count(), "threads": args.threads or torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0],
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())


def run_worker(family: str, length: int, arm: str) -> dict:
    """One arm in a subprocess of its own (its own peak memory)."""
    command = [sys.executable, __file__, *sys.argv[1:], "--arm", arm, "--model", family, "--length", str(length)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"{family} {arm} at length {length} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarize(rounds: list[dict], arms: list[str]) -> list[dict]:
    """One row per arm: medians over the rounds, and ratios to LoRA taken within each round (its arms ran back to
    back, under about the same load) and then their median; with several rounds every round's ratio is kept."""
    ratios = {"tokens_per_s_vs_lora": lambda x, ref: x["tokens_per_s"] / ref["tokens_per_s"],
              "tokens_per_cpu_s_vs_lora": lambda x, ref: ref["cpu_ms_per_step"] / x["cpu_ms_per_step"],
              "peak_vs_lora": lambda x, ref: x["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] > 0 else None}
    rows = []
    for arm in arms:
        per_round = [r[arm] for r in rounds]
        row = {**per_round[0], "rounds": len(rounds)}
        for key in ("ms_per_step", "cpu_ms_per_step", "tokens_per_s", "peak_mb"):
            row[key] = statistics.median(x[key] for x in per_round)
        for key, ratio in ratios.items():
            values = [ratio(r[arm], r["lora"]) for r in rounds] if "lora" in arms else [None]
            row[key] = None if None in values else statistics.median(values)
            if len(rounds) > 1 and None not in values:
                row[key + "_per_round"] = values
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", choices=sorted(SIZES), default=["mamba"],
                        help="model families to run (each at --size)")
    parser.add_argument("--size", choices=("tiny", "130m"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=float, default=0.5, help="prompt fraction of each row")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every arm this often, alternating the arm order; medians are reported")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--precision", choices=("no", "bf16"), default="no")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # worker mode: one arm of one model
    parser.add_argument("--model", choices=sorted(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.arm:
        print(json.dumps(run_arm(args)))
        return

    rows = []
    for family in args.family:
        for length in args.lengths:
            rounds = []  # per round, each arm's row; the arm order alternates so drifting load hits both ends
            for r in range(args.rounds):
                order = args.arms if r % 2 == 0 else args.arms[::-1]
                rounds.append({arm: run_worker(family, length, arm) for arm in order})
            rows.extend(summarize(rounds, args.arms))

    print(f"{'family':<8}{'params':>8}{'arm':>8}{'L':>6}{'tokens/s':>12}{'ms/step':>10}{'CPU ms/step':>12}{'peak MB':>10}"
          f"{'tok/s vs LoRA':>15}{'tok/CPU-s vs LoRA':>19}{'peak vs LoRA':>14}")
    for row in rows:
        ratio = lambda v: f"{v:.2f}x" if v is not None else "-"  # noqa: E731
        print(f"{row['family']:<8}{row['params'] / 1e6:>7.1f}M{row['arm']:>8}{row['length']:>6}{row['tokens_per_s']:>12.0f}{row['ms_per_step']:>10.1f}"
              f"{row['cpu_ms_per_step']:>12.1f}{row['peak_mb']:>10.1f}{ratio(row['tokens_per_s_vs_lora']):>15}"
              f"{ratio(row['tokens_per_cpu_s_vs_lora']):>19}{ratio(row['peak_vs_lora']):>14}")
    name = "_".join(f for f in args.family if f != "mamba" or len(args.family) > 1)
    out = args.out or REPO / "benchmarks" / f"train_{name + '_' if name else ''}{args.size}_{torch.device(args.device).type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = {key: value for key, value in vars(args).items() if key not in ("arm", "model", "length", "out")}
    out.write_text(json.dumps({"setup": setup, "environment": environment(args),
                               "model": {family: SIZES[family][args.size] for family in args.family}, "results": rows},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
