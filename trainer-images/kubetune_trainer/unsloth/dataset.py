"""Rows of a fileset -> a tokenized `datasets.Dataset` ({input_ids, labels}) for trl.

The row shapes and loss masking are the shared ones (kubetune_trainer.data), read
the UnslothJob way: `dataset.text_field` is the column consumed, so a row that has
it trains on it; the messages and prompt/completion shapes apply to rows without
it, or when `dataset.apply_chat_template` asks for the chat template. An UnslothJob
and an AutomodelJob thus train on the same tokens from the same structured rows.
trl takes a dataset that already has `input_ids` and `labels` as it is: it
truncates, packs (on GPU) and pads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune_trainer.data import FormatOptions, FormatReport, read_rows, tokenize_rows


def load_tokenized_dataset(
    path: str | Path, *, tokenizer: Any, text_field: str, apply_chat_template: bool, max_seq_length: int
) -> tuple[Any, FormatReport]:
    """The fileset at `path` as a datasets.Dataset, and how its rows were read (per file too)."""
    from datasets import Dataset

    options = FormatOptions(
        max_seq_length=max_seq_length,
        text_field=text_field,
        apply_chat_template=apply_chat_template,
        prompt_template_available=False,
        text_field_first=True,
    )
    examples, report = tokenize_rows(read_rows(path), tokenizer, options)
    return Dataset.from_list([dict(e) for e in examples]), report
