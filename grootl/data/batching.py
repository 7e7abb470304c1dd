"""Batches for supervised fine-tuning: seeded length-grouped order and dynamic right padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices

IGNORE_INDEX = -100


class EpochSampler(Sampler[int]):
    """A fresh order every epoch, a pure function of ``(seed, epoch)`` so a resumed run replays it:
    length-grouped (similar lengths share a batch, less padding) or plainly shuffled."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool = True):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.group_by_length:
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))
        return iter(torch.randperm(len(self.lengths), generator=generator).tolist())


@dataclass
class SFTCollator:
    """Right-pads rows (``input_ids``, ``context_len``) to the longest in the batch and builds
    ``labels`` (-100 on the prompt and the padding), ``attention_mask`` and ``context_lens``."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
            n, context = len(ids), row["context_len"]
            input_ids[i, :n] = ids
            labels[i, context:n] = ids[context:]
            attention_mask[i, :n] = 1
        context_lens = torch.tensor([row["context_len"] for row in rows], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "context_lens": context_lens}


def make_dataloader(
    rows, batch_size: int, pad_token_id: int, seed: int = 0, shuffle: bool = True, group_by_length: bool = True,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader over tokenised rows; with ``shuffle`` its sampler is an :class:`EpochSampler`."""
    sampler = EpochSampler(rows["length"], batch_size, seed, group_by_length) if shuffle else None
    return DataLoader(rows, batch_size=batch_size, sampler=sampler, collate_fn=SFTCollator(pad_token_id),
                      num_workers=num_workers)
