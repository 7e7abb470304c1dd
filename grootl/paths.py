"""Local path or hub id: the one rule ``grootl train`` and ``grootl eval`` use for a user-given name."""

from __future__ import annotations

import re
from pathlib import Path

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # data-file suffix -> datasets builder
_HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")  # owner/name


def is_local_path(name: str | Path, base: str | Path = ".") -> bool:
    """Whether ``name`` means a local file or folder rather than a hub id ``owner/name``: it exists
    (relative to ``base``), or it is no plausible hub id: it starts with ``.``, ``/`` or ``~``, has no
    or several path separators (``data``, ``a/b/c``, ``C:\\x``) or ends in a data-file suffix (``d/x.jsonl``)."""
    text = str(name)
    if (Path(base) / Path(text).expanduser()).exists():
        return True
    return not _HUB_ID.fullmatch(text) or Path(text).suffix.lower() in FILE_BUILDERS
