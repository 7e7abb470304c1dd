"""GrootL Mamba models: transformers' Mamba classes with :class:`GrootLMixer` blocks and an explicit
``context_lens`` argument threaded from ``forward`` down to every mixer.

The one rule for the prompt (the positions the tree may mix): ``context_lens`` when given, else the
leading ``-100`` run of ``labels``, else **empty** (the tree is the chain: causal, exactly what
decoding does). ``generate`` passes the prompt's length itself, with or without the cache.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg
from transformers.models.mamba.modeling_mamba import (
    MambaBlock,
    MambaCausalLMOutput,
    MambaForCausalLM,
    MambaModel,
    MambaOutput,
    MambaPreTrainedModel,
    MambaRMSNorm,
)

from grootl.model.config import GrootLConfig, GrootLMambaConfig
from grootl.model.mixer import GrootLMixer

IGNORE_INDEX = -100
NO_PROMPT_WARNING = (
    "GrootL: a training forward without labels or context_lens reads an empty prompt (the tree is the chain); in "
    "TRL's SFTTrainer or transformers' Trainer use grootl.integrations.give_prompts"
)


def context_lens_from_labels(labels: Tensor) -> Tensor:
    """Per-row length of the leading run of ``-100`` labels (the prompt): (batch,) int64."""
    answered = labels != IGNORE_INDEX
    first = answered.int().argmax(dim=1)
    return torch.where(answered.any(dim=1), first, labels.shape[1]).long()


def left_padding(attention_mask: Tensor | None) -> Tensor | None:
    """Per-row count of leading zeros in ``attention_mask`` (left padding), or None without a mask."""
    if attention_mask is None:
        return None
    return (attention_mask.cumsum(dim=1) == 0).sum(dim=1)


def continues_from_cache(cache) -> bool:
    """Whether ``cache`` already holds a recurrent state (so this forward decodes past a prefill)."""
    return cache is not None and len(cache.layers) > 0 and cache.get_recurrent_state(0) is not None


def generation_prompt(inputs: Tensor | None, kwargs: dict) -> dict:
    """``generate``'s keyword arguments with ``context_lens`` set to the prompt's length (the whole
    ``inputs`` / ``input_ids`` / ``inputs_embeds``; left padding stays out of the tree) unless given."""
    if kwargs.get("context_lens") is None:
        prompt = next((x for x in (inputs, kwargs.get("input_ids"), kwargs.get("inputs_embeds")) if x is not None), None)
        if isinstance(prompt, Tensor) and prompt.dim() >= 2:
            kwargs = {**kwargs, "context_lens": torch.full((prompt.shape[0],), prompt.shape[1], device=prompt.device)}
    return kwargs


def check_context_lens(context_lens, batch: int, length: int, device) -> Tensor:
    """``context_lens`` as a (batch,) int64 tensor with values in [0, length]; ValueError otherwise.
    While torch.compile or torch.export traces, only the dtype and shape are checked (a value check
    would read the tensor on the host)."""
    try:
        lens = torch.as_tensor(context_lens, device=device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"context_lens must be a (batch,) sequence of ints; got {context_lens!r}") from err
    if lens.is_floating_point() or lens.dtype == torch.bool or lens.is_complex():
        raise ValueError(f"context_lens must hold integers; got dtype {lens.dtype}")
    if lens.shape != (batch,):
        raise ValueError(f"context_lens must have shape ({batch},), one per row; got {tuple(lens.shape)}")
    if torch.compiler.is_compiling():
        return lens.long()
    bad = ((lens < 0) | (lens > length)).nonzero().flatten().tolist()
    if bad:
        row = bad[0]
        raise ValueError(
            f"context_lens[{row}] = {int(lens[row])} is outside [0, {length}] (the sequence length {length})"
        )
    return lens.long()


class GrootLMambaBlock(MambaBlock):
    """``MambaBlock`` with a :class:`GrootLMixer` that receives ``context_lens`` and ``start``."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.mixer = GrootLMixer(config, layer_idx=layer_idx, initialize_mixer_weights=False)

    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    def forward(self, hidden_states, cache=None, attention_mask=None, context_lens=None, start=None, **kwargs):
        residual = hidden_states
        hidden_states = self.norm(hidden_states.to(dtype=self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        hidden_states = self.mixer(
            hidden_states, cache=cache, attention_mask=attention_mask, context_lens=context_lens, start=start
        )
        return residual + hidden_states


class GrootLMambaPreTrainedModel(MambaPreTrainedModel):
    config_class = GrootLMambaConfig
    config: GrootLMambaConfig
    _no_split_modules = ["GrootLMambaBlock", "GrootLMixer"]


class GrootLMambaModel(GrootLMambaPreTrainedModel, MambaModel):
    """``MambaModel`` built from :class:`GrootLMambaBlock` layers."""

    def __init__(self, config):
        GrootLMambaPreTrainedModel.__init__(self, config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([GrootLMambaBlock(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False
        self.norm_f = MambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self._register_load_state_dict_pre_hook(self.load_hook)
        self.post_init()

    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache=None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        attention_mask: Tensor | None = None,
        context_lens: Tensor | None = None,
        **kwargs,
    ) -> tuple | MambaOutput:
        """As ``MambaModel.forward``; ``context_lens`` (batch,) is each row's prompt length (default:
        none, the tree is the chain), ignored when ``cache`` already holds a state (decoding). Left
        padding in ``attention_mask`` is kept out of the tree."""
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache if not self.training else False)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        batch, length = inputs_embeds.shape[:2]
        start = None
        if continues_from_cache(cache):
            context_lens = None  # decoding: every new position is on the chain
            if attention_mask is not None:  # callers may pass the mask of the whole sequence so far
                attention_mask = attention_mask[:, -length:]
        else:
            if context_lens is not None:
                context_lens = check_context_lens(context_lens, batch, length, inputs_embeds.device)
            elif self.training and not torch.compiler.is_compiling() and self.config.grootl_config.active:
                # eager only: a traced graph drops warnings (and the config's parsing does not trace)
                warnings.warn(NO_PROMPT_WARNING, stacklevel=2)
            start = left_padding(attention_mask)

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        for block in self.layers:
            hidden_states = block(
                hidden_states, cache=cache, attention_mask=attention_mask, context_lens=context_lens, start=start
            )
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
        hidden_states = self.norm_f(hidden_states)
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)

        if not return_dict:
            return tuple(v for v in [hidden_states, cache, all_hidden_states] if v is not None)
        return MambaOutput(
            last_hidden_state=hidden_states, cache=cache if use_cache else None, hidden_states=all_hidden_states
        )


class GrootLMambaForCausalLM(GrootLMambaPreTrainedModel, MambaForCausalLM):
    """``MambaForCausalLM`` whose blocks merge the chain and tree scans (:class:`GrootLConfig`).

    ``forward`` takes ``context_lens`` (batch,): positions below it are the prompt. When absent it
    is the leading ``-100`` run of ``labels`` per row, else empty (no position sees a later one).
    ``generate`` passes the prompt's length: the prompt gets the tree, then tokens are decoded from
    one state (``use_cache=False`` re-runs the same prompt tree, so it gives the same tokens).
    A plain ``MambaConfig`` is accepted and converted (keeping its ``grootl`` entry, if any).
    """

    def __init__(self, config):
        if not isinstance(config, GrootLMambaConfig):
            config = GrootLMambaConfig.from_mamba(config)
        config.grootl = config.grootl_config.to_dict()  # validated, and never None in a saved config
        GrootLMambaPreTrainedModel.__init__(self, config)
        self.backbone = GrootLMambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def grootl(self) -> GrootLConfig:
        """The GrootL settings every mixer uses."""
        return self.config.grootl_config

    def set_grootl(self, grootl: GrootLConfig | dict) -> None:
        """Switch the GrootL settings of every mixer (and of the saved config) in place."""
        grootl = GrootLConfig.coerce(grootl)
        self.config.grootl = grootl.to_dict()
        for module in self.modules():
            if isinstance(module, GrootLMixer):
                module.grootl = grootl

    # >>> grootl package only: the portable copy of this file saves as stock transformers does
    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, plus the code that lets ``AutoModelForCausalLM.from_pretrained(
        dir, trust_remote_code=True)`` load the directory where grootl is not installed (:mod:`grootl.model.portable`)."""
        from grootl.model.portable import save_portable_code

        save_portable_code(self, save_directory, kwargs.get("is_main_process", True))
        return super().save_pretrained(save_directory, *args, **kwargs)
    # <<< grootl package only

    def generate(self, inputs: Tensor | None = None, *args, **kwargs):
        """``GenerationMixin.generate``, with ``context_lens`` defaulting to the prompt's length (its
        left padding, from ``attention_mask``, stays out of the tree)."""
        return super().generate(inputs, *args, **generation_prompt(inputs, kwargs))

    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache=None,
        labels: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        context_lens: Tensor | None = None,
        **kwargs,
    ) -> tuple | MambaCausalLMOutput:
        """As ``MambaForCausalLM.forward`` plus ``context_lens`` (see the class docstring; without it
        and without ``labels`` the prompt is empty)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if context_lens is None and labels is not None:
            context_lens = context_lens_from_labels(labels)
        outputs = self.backbone(
            input_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            use_cache=use_cache,
            attention_mask=attention_mask,
            context_lens=context_lens,
        )
        hidden_states = slice_logits_to_keep(outputs[0], logits_to_keep)
        logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype)).float()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        if not return_dict:
            output = (logits,) + tuple(outputs[1:])
            return ((loss,) + output) if loss is not None else output
        return MambaCausalLMOutput(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states)
