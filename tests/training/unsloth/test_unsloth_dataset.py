"""The Unsloth trainer's dataset loader: dataset.text_field is the column consumed (the seed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_llama import write_jsonl
from transformers import AutoTokenizer

from kubetune_trainer.data import IGNORE_INDEX
from kubetune_trainer.unsloth.dataset import load_tokenized_dataset

pytestmark = pytest.mark.training

CHAT = [{"role": "user", "content": "what is one plus one?"}, {"role": "assistant", "content": "the answer is 2."}]


@pytest.mark.parametrize("apply_chat_template", [False, True])
def test_rows_with_the_text_field_train_on_it_and_each_file_reports_its_shape(
    tiny_llama_dir: Path, tmp_path: Path, apply_chat_template: bool
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    data = tmp_path / "data"
    write_jsonl(data / "a.jsonl", [{"body": "one two three", "prompt": "what? ", "completion": "four"}])
    write_jsonl(data / "b.jsonl", [{"prompt": "what? ", "completion": "four"}])
    write_jsonl(data / "c.jsonl", [{"body": "five six", "messages": CHAT}])
    dataset, report = load_tokenized_dataset(
        data, tokenizer=tokenizer, text_field="body", apply_chat_template=apply_chat_template, max_seq_length=64
    )
    # The chat template applies to a row with the column only when apply_chat_template says so.
    c_shape = "messages" if apply_chat_template else "text"
    assert report.file_shapes == {
        str(data / "a.jsonl"): {"text": 1},
        str(data / "b.jsonl"): {"prompt_completion": 1},
        str(data / "c.jsonl"): {c_shape: 1},
    }

    def trained(index: int) -> str:
        row = dataset[index]
        ids = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
        return str(tokenizer.decode(ids))

    assert trained(0) == "one two three<|end|>"  # all of the body, not the completion
    assert trained(1) == " four<|end|>"
    assert trained(2) == ("the answer is 2.<|end|>\n" if apply_chat_template else "five six<|end|>")
