"""The `grootl` command: one entry point, each subcommand a plain function in its own module.

Each subcommand module exposes ``main(argv: list[str]) -> int`` that parses its own arguments, so
``grootl train ...`` and ``python -m grootl.train ...`` behave the same.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("grootl.train", "Fine-tune a Mamba model from a YAML recipe (GrootL, LoRA or full)."),
    "eval": ("grootl.evaluation.run", "Zero-shot lm-eval suites on a model, adapter or run directory."),
    "generate": ("grootl.evaluation.generate", "A model's response to an instruction, printed as it is generated."),
    "compare": ("grootl.evaluation.compare", "Side-by-side table and chart of saved eval results."),
    "reproduce": ("grootl.reproduce", "The paper's Mamba-130M table: train both arms, evaluate, compare (--smoke: tiny, CPU)."),
    "build-kernels": ("grootl.tree.native", "Compile the native tree-scan kernels now (CPU, and CUDA if present)."),
}


def _usage() -> str:
    lines = ["usage: grootl <command> [args...] | grootl --version", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `grootl <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from grootl import __version__

        print(f"grootl {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"grootl: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
