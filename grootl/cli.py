"""The `grootl` command: one entry point, each subcommand a plain function in its own module.

Each subcommand module exposes ``main(argv: list[str]) -> int`` that parses its own arguments, so
``grootl train ...`` and ``python -m grootl.train ...`` behave the same.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path

# subcommand -> the module whose ``main(argv)`` runs it; its help is that main's docstring, else the module's
COMMANDS = {
    "train": "grootl.train",
    "eval": "grootl.evaluation.run",
    "generate": "grootl.evaluation.generate",
    "compare": "grootl.evaluation.compare",
    "reproduce": "grootl.reproduce",
    "build-kernels": "grootl.tree.native",
}
_RST = (
    (re.compile(r"^``grootl [\w-]+``:\s*"), ""),  # the "``grootl x``: " a command's docstring opens with
    (re.compile(r"(?::\w+)+:`~?([^`]+)`"), r"\1"),  # :func:`name`, :mod:`~a.b`
    (re.compile(r"``([^`]+)``"), r"\1"),
    (re.compile(r"`([^`]+)`"), r"\1"),
)


def help_text(doc: str | None) -> str:
    """A docstring's first paragraph as plain help text: no reST markup, no leading ``grootl x:``, a capital first
    letter (``description=help_text(__doc__)`` in a subcommand's parser; the usage table shows the same)."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    for pattern, plain in _RST:
        text = pattern.sub(plain, text)
    return text[:1].upper() + text[1:]


def command_doc(name: str) -> str | None:
    """The docstring a subcommand's help comes from, read from its source without importing it (importing
    would load torch for ``grootl --help``)."""
    path = Path(__file__).resolve().parent.joinpath(*COMMANDS[name].split(".")[1:])  # grootl.a.b: grootl/a/b
    module = ast.parse((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text())
    main = next((node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == "main"), None)
    return (main and ast.get_docstring(main)) or ast.get_docstring(module)


def _usage() -> str:
    lines = ["usage: grootl <command> [args...] | grootl --version", "", "commands:"]
    lines += [f"  {name:<14} {help_text(command_doc(name))}" for name in COMMANDS]
    lines += ["", "Run grootl <command> --help for a command's options."]
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
    module = importlib.import_module(COMMANDS[name])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
