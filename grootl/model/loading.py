"""Load a stock or GrootL checkpoint (Mamba, or a supported family: grootl.model.families) as a GrootL model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, MambaConfig

from grootl.model.config import GrootLConfig, GrootLMambaConfig, tiny_config
from grootl.model.modeling import GrootLMambaForCausalLM
from grootl.paths import resolve_model


def load_model(
    name_or_path: str,
    grootl: GrootLConfig | dict | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    **kwargs,
) -> GrootLMambaForCausalLM:
    """A GrootL model from a hub id or local directory holding a stock ``mamba`` or a saved
    ``grootl_mamba`` checkpoint. The weights load as they are: no new parameters.

    grootl: the settings to use. An explicit value wins; with None the checkpoint's stored settings
    (``"grootl"`` in its config.json) are used, and a stock checkpoint gets ``GrootLConfig()``.
    dtype: passed to ``from_pretrained`` (e.g. ``torch.bfloat16`` or ``"auto"``); device: where the
    model is moved. Other keyword arguments go to ``from_pretrained`` (``revision``, ``cache_dir``,
    config overrides, ...). A ``grootl train`` run directory means its ``final/`` model. Raises
    ValueError when the path holds no Mamba checkpoint, or at once (no hub retries) when a local-looking
    path (``./x``, ``runs/x``, ``/abs``) does not exist.
    """
    name_or_path = resolve_model(str(name_or_path))
    config, model_kwargs = checkpoint_config(name_or_path, **kwargs)
    if isinstance(config, MambaConfig):
        to_grootl, model_class = GrootLMambaConfig.from_mamba, GrootLMambaForCausalLM
    else:
        from grootl.model import families

        family = families.family_of(config.model_type)
        to_grootl, model_class = family.config.from_stock, family.causal_lm
    grootl = None if grootl is None else GrootLConfig.coerce(grootl)
    try:
        config = to_grootl(config, grootl)
    except ValueError as err:
        raise ValueError(f"{name_or_path!r}: bad 'grootl' settings in its config.json: {err}") from err
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    model = model_class.from_pretrained(name_or_path, config=config, **model_kwargs)
    return model if device is None else model.to(device)


def checkpoint_config(name_or_path: str, **kwargs):
    """The config of the checkpoint at ``name_or_path`` (a folder or hub id) and the keyword arguments it
    did not take, read without loading weights. Raises a one-line ValueError when nothing loads from
    there (a missing hub id, no network), when it is a PEFT adapter, or when it is no Mamba checkpoint (stock,
    GrootL or a family's)."""
    adapter = Path(name_or_path).expanduser() / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        raise ValueError(
            f"{name_or_path!r} is a PEFT adapter{f' of {base!r}' if base else ''}, not a model: load its base with "
            f"load_model and apply it with peft.PeftModel.from_pretrained(model, {name_or_path!r}) (a `grootl train` "
            "run's merged model is <run>/final)"
        )
    try:
        config, unused = AutoConfig.from_pretrained(name_or_path, return_unused_kwargs=True, **kwargs)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load a Mamba checkpoint from {name_or_path!r}: {reason}") from err
    if not isinstance(config, MambaConfig):
        from grootl.model import families

        if families.family_of(config.model_type) is None:  # Mamba-2, Falcon-Mamba, hybrids
            raise ValueError(
                f"{name_or_path!r} is not a Mamba checkpoint: its config has model_type={config.model_type!r}, "
                f"expected 'mamba', {GrootLMambaConfig.model_type!r} or a supported family: {sorted(families.FAMILIES)}"
            )
    return config, unused


def tiny_model(grootl: GrootLConfig | dict | None = None, **overrides) -> GrootLMambaForCausalLM:
    """A randomly initialised GrootL model on :func:`tiny_config` (keyword arguments override it)."""
    return GrootLMambaForCausalLM(GrootLMambaConfig.from_mamba(tiny_config(**overrides), grootl))
