"""Give a GrootL model each row's prompt inside TRL's ``SFTTrainer`` and transformers' ``Trainer``.

Those trainers call the model without the prompt length: TRL's loss head runs the backbone without
``labels``, and ``Trainer`` drops ``labels`` before the forward when it smooths them. Without a prompt
length a GrootL model reads an empty prompt (causal, but the tree is the chain). :func:`give_prompts`
makes every batch carry ``context_lens``, the leading ``-100`` run of each row's labels: the prompt
that TRL's ``completion_only_loss`` (or any SFT labelling) leaves out of the loss.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from grootl.model.modeling import context_lens_from_labels


class PromptLengthCollator:
    """Wraps a data collator: each batch also gets ``context_lens`` (batch,), the length of each row's
    leading run of ``-100`` labels, unless the batch has it already. Batches that put several examples
    in one row (``position_ids`` restarting inside a row: TRL's packing or ``padding_free``) are refused:
    GrootL's tree covers one prompt per row."""

    def __init__(self, collator: Callable[[list], dict[str, Any]]):
        self.collator = collator
        self._warned = False

    def __call__(self, examples: list) -> dict[str, Any]:
        batch = self.collator(examples)
        if _packs_several_examples(batch):
            raise ValueError(
                "GrootL needs one example per row, but this batch packs several (position_ids restart inside a "
                "row): set packing=False and padding_free=False"
            )
        if batch.get("context_lens") is None:
            labels = batch.get("labels")
            if labels is None:
                raise ValueError("GrootL needs labels (-100 on the prompt) to find each row's prompt; this batch has none")
            batch["context_lens"] = context_lens_from_labels(torch.as_tensor(labels))
            if not self._warned and not bool(batch["context_lens"].any()):
                self._warned = True
                warnings.warn(
                    "GrootL: no row of this batch has a prompt (no leading -100 labels), so the tree is the chain; "
                    "with TRL use prompt/completion data and completion_only_loss=True",
                    stacklevel=2,
                )
        return batch


def _packs_several_examples(batch: dict[str, Any]) -> bool:
    """Whether ``position_ids`` restart at a real token inside a row (right padding, zeros where
    ``attention_mask`` is 0, is not a restart)."""
    position_ids = batch.get("position_ids")
    if position_ids is None:
        return False
    restarts = torch.as_tensor(position_ids)[:, 1:] == 0
    mask = batch.get("attention_mask")
    if mask is not None:
        restarts &= torch.as_tensor(mask)[:, 1:] != 0
    return bool(restarts.any())


def give_prompts(trainer):
    """Make a ``transformers.Trainer`` or TRL ``SFTTrainer`` (built, not yet trained) pass each row's
    prompt length to a GrootL model: wraps ``trainer.data_collator`` in :class:`PromptLengthCollator`.
    Raises ValueError for TRL packing or ``padding_free`` (several examples per row). Returns the trainer."""
    args = trainer.args
    for flag in ("packing", "padding_free"):
        if getattr(args, flag, False):
            raise ValueError(
                f"GrootL needs one example per row (its tree covers each row's prompt): set {flag}=False in the "
                "trainer's config"
            )
    if not isinstance(trainer.data_collator, PromptLengthCollator):
        trainer.data_collator = PromptLengthCollator(trainer.data_collator)
    return trainer
