"""Alpaca-format records: load (hub id, JSON / JSONL / Parquet file, ``save_to_disk`` folder), check,
and tokenise into prompt + response with per-row context lengths."""

from __future__ import annotations

import json
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from grootl.data.templates import get_template
from grootl.paths import FILE_BUILDERS, is_local_path

REQUIRED_FIELDS = ("instruction", "output")
DROP_EMPTY_OUTPUT = "empty output"
DROP_LONG_PROMPT = "prompt leaves no room for a response within max_length"
# Below these sizes loading and tokenising take seconds: no progress bars.
LARGE_FILE_BYTES = 50 << 20
LARGE_RECORD_COUNT = 20_000


class DataError(ValueError):
    """Unusable training data; the message names the source, record and field."""


def load_records(source: str | Path, split: str = "train") -> datasets.Dataset:
    """Alpaca-format records from a local file or ``save_to_disk`` folder, else from the hub id
    ``source`` (e.g. ``tatsu-lab/alpaca``). Checks every record (see :func:`check_records`)."""
    path = Path(source).expanduser()
    name = str(source)
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as error:  # datasets raises several types for a folder it cannot read
            raise DataError(f"{path}: not a datasets save_to_disk folder ({error})") from error
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path}: no split {split!r}; splits: {sorted(loaded)}")
            loaded = loaded[split]
        records = loaded
    elif path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(FILE_BUILDERS)}")
        if path.stat().st_size == 0 or builder == "json" and not _first_text(path):
            raise DataError(f"{path}: the file is empty; it needs one Alpaca record per line (JSONL) or a JSON list")
        try:
            with _progress_bars(path.stat().st_size > LARGE_FILE_BYTES), _datasets_log_quiet():
                records = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as error:
            problem = _json_problem(path) if builder == "json" else None
            problem = problem or f"could not read as {builder} ({type(error).__name__}: {error})"
            raise DataError(f"{path}: {problem}") from error
    elif is_local_path(name):
        raise DataError(f"{path}: no such file or folder")
    else:
        try:
            records = datasets.load_dataset(name, split=split)
        except Exception as error:
            raise DataError(f"{name!r} is not a local file or folder and could not be loaded from the hub "
                            f"({type(error).__name__}: {error})") from error
    check_records(records, name)
    return records


@contextmanager
def _progress_bars(show: bool):
    """datasets' progress bars on (large data: they show it is moving) or off (small data: noise)."""
    was_shown = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if show and was_shown else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_shown else datasets.disable_progress_bars)()


@contextmanager
def _datasets_log_quiet():
    """No datasets log lines (a parse error's, with a 0-based row): the DataError says it, once."""
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def _first_text(path: Path, chunk: int = 1 << 16) -> str:
    """The first non-whitespace characters of ``path`` ('' for a file of blanks)."""
    with path.open("rb") as file:
        while block := file.read(chunk):
            if text := block.decode("utf-8", "replace").strip():
                return text
    return ""


def _json_problem(path: Path) -> str | None:
    """Why ``path`` is neither a JSON document nor JSON Lines, naming the 1-based line; None if it reads."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        document = json.loads(text)
        return "holds no records" if document in ([], {}) else None  # else what is wrong is not its syntax
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("["):
            return f"line {error.lineno}, column {error.colno}: not valid JSON ({error.msg})"
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            return f"line {number}: not valid JSON ({error.msg} at column {error.colno})"
        if not isinstance(record, dict):
            return f"line {number}: a JSON {type(record).__name__}, not a record (an object with instruction, output)"
    return None


def check_records(records: datasets.Dataset, name: str) -> None:
    """Raise :class:`DataError` naming ``name`` and the 1-based record number for a record whose
    ``instruction`` or ``output`` is missing or not text, or whose ``input`` is not text."""
    if len(records) == 0:
        raise DataError(f"{name}: holds no records")
    missing = [key for key in REQUIRED_FIELDS if key not in records.column_names]
    if missing:
        raise DataError(f"{name}: records have no {missing} field(s); found fields {records.column_names}; "
                        f"Alpaca format needs instruction, output and optionally input")
    for key in (*REQUIRED_FIELDS, "input"):
        if key not in records.column_names:
            continue
        for number, value in enumerate(records[key], start=1):
            if value is None and key != "input":
                raise DataError(f"{name}: record {number} is missing {key!r}")
            if value is not None and not isinstance(value, str):
                raise DataError(f"{name}: record {number} field {key!r} must be text, got {type(value).__name__}")


@dataclass
class DataReport:
    """What tokenisation did to the records: kept (some trimmed to ``max_length``) and dropped by reason."""

    total: int
    kept: int
    trimmed: int
    max_length: int
    dropped: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        text = f"{self.total} records: {self.kept} kept ({self.trimmed} trimmed to max_length {self.max_length})"
        dropped = sum(self.dropped.values())
        if dropped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.dropped.items()))
            text += f", {dropped} dropped ({reasons})"
        return text

    def to_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "trimmed": self.trimmed,
                "max_length": self.max_length, "dropped": dict(self.dropped)}


def tokenize_records(
    records: datasets.Dataset, tokenizer, template: str = "grootl", max_length: int = 2048, num_proc: int | None = None
) -> tuple[datasets.Dataset, DataReport]:
    """Tokenise prompt and response separately (so the context boundary is exact) into rows with
    ``input_ids`` (prompt + output + EOS, cut to ``max_length``), ``context_len`` (prompt tokens: the
    positions that get label -100) and ``length``. Records with an empty output, or whose prompt alone
    fills ``max_length``, are dropped and counted in the report."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2; got {max_length}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; the response must end with one")
    prompt_format = get_template(template)
    eos = tokenizer.eos_token_id

    def encode(batch):
        inputs = batch["input"] if "input" in batch else [""] * len(batch["instruction"])
        prompts = [prompt_format.format(instruction, input or "") for instruction, input in zip(batch["instruction"], inputs)]
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        output_ids = tokenizer(batch["output"], add_special_tokens=False)["input_ids"]
        rows = {"input_ids": [], "context_len": [], "length": [], "status": []}
        for output, prompt, response in zip(batch["output"], prompt_ids, output_ids):
            ids = prompt + response + [eos]
            if not output.strip():
                status = DROP_EMPTY_OUTPUT
            elif len(prompt) >= max_length:
                status = DROP_LONG_PROMPT
            else:
                status = "trimmed" if len(ids) > max_length else "kept"
            ids = ids[:max_length]
            rows["input_ids"].append(ids)
            rows["context_len"].append(len(prompt))
            rows["length"].append(len(ids))
            rows["status"].append(status)
        return rows

    with _progress_bars(len(records) > LARGE_RECORD_COUNT):
        encoded = records.map(encode, batched=True, remove_columns=records.column_names, num_proc=num_proc,
                              desc="Tokenizing")
        counts = Counter(encoded["status"])
        kept = encoded.filter(lambda status: status in ("kept", "trimmed"), input_columns="status").remove_columns("status")
    report = DataReport(
        total=len(records), kept=len(kept), trimmed=counts["trimmed"], max_length=max_length,
        dropped={reason: n for reason, n in counts.items() if reason not in ("kept", "trimmed")},
    )
    return kept, report
