"""Sequence packing: several examples in one row of max_seq_length tokens.

Each packed row keeps the boundaries of its examples (`seq_lengths`) and gives
every example position ids that restart at 0; the model side turns these into
a block-diagonal causal mask, so packed examples never attend to each other and
the loss per token equals the unpacked loss. Torch-free (shared with Unsloth).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

from kubetune_trainer.data.formatting import TokenizedExample


class PackedExample(TypedDict):
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    seq_lengths: list[int]


@dataclass(frozen=True)
class PackingReport:
    examples: int
    packed_rows: int
    real_tokens: int
    padded_tokens_unpacked: int
    padded_tokens_packed: int

    @property
    def padding_saved(self) -> int:
        return self.padded_tokens_unpacked - self.padded_tokens_packed

    def summary(self) -> str:
        before = self.padded_tokens_unpacked
        saved_pct = 100.0 * self.padding_saved / before if before else 0.0
        return (
            f"packed {self.examples} examples into {self.packed_rows} rows; padding tokens "
            f"{self.padded_tokens_unpacked} -> {self.padded_tokens_packed} "
            f"({self.padding_saved} saved, {saved_pct:.1f}%)"
        )


def _padding(lengths: list[int], micro_batch_size: int) -> int:
    # Batches are padded to their longest row, as the collator does.
    total = 0
    for start in range(0, len(lengths), micro_batch_size):
        batch = lengths[start : start + micro_batch_size]
        total += max(batch) * len(batch) - sum(batch)
    return total


def pack_examples(
    examples: list[TokenizedExample], max_seq_length: int, *, micro_batch_size: int = 1
) -> tuple[list[PackedExample], PackingReport]:
    """Pack in order (next-fit): deterministic, so every rank and every restart packs alike."""
    packed: list[PackedExample] = []
    current: PackedExample | None = None
    for example in examples:
        length = len(example["input_ids"])
        if length > max_seq_length:
            raise ValueError(f"example of {length} tokens exceeds max_seq_length {max_seq_length}; truncate first")
        if current is None or len(current["input_ids"]) + length > max_seq_length:
            current = PackedExample(input_ids=[], labels=[], position_ids=[], seq_lengths=[])
            packed.append(current)
        current["input_ids"].extend(example["input_ids"])
        # The first label of each example would otherwise be predicted from the
        # previous example's last token across the boundary.
        current["labels"].extend([-100, *example["labels"][1:]])
        current["position_ids"].extend(range(length))
        current["seq_lengths"].append(length)
    report = PackingReport(
        examples=len(examples),
        packed_rows=len(packed),
        real_tokens=sum(len(e["input_ids"]) for e in examples),
        padded_tokens_unpacked=_padding([len(e["input_ids"]) for e in examples], micro_batch_size),
        padded_tokens_packed=_padding([len(p["input_ids"]) for p in packed], micro_batch_size),
    )
    return packed, report
