"""Local path or hub id: the one rule the ``grootl`` commands use for a user-given name, and what a model
name means (a model folder, a run folder's ``final/``, or a hub id)."""

from __future__ import annotations

import os
import re
from pathlib import Path

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # data-file suffix -> datasets builder
_HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")  # owner/name


def is_local_path(name: str | Path, base: str | Path = ".") -> bool:
    """Whether ``name`` means a local file or folder rather than a hub id ``owner/name``: it exists
    (relative to ``base``), its folder does (``runs/typo`` with a ``runs/`` here), or it is no plausible hub
    id: it starts with ``.``, ``/`` or ``~``, has no or several path separators (``data``, ``a/b/c``,
    ``C:\\x``) or ends in a data-file suffix (``d/x.jsonl``)."""
    text = str(name)
    path = Path(base) / Path(text).expanduser()
    if path.exists() or path.parent.is_dir() and path.parent != Path(base):
        return True
    return not _HUB_ID.fullmatch(text) or Path(text).suffix.lower() in FILE_BUILDERS


class PathError(ValueError):
    """A user-given path that does not exist or does not hold what it should; the message says which."""


def missing_path_error(name: str, what: str) -> PathError | None:
    """The error for ``name`` not existing, or None where it can still be a hub id (``owner/name``, hub online)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    if is_local_path(name) or offline:
        return PathError(f"{what} {name} does not exist" + (" (and HF_HUB_OFFLINE is set)" if offline else ""))
    return None


def resolve_model(name: str) -> str:
    """The model folder or hub id ``name`` means: a folder holding a model (config.json) or an adapter
    (adapter_config.json) as it is, a ``grootl train`` run folder its merged ``final/``."""
    path = Path(name).expanduser()
    if not path.exists():
        if error := missing_path_error(name, "model path"):
            raise error
        return name
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return name
    if (path / "final" / "config.json").is_file():
        return str(path / "final")
    raise PathError(f"model path {name} holds no model (config.json), adapter (adapter_config.json) or run (final/)")
