"""GrootL settings, the config class that stores them in ``config.json``, and a tiny test config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from transformers import MambaConfig

from grootl.tree import DISTANCES


ADAPTER_SETTINGS = "grootl.json"  # GrootLConfig.to_dict() saved beside a PEFT adapter of a stock base


@dataclass(frozen=True)
class GrootLConfig:
    """How each Mamba block merges the tree scan: ``y = y_chain + modulation * y_tree``.

    modulation: λ >= 0 (0.3 in the paper); k: prompt positions ``t-1 .. t-k`` are graph neighbours of
    ``t``; distance: edge weight between positions' ``X`` features (one of ``grootl.tree.DISTANCES``);
    enabled: False (or modulation 0) gives exactly the plain Mamba scan with no tree cost.
    """

    modulation: float = 0.3
    k: int = 3
    distance: str = "cosine"
    enabled: bool = True

    def __post_init__(self):
        if isinstance(self.modulation, bool) or not isinstance(self.modulation, (int, float)):
            raise ValueError(f"GrootLConfig.modulation must be a number; got {self.modulation!r}")
        if not self.modulation >= 0 or self.modulation == float("inf"):
            raise ValueError(f"GrootLConfig.modulation must be a finite number >= 0; got {self.modulation!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"GrootLConfig.k must be an int >= 1; got {self.k!r}")
        if self.distance not in DISTANCES:
            raise ValueError(f"GrootLConfig.distance must be one of {DISTANCES}; got {self.distance!r}")
        if not isinstance(self.enabled, bool):
            raise ValueError(f"GrootLConfig.enabled must be True or False; got {self.enabled!r}")

    @property
    def active(self) -> bool:
        """Whether the tree branch runs at all."""
        return self.enabled and self.modulation > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GrootLConfig":
        """Build from a dict (e.g. the ``grootl`` entry of ``config.json``); unknown keys are an error."""
        if not isinstance(values, dict):
            raise ValueError(f"a GrootL config must be a dict; got {type(values).__name__}: {values!r}")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown GrootL config field(s) {unknown}; known: {[f.name for f in fields(cls)]}")
        return cls(**values)

    @classmethod
    def coerce(cls, value: "GrootLConfig | dict | None") -> "GrootLConfig":
        """A GrootLConfig from a GrootLConfig, a dict, or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        return cls.from_dict(value)


class GrootLMambaConfig(MambaConfig):
    """A ``MambaConfig`` plus a ``grootl`` dict (the :class:`GrootLConfig` fields).

    Its own ``model_type`` ("grootl_mamba") marks a model whose mixers call ``out_proj`` as a module
    (PEFT may put LoRA on it) and lets ``AutoModelForCausalLM`` find the GrootL classes once
    ``grootl.model`` is imported. Stock ``MambaForCausalLM.from_pretrained`` still loads the weights.
    """

    model_type = "grootl_mamba"
    grootl: dict | None = None

    @classmethod
    def from_mamba(cls, config: MambaConfig, grootl: GrootLConfig | dict | None = None) -> "GrootLMambaConfig":
        """Copy of a Mamba config with ``grootl`` (None keeps the config's own, else the defaults)."""
        values = config.to_dict()
        values.pop("model_type", None)
        values.pop("transformers_version", None)
        values.pop("intermediate_size", None)  # derived from expand * hidden_size
        if grootl is None:
            grootl = values.get("grootl")
        values["grootl"] = GrootLConfig.coerce(grootl).to_dict()
        return cls(**values)

    @property
    def grootl_config(self) -> GrootLConfig:
        return GrootLConfig.coerce(self.grootl)


def tiny_config(**overrides) -> MambaConfig:
    """A tiny random-init-friendly ``MambaConfig`` (hidden 32, 2 layers, state 8, vocab 512) for tests
    and CPU demos; keyword arguments override any field."""
    values = dict(hidden_size=32, num_hidden_layers=2, state_size=8, vocab_size=512, expand=2, conv_kernel=4)
    values.update(overrides)
    return MambaConfig(**values)
