"""Build the model an arm trains (GrootL / LoRA / full) and export the result."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import CONFIG_MAPPING, MambaConfig, PreTrainedModel

from grootl.model import (ADAPTER_SETTINGS, GrootLConfig, GrootLMambaConfig, GrootLMambaForCausalLM, families,
                          load_model, merge_adapter)
from grootl.train.recipe import Recipe, RecipeError
from grootl.train.rundir import TMP_PREFIX, replace_dir

BASE_DIR = "base"
FINAL_DIR = "final"
ADAPTER_DIR = "adapter"


def grootl_settings(recipe: Recipe) -> GrootLConfig:
    """The tree scan is on for ``method: grootl`` only; ``lora`` and ``full`` use the plain scan."""
    return GrootLConfig(**dataclasses.asdict(recipe.grootl), enabled=recipe.method == "grootl")


def build_base(recipe: Recipe) -> PreTrainedModel:
    """The base model: pretrained weights, or a random init from ``model.config`` (seed it first): a
    Mamba config, or with ``model_type`` a config of a supported family (``grootl.model.families``)."""
    dtype = getattr(torch, recipe.model.dtype)
    if recipe.model.init == "random":
        return random_base(recipe.model.config, grootl_settings(recipe)).to(dtype)
    try:
        return load_model(recipe.model.name_or_path, grootl=grootl_settings(recipe), dtype=dtype)
    except ValueError as error:  # load_model's one-line reasons: nothing there, no Mamba checkpoint, bad settings
        raise RecipeError(f"recipe key model.name_or_path: {error}") from None


def random_base(values: dict, grootl: GrootLConfig) -> PreTrainedModel:
    """A random-init GrootL model of a recipe's ``model.config`` (stock config fields, ``model_type``
    naming the family; default ``mamba``); RecipeError naming the config class on a bad field."""
    values = dict(values)
    model_type = values.pop("model_type", "mamba")
    family = families.family_of(model_type)
    if model_type != "mamba" and family is None:
        known = ["mamba", *sorted(families.FAMILIES)]
        raise RecipeError(f"recipe key model.config.model_type {model_type!r} is not a supported family: {known}")
    stock = MambaConfig if family is None else CONFIG_MAPPING[family.model_type]
    unknown = sorted(set(values) - set(stock().to_dict()))
    if unknown:
        raise RecipeError(f"recipe key model.config has unknown {stock.__name__} field(s) {unknown}")
    try:
        config = stock(**values)
    except Exception as error:  # transformers raises TypeError, ValueError or its strict-dataclass errors
        raise RecipeError(f"recipe key model.config is not a valid {stock.__name__}: {error}") from error
    if family is None:
        return GrootLMambaForCausalLM(GrootLMambaConfig.from_mamba(config, grootl))
    return families.from_config(config, grootl)


def save_base(base: PreTrainedModel, tokenizer, out: Path) -> None:
    """Write ``out/base`` (the random init that a LoRA arm's adapter applies to) unless it is there
    complete. Written under a temporary name and renamed, so a kill leaves no partial folder, and a
    resume (which rebuilds the same seeded init) writes one that a kill prevented."""
    base_dir, staging = out / BASE_DIR, out / f"{TMP_PREFIX}{BASE_DIR}"
    if (base_dir / "config.json").is_file():
        return
    shutil.rmtree(staging, ignore_errors=True)
    base.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    replace_dir(staging, base_dir)


def add_lora(model: PreTrainedModel, recipe: Recipe) -> PeftModel:
    """The paper's LoRA (both arms): r, alpha, dropout on ``lora.target_modules``; base frozen."""
    config = LoraConfig(
        r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
        target_modules=list(recipe.lora.target_modules), bias="none", task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated ``is_gradient_checkpointing``: noise the user cannot act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def build_model(recipe: Recipe, out: Path, base: PreTrainedModel | None = None) -> torch.nn.Module:
    """The trainable model for ``recipe.method`` (from ``base``, default a new :func:`build_base`):
    LoRA-wrapped for grootl/lora, the base itself for full. A random-init base is named
    ``out/base`` (where the run saves it), so an exported adapter points there."""
    base = build_base(recipe) if base is None else base
    base.config.use_cache = False
    if recipe.model.init == "random":
        base.name_or_path = base.config._name_or_path = str(out / BASE_DIR)
    return base if recipe.method == "full" else add_lora(base, recipe)


def export_final(model: torch.nn.Module, tokenizer, out: Path) -> Path:
    """Write ``out/final``: the merged model (GrootL settings in config.json) and tokenizer, plus
    ``final/adapter`` (the PEFT adapter) for the LoRA arms. ``model`` is a full (unsharded) copy
    on the main process; it is modified (merged). Written to a temporary folder, then renamed."""
    final, staging = out / FINAL_DIR, out / f"{TMP_PREFIX}{FINAL_DIR}"
    shutil.rmtree(staging, ignore_errors=True)
    if isinstance(model, PeftModel):
        model.save_pretrained(staging / ADAPTER_DIR)
        # the adapter's base is a stock checkpoint: keep the arm's tree settings beside the adapter
        (staging / ADAPTER_DIR / ADAPTER_SETTINGS).write_text(json.dumps(model.get_base_model().grootl.to_dict()))
        model = merge_adapter(model)  # unties a tied output layer first
    model.config.use_cache = True
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    replace_dir(staging, final)
    return final
