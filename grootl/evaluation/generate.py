"""``grootl generate``: a model's response to an instruction, printed as it is generated.

The instruction is put in the prompt template the model was trained with (a run's recipe says which;
``grootl`` otherwise), the tree runs over that prompt, and the response is decoded token by token
from the one merged state (see :mod:`grootl.model.mixer`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from grootl.cli import help_text
from grootl.data.templates import TEMPLATES, get_template
from grootl.evaluation.run import modulation_arg
from grootl.paths import PathError, resolve_model

DEFAULT_TEMPLATE = "grootl"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grootl generate", description=help_text(__doc__))
    parser.add_argument(
        "model", help="GrootL model dir, grootl train run dir (its final/) or stock Mamba checkpoint (dir or hub id)"
    )
    parser.add_argument("instruction", help="the instruction (or, with --raw, the whole prompt)")
    parser.add_argument("--input", default="", help="the record's optional input field")
    parser.add_argument("--template", choices=sorted(TEMPLATES),
                        help="prompt template (default: the run's, else grootl)")
    parser.add_argument("--raw", action="store_true", help="use INSTRUCTION as the prompt, no template")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--modulation", type=modulation_arg, help="λ of y_chain + λ·y_tree (default: the model's own)")
    parser.add_argument("--no-tree", action="store_true", help="plain Mamba scan")
    parser.add_argument("--device", help="cpu, cuda, cuda:0 ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, ... (default: the checkpoint's)")
    return parser


def run_template(model_dir: str) -> str | None:
    """The prompt template of the ``grootl train`` run that exported ``model_dir`` (its ``final/``), if any."""
    run_file = Path(model_dir).expanduser().parent / "run.json"
    if Path(model_dir).name != "final" or not run_file.is_file():
        return None
    try:
        return json.loads(run_file.read_text())["recipe"]["data"]["template"]
    except (ValueError, KeyError, TypeError) as error:
        raise PathError(f"{run_file} names no prompt template (recipe.data.template): {error!r}") from error


def build_prompt(args: argparse.Namespace, model_dir: str) -> str:
    if args.raw:
        return args.instruction
    template = args.template or run_template(model_dir) or DEFAULT_TEMPLATE
    return get_template(template).format(args.instruction, args.input)


def generate(args: argparse.Namespace) -> str:
    """Load the model, print the response as it comes, and return it."""
    import torch
    import transformers
    from transformers import AutoTokenizer, TextStreamer

    from grootl.model import load_model

    model_dir = resolve_model(args.model)
    if (Path(model_dir).expanduser() / "adapter_config.json").is_file():
        raise PathError(f"{args.model} is a PEFT adapter: generate from the run's merged model (<run>/final) instead")
    prompt = build_prompt(args, model_dir)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype, None)
    if not isinstance(dtype, (str, torch.dtype)):
        raise ValueError(f"--dtype {args.dtype} is not a torch dtype")
    transformers.utils.logging.disable_progress_bar()  # loading takes seconds; the response is what to watch
    model = load_model(model_dir, dtype=dtype, device=device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except OSError as error:
        raise PathError(f"no tokenizer in {model_dir}: {error}") from error
    if args.no_tree:
        model.set_grootl(dataclasses.replace(model.grootl, enabled=False))
    elif args.modulation is not None:
        model.set_grootl(dataclasses.replace(model.grootl, modulation=args.modulation))
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(device)  # as in training
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    out = model.generate(
        **ids,
        max_new_tokens=args.max_new_tokens,
        do_sample=sample,
        temperature=args.temperature if sample else None,
        top_p=args.top_p if sample else None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name, low in (("max_new_tokens", 1), ("top_p", 1e-9), ("temperature", 0)):
        if not getattr(args, name) >= low:
            print(f"grootl generate: error: --{name.replace('_', '-')} must be >= {low:g}; got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    if not args.instruction.strip():
        print("grootl generate: error: the instruction is empty; give the text to respond to", file=sys.stderr)
        return 2
    try:
        generate(args)
    except (PathError, ValueError) as error:
        print(f"grootl generate: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
