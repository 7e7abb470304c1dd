"""Merging a PEFT (LoRA) adapter into its model so the result is a plain model any tool can load."""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel


def untie_output_embeddings(model: PreTrainedModel) -> None:
    """Give the output layer its own copy of a tied embedding matrix (and say so in the config), so
    merging a LoRA on the input embeddings changes the inputs only, as in training, not the outputs too."""
    output = model.get_output_embeddings()
    if output is not None and output.weight is model.get_input_embeddings().weight:
        output.weight = torch.nn.Parameter(output.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def merge_adapter(model: PeftModel) -> PreTrainedModel:
    """``model.merge_and_unload()`` that unties tied output embeddings first: plain PEFT merges a LoRA on
    ``embeddings`` into the matrix the output layer shares, which silently changes every logit. Returns the
    merged base model (GrootL or stock), to ``save_pretrained`` as usual. Without a LoRA on the input embeddings
    the ties stay as they are."""
    if not isinstance(model, PeftModel):
        raise ValueError(f"merge_adapter needs a peft.PeftModel (a model with a LoRA adapter); got {type(model).__name__}")
    base = model.get_base_model()
    if isinstance(base.get_input_embeddings(), BaseTunerLayer):  # else nothing to untie: the flag stays as it is
        untie_output_embeddings(base)  # (in transformers it also unties other shared blocks, e.g. Zamba's)
    return model.merge_and_unload()
