"""What every GrootL family shares: the config that stores the GrootL settings, and the causal-LM wrapper
that turns stock mixers into GrootL mixers and hands each forward's prompt lengths to them.

A family is the stock transformers config, causal LM and mixer class plus the GrootL mixer class that
replaces the mixer; :func:`make_family` derives the GrootL config and model classes from them, so a
new family is one :class:`Family` entry (``grootl.model.families``), not a copied model.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PretrainedConfig

from grootl.model.config import GrootLConfig
from grootl.model.modeling import (NO_PROMPT_WARNING, check_context_lens, context_lens_from_labels, generation_prompt,
                                   left_padding)


class GrootLConfigMixin:
    """Put before a stock config class: adds the ``grootl`` dict (the :class:`GrootLConfig` fields)."""

    grootl: dict | None = None

    @property
    def grootl_config(self) -> GrootLConfig:
        return GrootLConfig.coerce(self.grootl)

    @classmethod
    def from_stock(cls, config: PretrainedConfig, grootl: GrootLConfig | dict | None = None):
        """Copy of a stock (or GrootL) config with ``grootl`` (None keeps the config's own, else the defaults)."""
        values = config.to_dict()
        for key in ("model_type", "transformers_version", "architectures"):
            values.pop(key, None)
        if grootl is None:
            grootl = values.get("grootl")
        values["grootl"] = GrootLConfig.coerce(grootl).to_dict()
        return cls(**values)


class GrootLCausalLMMixin:
    """Put before a stock ``*ForCausalLM``: every stock mixer (``stock_mixer``) becomes ``grootl_mixer``
    in place (same parameters and names: stock weights load, state dicts match), attention, MLP and MoE
    layers stay as they are. ``forward`` also takes ``context_lens`` (batch,): each row's prompt length;
    without it the leading ``-100`` run of ``labels``, else no prompt (the tree is the chain)."""

    stock_causal_lm: type
    stock_mixer: type
    grootl_mixer: type

    def __init__(self, config):
        if not isinstance(config, GrootLConfigMixin):
            config = self.config_class.from_stock(config)
        config.grootl = config.grootl_config.to_dict()  # validated, and never None in a saved config
        super().__init__(config)
        grootl = config.grootl_config
        stock, mixer = self.stock_mixer.__name__, self.grootl_mixer.__name__
        for module in self.modules():
            if type(module) is self.stock_mixer:
                module.__class__ = self.grootl_mixer
                module.grootl = grootl
            # FSDP's wrap policy and device_map find these layer classes by name: the mixer's is GrootL's now
            no_split = getattr(module, "_no_split_modules", None)
            if isinstance(no_split, set) and stock in no_split:
                module._no_split_modules = no_split - {stock} | {mixer}
        # nor can a class whose layers tie weights to each other (Zamba's shared block) be an FSDP unit: FSDP2
        # refuses to shard one weight in two units (its weights stay in the enclosing unit)
        shared = _layer_classes_sharing_weights(self)
        for module in self.modules():
            if isinstance(getattr(module, "_no_split_modules", None), set):
                module._no_split_modules = module._no_split_modules - shared
        # the mixers get their prompt when the backbone runs, also when a caller runs it directly (TRL's fused LM
        # head does), never the stale one of an earlier forward
        self._labels_context_lens = None
        self.base_model.register_forward_pre_hook(self._give_mixers_the_prompt, with_kwargs=True)

    @classmethod
    def is_custom_code(cls) -> bool:
        """As the stock class: its own ``_init_weights`` initialises the weights (transformers skips modules
        of custom code whose direct parameters loaded, which would leave Falcon-H1's µP buffers unset)."""
        return cls.stock_causal_lm.is_custom_code()

    @property
    def grootl(self) -> GrootLConfig:
        """The GrootL settings every mixer uses."""
        return self.config.grootl_config

    def grootl_mixers(self) -> list:
        return [m for m in self.modules() if isinstance(m, self.grootl_mixer)]

    def set_grootl(self, grootl: GrootLConfig | dict) -> None:
        """Switch the GrootL settings of every mixer (and of the saved config) in place."""
        grootl = GrootLConfig.coerce(grootl)
        self.config.grootl = grootl.to_dict()
        for mixer in self.grootl_mixers():
            mixer.grootl = grootl

    # >>> grootl package only: the portable copy of this file saves as stock transformers does
    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, plus the code that lets ``AutoModelForCausalLM.from_pretrained(
        dir, trust_remote_code=True)`` load the directory where grootl is not installed
        (:mod:`grootl.model.portable`)."""
        from grootl.model.portable import save_portable_code

        save_portable_code(self, save_directory, kwargs.get("is_main_process", True))
        return super().save_pretrained(save_directory, *args, **kwargs)
    # <<< grootl package only

    def generate(self, inputs: Tensor | None = None, *args, **kwargs):
        """``GenerationMixin.generate``, with ``context_lens`` defaulting to the prompt's length (its
        left padding, from ``attention_mask``, stays out of the tree)."""
        return super().generate(inputs, *args, **generation_prompt(inputs, kwargs))

    def forward(self, *args, context_lens: Tensor | None = None, **kwargs):
        """The stock forward; ``context_lens`` (else the leading ``-100`` run of ``labels``) and left padding (from
        ``attention_mask``) go to the mixers."""
        labels = inspect.signature(super().forward).bind_partial(*args, **kwargs).arguments.get("labels")
        if context_lens is None and labels is not None:
            context_lens = context_lens_from_labels(labels)
        self._labels_context_lens = context_lens  # for the backbone's pre-hook: not every stock forward passes it on
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._labels_context_lens = None

    def _give_mixers_the_prompt(self, backbone, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook of the backbone: set every mixer's ``tree_inputs`` from this call's ``context_lens`` (a
        keyword of a direct backbone call, else the enclosing :meth:`forward`'s) and ``attention_mask``; no
        prompt when neither gives one. Decoding past a cached state leaves them (every position is on the chain)."""
        kwargs = dict(kwargs)
        context_lens = kwargs.pop("context_lens", None)
        if context_lens is None:
            context_lens = self._labels_context_lens
        named = inspect.signature(backbone.forward).bind_partial(*args, **kwargs).arguments
        embeds = named.get("input_ids", named.get("inputs_embeds"))
        mask = named.get("attention_mask")
        mixers = self.grootl_mixers()
        if embeds is not None and mixers and not _continues(named, mixers[0].layer_idx):
            batch, length = embeds.shape[:2]
            if context_lens is not None:
                context_lens = check_context_lens(context_lens, batch, length, embeds.device)
            elif self.training and not torch.compiler.is_compiling() and self.grootl.active:
                warnings.warn(NO_PROMPT_WARNING, stacklevel=3)
            start = left_padding(mask[:, -length:]) if mask is not None and mask.dim() == 2 else None
            for mixer in mixers:
                mixer.tree_inputs = (context_lens, start)
        return args, kwargs


def _layer_classes_sharing_weights(model) -> set[str]:
    """The names of the model's no-split layer classes whose instances tie weights to one another."""
    layers = {name: type(m).__name__ for name, m in model.named_modules() if type(m).__name__ in model._no_split_modules}

    def layer_of(param: str) -> str | None:
        return next((name for name in layers if param.startswith(name + ".")), None)

    shared = set()
    for target, source in model.all_tied_weights_keys.items():
        a, b = layer_of(target), layer_of(source)
        if a is not None and b is not None and a != b:
            shared |= {layers[a], layers[b]}
    return shared


def _continues(named: dict, layer_idx: int) -> bool:
    """Whether the forward continues from a cache that already holds a recurrent state (decoding)."""
    cache = next((named[k] for k in ("cache", "past_key_values", "cache_params") if named.get(k) is not None), None)
    if cache is None or len(getattr(cache, "layers", ())) <= layer_idx:
        return False
    return cache.get_recurrent_state(layer_idx) is not None


@dataclass(frozen=True)
class Family:
    """A stock model family and its GrootL classes. ``lora_targets``: the module names LoRA adapts."""

    model_type: str  # the stock checkpoint's
    config: type  # GrootL config class (model_type ``grootl_<stock>``)
    causal_lm: type  # GrootL causal LM class
    lora_targets: tuple[str, ...]
    examples: tuple[str, ...] = ()  # hub ids of real checkpoints

    @property
    def grootl_model_type(self) -> str:
        return self.config.model_type


def make_family(stock_config: type, stock_causal_lm: type, stock_mixer: type, grootl_mixer_base: type,
                lora_targets: tuple[str, ...], examples: tuple[str, ...] = ()) -> Family:
    """Derive a family's GrootL classes (named ``GrootL<Stock...>``) from its stock classes. Their ``__module__``
    is the caller's (as for ``collections.namedtuple``), which publishes them: pickling and a saved model's
    ``auto_map`` find them there, in grootl and in the portable copy alike."""
    module = sys._getframe(1).f_globals["__name__"]
    config = type("GrootL" + stock_config.__name__, (GrootLConfigMixin, stock_config), {
        "model_type": "grootl_" + stock_config.model_type, "__module__": module,
        "__annotations__": {"grootl": dict | None},
        "__doc__": f"``{stock_config.__name__}`` plus the GrootL settings (``grootl``).",
    })
    mixer = type("GrootL" + stock_mixer.__name__, (grootl_mixer_base, stock_mixer), {"__module__": module})

    def forward(self, *args, context_lens: Tensor | None = None, **kwargs):
        return GrootLCausalLMMixin.forward(self, *args, context_lens=context_lens, **kwargs)

    # the stock signature plus context_lens: generate() passes only the inputs a forward's signature names
    stock = inspect.signature(stock_causal_lm.forward)
    params = [p for p in stock.parameters.values() if p.kind != p.VAR_KEYWORD]
    params += [inspect.Parameter("context_lens", inspect.Parameter.KEYWORD_ONLY, default=None)]
    params += [p for p in stock.parameters.values() if p.kind == p.VAR_KEYWORD]
    forward.__signature__ = stock.replace(parameters=params)
    forward.__doc__ = GrootLCausalLMMixin.forward.__doc__
    causal_lm = type("GrootL" + stock_causal_lm.__name__, (GrootLCausalLMMixin, stock_causal_lm), {
        "config_class": config, "stock_causal_lm": stock_causal_lm, "stock_mixer": stock_mixer, "grootl_mixer": mixer, "__module__": module,
        "forward": forward, "__doc__": f"``{stock_causal_lm.__name__}`` whose mixers merge the GrootL tree scan.",
    })
    return Family(stock_config.model_type, config, causal_lm, lora_targets, examples)
