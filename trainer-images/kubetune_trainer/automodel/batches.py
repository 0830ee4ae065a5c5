"""Datasets to micro batches: the deterministic order that makes resume and data parallel exact.

Step s of epoch e takes the global batch `order(e)[s*G:(s+1)*G]` (G = global
batch size in rows; a packed row counts as one). Data-parallel rank r takes
the r-th contiguous slice of it, split into micro batches. The order depends
only on (seed, epoch), so a restarted pod continues at the same data
position from the step number alone. An incomplete last global batch is
dropped (every rank must run the same number of steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kubetune_trainer.data.formatting import IGNORE_INDEX


def epoch_order(num_items: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return [int(i) for i in torch.randperm(num_items, generator=generator)]


def global_batch_indices(num_items: int, seed: int, epoch: int, step_in_epoch: int, global_batch: int) -> list[int]:
    order = epoch_order(num_items, seed, epoch)
    return order[step_in_epoch * global_batch : (step_in_epoch + 1) * global_batch]


def rank_micro_batches(indices: Sequence[int], dp_size: int, dp_rank: int, micro_batch: int) -> list[list[int]]:
    per_rank = len(indices) // dp_size
    mine = list(indices[dp_rank * per_rank : (dp_rank + 1) * per_rank])
    return [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    real_tokens: int

    def to(self, device: torch.device) -> Batch:
        return Batch(
            input_ids=self.input_ids.to(device),
            labels=self.labels.to(device),
            position_ids=self.position_ids.to(device),
            real_tokens=self.real_tokens,
        )

    @property
    def target_tokens(self) -> int:
        """Tokens that carry a loss after the next-token shift."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def collate(items: Sequence[dict[str, Any]], pad_id: int, pad_to: int | None = None) -> Batch:
    """Right-pad to the longest row (or `pad_to`).

    No attention mask is passed to the model: with right padding a causal row
    never attends to its padding, and leaving the mask out lets transformers
    build the block-diagonal mask from position ids that restart per packed
    sample. Padding continues its row's positions, so an unpacked batch has
    plain ascending positions and keeps SDPA's fast is_causal path.
    """
    length = max(len(item["input_ids"]) for item in items)
    if pad_to is not None:
        length = max(length, pad_to)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(items), length), dtype=torch.long)
    real = 0
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        real += n
        input_ids[row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(item["labels"], dtype=torch.long)
        if "position_ids" in item:
            position_ids[row, :n] = torch.tensor(item["position_ids"], dtype=torch.long)
            last = int(item["position_ids"][-1]) if n else -1
        else:
            position_ids[row, :n] = torch.arange(n)
            last = n - 1
        position_ids[row, n:] = torch.arange(last + 1, last + 1 + length - n)
    return Batch(input_ids=input_ids, labels=labels, position_ids=position_ids, real_tokens=real)
