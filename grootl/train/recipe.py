"""Training recipes: YAML files checked against typed sections, with ``key=value`` overrides.

A recipe may start from another: ``extends: path/to/base.yaml`` takes the base's values and lays the
file's own over them, section by section (see :func:`read_recipe_file`).

Paths: relative paths *inside a recipe file* (``model.name_or_path``, ``model.tokenizer``, ``data.path``,
``data.eval_path``) resolve against the recipe file's folder; paths given as command-line overrides
and ``output_dir`` resolve against the current directory. A value that is not a local path (see
:func:`grootl.paths.is_local_path`: a plausible ``owner/name`` with nothing there) is kept as a hub id.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from grootl.paths import is_local_path

METHODS = ("grootl", "lora", "full")
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("no", "bf16", "fp16")
DTYPES = ("float32", "bfloat16", "float16")
PATH_KEYS = ("model.name_or_path", "model.tokenizer", "data.path", "data.eval_path")


class RecipeError(ValueError):
    """A recipe that does not fit the schema; the message names the key and what is allowed (and, from
    :func:`load_recipe`, the file or ``command line`` that set it). ``key``: the dotted key at fault, if one is."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass
class ModelSection:
    name_or_path: str | None = None  # hub id or local folder of a pretrained Mamba (init: pretrained)
    init: str = "pretrained"  # pretrained | random (tiny models for demos and tests)
    config: dict = field(default_factory=dict)  # MambaConfig fields for init: random
    tokenizer: str | None = None  # hub id or folder; default: name_or_path
    dtype: str = "float32"  # weight (master) dtype; mixed precision is train.mixed_precision


@dataclass
class GrootLSection:
    modulation: float = 0.3
    k: int = 3
    distance: str = "cosine"


@dataclass
class LoraSection:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: ["x_proj", "embeddings", "in_proj", "out_proj"])


@dataclass
class DataSection:
    path: str = "tatsu-lab/alpaca"  # hub id, JSON / JSONL / Parquet file or save_to_disk folder
    split: str = "train"
    template: str = "grootl"  # see grootl.data.templates
    max_length: int = 2048
    limit: int | None = None  # use only the first N records
    eval_path: str | None = None  # separate eval records, else eval_size held out from path
    eval_size: int = 0
    num_proc: int | None = None


@dataclass
class TrainSection:
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; default: epochs over the data
    batch_size: int = 4  # per device, per micro-step
    grad_accum: int = 4
    lr: float = 2e-5
    weight_decay: float = 0.0
    schedule: str = "constant"  # after warm-up: constant | cosine | linear
    warmup_steps: int = 20
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16 (autocast; master weights stay model.dtype)
    gradient_checkpointing: bool = False
    group_by_length: bool = True
    num_workers: int = 0
    cpu_threads: int | None = None  # torch CPU threads (None: torch's default); 1 is fastest for tiny models


@dataclass
class EvalSection:
    every: int | None = None  # optimizer steps between evals (and once at the end when eval data exists)
    batch_size: int | None = None  # default: train.batch_size


@dataclass
class CheckpointSection:
    every: int | None = 500  # optimizer steps (and the last step); None: no checkpoints
    keep: int = 2


@dataclass
class LogSection:
    every: int = 10  # optimizer steps between metric lines
    trackers: list = field(default_factory=lambda: ["tensorboard"])  # any Accelerate trackers
    progress: bool = True


@dataclass
class Recipe:
    output_dir: str
    method: str = "grootl"  # grootl (LoRA + tree scan) | lora (same LoRA, plain scan) | full
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    grootl: GrootLSection = field(default_factory=GrootLSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def valid_keys(cls=Recipe, prefix: str = "") -> list[str]:
    """Every dotted key a recipe may set."""
    keys = []
    for name, hint in _hints(cls).items():
        keys += valid_keys(hint, f"{prefix}{name}.") if dataclasses.is_dataclass(hint) else [prefix + name]
    return keys


def unknown_keys_error(keys: list[str], single: bool = False) -> RecipeError:
    """The error for recipe keys the schema lacks: all valid keys, then the one each key most likely meant."""
    valid = valid_keys()
    named = f"key {keys[0]!r}" if single else f"key(s) {keys}"
    meant = [f"{close[0]} for {key}" for key in keys if (close := difflib.get_close_matches(key, valid, n=1, cutoff=0.75))]
    hint = f"; did you mean {', '.join(meant)}?" if meant else ""
    return RecipeError(f"unknown recipe {named}; valid keys: {', '.join(valid)}{hint}", keys[0])


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_type(key: str, value: Any, hint: Any) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise RecipeError(f"recipe key {key} must not be empty (null)", key)
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is float and isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if origin is int and isinstance(value, bool):
            continue
        if origin is not type(None) and isinstance(value, origin):
            return value
    names = " or ".join("null" if o is type(None) else (typing.get_origin(o) or o).__name__ for o in options)
    raise RecipeError(f"recipe key {key} must be {names}; got {value!r}", key)


def _build(cls, values: Any, sources: dict[str, str], prefix: str = ""):
    """``cls`` from ``values``; unknown keys are reported for one source at a time (see :func:`_source`)."""
    if not isinstance(values, dict):
        section = prefix.rstrip(".")
        raise RecipeError(f"recipe section {section or '(top level)'} must be a mapping; got {values!r}", section or None)
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(prefix + k for k in set(values) - names)
    if unknown:
        first = _source(unknown[0], sources)
        raise unknown_keys_error([key for key in unknown if _source(key, sources) == first])
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, sources, f"{prefix}{name}.")
        else:
            if prefix + name == "train.mixed_precision" and value is False:
                value = "no"  # YAML 1.1 reads a bare `no` as false
            kwargs[name] = _check_type(prefix + name, value, hint)
    try:
        return cls(**kwargs)
    except TypeError:  # a required key is missing
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        raise RecipeError(f"recipe is missing required key(s) {[prefix + m for m in missing]}") from None


COMMAND_LINE = "command line"  # the source of key=value overrides in error messages


def _shown(path: Path) -> str:
    """A recipe file as error messages name it: relative to the current directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _record(sources: dict[str, str], values: Any, source: str, prefix: str = "") -> None:
    """Note ``source`` as the origin of each dotted key in ``values`` (the newest source last in order)."""
    if isinstance(values, dict) and values:
        for name, value in values.items():
            _record(sources, value, source, f"{prefix}{name}.")
    elif prefix:
        sources.pop(prefix[:-1], None)
        sources[prefix[:-1]] = source


def _source(key: str | None, sources: dict[str, str]) -> str | None:
    """The source that set ``key``: its own, else that of the nearest enclosing section set as a whole, else
    (a section) the newest source of a key inside it; None when nothing in ``sources`` set it."""
    if key is None:
        return None
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        if (found := sources.get(".".join(parts[:end]))) is not None:
            return found
    inside = [source for name, source in sources.items() if name.startswith(key + ".")]
    return inside[-1] if inside else None


def _located(error: RecipeError, sources: dict[str, str], fallback: str | None) -> RecipeError:
    """``error`` prefixed with the file (or ``command line``) that set its key, else with ``fallback``."""
    source = _source(error.key, sources) or fallback
    return RecipeError(f"{source}: {error}", error.key) if source else error


def _resolve_paths(values: dict, base: Path) -> None:
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = values.get(section, {}).get(name) if isinstance(values.get(section), dict) else None
        if isinstance(value, str) and not Path(value).expanduser().is_absolute() and is_local_path(value, base):
            values[section][name] = str((base / value).resolve())


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with the value read as YAML (``lr=1e-4`` is a number, ``[a, b]`` a list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {text!r} must look like key=value (dotted keys for nested fields)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise RecipeError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(error)})") from None
    return key.strip(), value


FREE_SECTIONS = ("model.config.",)  # dicts passed on as they are (MambaConfig fields)


def apply_override(values: dict, key: str, value: Any) -> None:
    if key not in valid_keys() and not key.startswith(FREE_SECTIONS):
        raise unknown_keys_error([key], single=True)
    *sections, name = key.split(".")
    node = values
    for depth, section in enumerate(sections):
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise RecipeError(f"recipe section {section} must be a mapping", ".".join(sections[:depth + 1]))
    node[name] = value


def _merge(base: dict, values: dict) -> dict:
    """``values`` over ``base``, mapping by mapping (a list or scalar replaces the base's)."""
    merged = dict(base)
    for key, value in values.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what is wrong, and where for a file's."""
    problem = getattr(error, "problem", None) or str(error)
    mark = getattr(error, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else " ".join(problem.split())


def read_recipe_file(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """A recipe file's values, its relative paths resolved against its folder, over the values of the
    recipe it names in ``extends:`` (a path relative to it), so one file can state only what differs; and
    the file each dotted key came from (as error messages name it)."""
    where = f" (extended by {_shown(chain[-1])})" if chain else ""
    if not path.is_file():
        raise RecipeError(f"recipe file {_shown(path)} does not exist{where}")
    if path in chain:
        raise RecipeError(f"{_shown(chain[-1])}: extends: makes a cycle through {_shown(path)}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{_shown(path)}: not valid YAML ({_yaml_problem(error)})") from None
    if not isinstance(values, dict):
        raise RecipeError(f"{_shown(path)}: a recipe must be a mapping of keys, got {type(values).__name__}")
    _resolve_paths(values, path.parent)
    parent = values.pop("extends", None)
    if parent is None:
        base, sources = {}, {}
    elif isinstance(parent, str):
        base, sources = read_recipe_file((path.parent / parent).resolve(), (*chain, path))
    else:
        raise RecipeError(f"{_shown(path)}: extends must be the path of another recipe file; got {parent!r}")
    _record(sources, values, _shown(path))
    return _merge(base, values), sources


def load_recipe(path: str | Path | None = None, overrides: list[str] = (), values: dict | None = None) -> Recipe:
    """A checked :class:`Recipe` from a YAML file (or a dict) plus ``key=value`` overrides. An error names
    the file (through ``extends:``) or ``command line`` that set the key at fault."""
    sources, top = {}, None
    if path is not None:
        path = Path(path).resolve()
        values, sources = read_recipe_file(path)
        top = _shown(path)
    values = dict(values or {})
    for text in overrides:
        try:
            key, value = parse_override(text)
            apply_override(values, key, value)
        except RecipeError as error:  # the override's own fault, unless a file set a section it enters to a scalar
            in_file = error.key not in (None, text.partition("=")[0].strip())
            raise _located(error, sources if in_file else {}, COMMAND_LINE) from None
        _record(sources, value, COMMAND_LINE, key + ".")
        if key in PATH_KEYS and isinstance(value, str):
            _resolve_paths(values, Path.cwd())
    if isinstance(values.get("output_dir"), str):
        values["output_dir"] = str(Path(values["output_dir"]).expanduser().resolve())
    try:
        recipe = _build(Recipe, values, sources)
        check_recipe(recipe)
    except RecipeError as error:
        raise _located(error, sources, top) from None
    return recipe


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise RecipeError(f"recipe key {key} must be one of {list(allowed)}; got {value!r}", key)


def _positive(key: str, value: Any, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise RecipeError(f"recipe key {key} must be {'>= 0' if allow_zero else '> 0'}; got {value!r}", key)


def check_recipe(recipe: Recipe) -> None:
    """Value checks beyond types: choices, ranges, and what each model init needs."""
    from grootl.data.templates import TEMPLATES
    from grootl.model.config import GrootLConfig

    _choice("method", recipe.method, METHODS)
    _choice("model.init", recipe.model.init, ("pretrained", "random"))
    _choice("model.dtype", recipe.model.dtype, DTYPES)
    _choice("train.schedule", recipe.train.schedule, SCHEDULES)
    _choice("train.mixed_precision", recipe.train.mixed_precision, PRECISIONS)
    _choice("data.template", recipe.data.template, tuple(TEMPLATES))
    if recipe.model.init == "pretrained" and not recipe.model.name_or_path:
        raise RecipeError("recipe key model.name_or_path is required when model.init is pretrained", "model.init")
    if recipe.model.init == "random" and not recipe.model.tokenizer:
        raise RecipeError("recipe key model.tokenizer is required when model.init is random", "model.init")
    for key in ("train.epochs", "train.batch_size", "train.grad_accum", "train.lr", "train.max_steps",
                "data.max_length", "data.limit", "train.cpu_threads", "eval.every", "eval.batch_size", "checkpoint.every",
                "checkpoint.keep", "log.every", "lora.r", "lora.alpha"):
        section, name = key.split(".")
        _positive(key, getattr(getattr(recipe, section), name))
    if recipe.data.max_length < 2:
        raise RecipeError(f"recipe key data.max_length must be at least 2 (a prompt and a response token); "
                          f"got {recipe.data.max_length}", "data.max_length")
    for key in ("train.weight_decay", "train.warmup_steps", "train.num_workers", "train.max_grad_norm",
                "data.eval_size", "lora.dropout"):
        section, name = key.split(".")
        _positive(key, getattr(getattr(recipe, section), name), allow_zero=True)
    try:
        GrootLConfig(**dataclasses.asdict(recipe.grootl))
    except ValueError as error:
        raise RecipeError(f"recipe section grootl: {error}", "grootl") from None
