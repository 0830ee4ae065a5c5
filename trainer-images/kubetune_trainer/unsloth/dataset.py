"""Rows of a fileset -> a tokenized `datasets.Dataset` ({input_ids, labels}) for trl.

The row shapes and loss masking are the shared ones (kubetune_trainer.data:
messages via the chat template when dataset.apply_chat_template, prompt +
completion, or dataset.text_field), so an UnslothJob and an AutomodelJob train
on the same tokens from the same files. trl takes a dataset that already has
`input_ids` and `labels` as it is: it truncates, packs (on GPU) and pads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune_trainer.data import FormatOptions, read_rows, tokenize_rows


def load_tokenized_dataset(
    path: str | Path, *, tokenizer: Any, text_field: str, apply_chat_template: bool, max_seq_length: int
) -> tuple[Any, str]:
    """The fileset at `path` as a datasets.Dataset and the formatting summary line."""
    from datasets import Dataset

    options = FormatOptions(
        max_seq_length=max_seq_length,
        text_field=text_field,
        apply_chat_template=apply_chat_template,
        prompt_template_available=False,
    )
    examples, report = tokenize_rows(read_rows(path), tokenizer, options)
    return Dataset.from_list([dict(e) for e in examples]), report.summary()
