"""Code that travels with a saved model: ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
loads a GrootL directory on a machine without grootl.

Every GrootL model (``grootl_mamba`` and each family of :mod:`grootl.model.families`) saves this way:
its ``save_pretrained`` calls :func:`save_portable_code`. ``config.json`` gets an ``auto_map`` naming the
model's own classes (config, causal LM, and the base model where it is GrootL's), and the modules that
define them, with every grootl module they import, are copied from this package's own sources into
the directory as flat files (``grootl/tree/scan.py`` becomes ``grootl_tree_scan.py``, imports of grootl
become relative ones). Blocks marked ``# >>> native dispatch hook`` / ``# >>> grootl package only`` (up
to the matching ``# <<<`` line) stay behind: the copy runs grootl's pure-PyTorch tree scan, with the same
results (mamba-ssm's and causal-conv1d's kernels, imported when a CUDA forward first needs them, serve
its chain where installed, as they serve grootl's).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import warnings
from pathlib import Path

import grootl

STRIPPED_BLOCKS = ("native dispatch hook", "grootl package only")


def flat_name(module: str) -> str:
    """``grootl.tree.scan`` -> ``grootl_tree_scan`` (a package's ``__init__`` takes the package's name)."""
    return module.replace(".", "_")


def auto_classes(model) -> dict[str, type]:
    """The Auto class each of ``model``'s GrootL classes registers with: its config and causal LM, and its
    base model where that is GrootL's own (``GrootLMambaModel``; the families' wrap a stock one)."""
    classes = {"AutoConfig": type(model.config), "AutoModelForCausalLM": type(model)}
    if type(model.base_model).__module__.split(".")[0] == "grootl":
        classes["AutoModel"] = type(model.base_model)
    return classes


def _published(cls: type) -> bool:
    """Whether ``cls`` is an attribute of a grootl module (where the copy finds it)."""
    module = cls.__module__
    return module.split(".")[0] == "grootl" and getattr(importlib.import_module(module), cls.__name__, None) is cls


def save_portable_code(model, directory: str | Path, is_main_process: bool = True) -> list[str]:
    """Before ``model.save_pretrained(directory)``: point ``model.config.auto_map`` at the flat copies of its
    classes (``grootl.model.families.GrootLMamba2Config`` -> ``grootl_model_families.GrootLMamba2Config``)
    and, on the main process, write those modules into ``directory``; returns the file names. A class
    grootl does not publish (a subclass of the user's) gets a warning and no code: the save goes on."""
    classes = auto_classes(model)
    foreign = next((cls for cls in classes.values() if not _published(cls)), None)
    if foreign is not None:
        warnings.warn(f"GrootL: {foreign.__module__}.{foreign.__qualname__} is not a class of grootl's, so "
                      f"{directory} gets no trust_remote_code code (it loads where grootl is installed)", stacklevel=3)
        vars(model.config).pop("auto_map", None)
        return []
    model.config.auto_map = {auto: f"{flat_name(cls.__module__)}.{cls.__name__}" for auto, cls in classes.items()}
    if not is_main_process:
        return []
    os.makedirs(directory, exist_ok=True)
    return write_flat_modules(directory, sorted({cls.__module__ for cls in classes.values()}))


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _strip_blocks(lines: list[str], path: str) -> list[str]:
    kept, open_block = [], None
    for line in lines:
        marker = next((b for b in STRIPPED_BLOCKS if f"# >>> {b}" in line), None)
        if marker and open_block is None:
            open_block = marker
        elif open_block and f"# <<< {open_block}" in line:
            open_block = None
        elif open_block is None:
            kept.append(line)
    if open_block:
        raise ValueError(f"{path}: '# >>> {open_block}' has no closing '# <<< {open_block}' line")
    return kept


def portable_source(module: str) -> tuple[str, list[str]]:
    """``module``'s source rewritten for a model directory, and the grootl modules it imports."""
    path = importlib.import_module(module).__file__
    lines = _strip_blocks(Path(path).read_text().splitlines(keepends=True), path)
    tree = ast.parse("".join(lines), filename=path)
    needed, edits = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "grootl" for a in node.names):
            raise ValueError(f"{path}:{node.lineno}: use 'from grootl... import name' (the portable copy rewrites those)")
        if not isinstance(node, ast.ImportFrom) or node.level or (node.module or "").split(".")[0] != "grootl":
            continue
        indent = " " * node.col_offset
        plain, statements = [], []
        for alias in node.names:
            submodule = f"{node.module}.{alias.name}"
            if _is_module(submodule):  # from grootl.tree import scan
                needed.append(submodule)
                flat = flat_name(submodule)
                note = "# transformers copies the modules that 'from .x import' lines name"
                statements.append(f"{indent}from .{flat} import __name__ as _{flat}_name  {note}\n")
                statements.append(f"{indent}from . import {flat} as {alias.asname or alias.name}\n")
            else:
                plain.append(alias.name + (f" as {alias.asname}" if alias.asname else ""))
        if plain:
            needed.append(node.module)
            statements.insert(0, f"{indent}from .{flat_name(node.module)} import {', '.join(plain)}\n")
        edits.append((node.lineno, node.end_lineno, statements))
    for start, end, statements in sorted(edits, reverse=True):
        lines[start - 1 : end] = statements
    header = f"# Generated by grootl {grootl.__version__} from {module} when this model was saved; do not edit.\n"
    return header + "".join(lines), needed


def write_flat_modules(directory: str | Path, modules: list[str]) -> list[str]:
    """Write the flat copies of ``modules`` and of every grootl module they import into ``directory``;
    returns the file names."""
    done: dict[str, str] = {}
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module in done:
            continue
        done[module], needed = portable_source(module)
        todo.extend(needed)
    for module, source in done.items():
        (Path(directory) / f"{flat_name(module)}.py").write_text(source)
    return sorted(f"{flat_name(m)}.py" for m in done)
