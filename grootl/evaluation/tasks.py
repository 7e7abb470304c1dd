"""The paper's zero-shot suite and the offline task YAMLs (package data in ``offline_tasks/``).

Each YAML in ``offline_tasks/`` is lm-eval's standard task (same name, prompt, choices and metrics) reading a
local JSONL file ``__DATA_DIR__/<task>_<split>.jsonl``. lm-eval needs absolute data paths, so
:func:`render_offline_tasks` writes copies with the data directory filled in, for ``--include_path``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

PAPER_SUITE = ("piqa", "arc_easy", "sst2", "winogrande", "lambada_openai", "race", "openbookqa")
TASK_TEMPLATES = Path(__file__).resolve().parent / "offline_tasks"
DATA_DIR_TOKEN = "__DATA_DIR__"


def offline_data_files(templates: Path = TASK_TEMPLATES) -> dict[str, list[str]]:
    """Task name → the ``<task>_<split>.jsonl`` file names its offline YAML reads from ``--data-dir``."""
    return {path.stem: re.findall(rf"{DATA_DIR_TOKEN}/([^\"'\s]+)", path.read_text())
            for path in sorted(Path(templates).glob("*.yaml"))}


def render_offline_tasks(data_dir: str | Path, dest: str | Path, templates: Path = TASK_TEMPLATES) -> Path:
    """Write the task YAMLs of ``templates`` into ``dest`` reading their JSONL files from ``data_dir``."""
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir} is not a directory")
    yamls = sorted(Path(templates).glob("*.yaml"))
    if not yamls:
        raise FileNotFoundError(f"no offline task YAMLs in {templates}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    # JSON string escapes are valid inside the YAMLs' double-quoted scalars.
    quoted_dir = json.dumps(str(data_dir))[1:-1]
    for path in yamls:
        (dest / path.name).write_text(path.read_text().replace(DATA_DIR_TOKEN, quoted_dir))
    return dest


def missing_data_files(task_manager, tasks: list[str]) -> list[str]:
    """``"task: path"`` for every local data file a selected task reads that does not exist."""
    from lm_eval.tasks._yaml_loader import load_yaml

    missing = []
    for name in tasks:
        entry = task_manager.task_index.get(name)
        if entry is None or entry.yaml_path is None:
            continue
        config = load_yaml(entry.yaml_path, resolve_func=False)
        data_files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
        files = data_files.values() if isinstance(data_files, dict) else [data_files]
        for file in files:
            for path in [file] if isinstance(file, str) else file:
                if not any(c in path for c in "*?[") and not Path(path).exists():
                    missing.append(f"{name}: {path}")
    return missing
