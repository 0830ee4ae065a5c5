"""Row formatting, truncation, held-out split, packing and file reading (shared with the Unsloth trainer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tiny_llama import task_rows, write_jsonl
from transformers import AutoTokenizer

from kubetune_trainer.common.config import ConfigError
from kubetune_trainer.data import (
    IGNORE_INDEX,
    DataError,
    FormatOptions,
    holdout_split,
    pack_examples,
    read_rows,
    tokenize_rows,
)

pytestmark = pytest.mark.training


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


def trained_text(tokenizer: Any, example: dict[str, list[int]]) -> str:
    return str(
        tokenizer.decode(
            [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE_INDEX]
        )
    )


def test_prompt_completion_trains_on_the_completion_only(tokenizer: Any) -> None:
    (example,), report = tokenize_rows(
        [{"prompt": "what is one plus two? ", "completion": "the answer is 3."}],
        tokenizer,
        FormatOptions(max_seq_length=64),
    )
    assert trained_text(tokenizer, example) == " the answer is 3.<|end|>"
    assert example["input_ids"][0] == tokenizer.bos_token_id and example["labels"][0] == IGNORE_INDEX
    assert report.shapes == {"prompt_completion": 1}


def test_messages_use_the_chat_template_and_train_on_assistant_turns(tokenizer: Any) -> None:
    row = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is two plus two?"},
            {"role": "assistant", "content": "the answer is 4."},
            {"role": "user", "content": "and one plus one?"},
            {"role": "assistant", "content": "the answer is 2."},
        ]
    }
    (example,), _ = tokenize_rows([row], tokenizer, FormatOptions(max_seq_length=128))
    full = tokenizer.decode(example["input_ids"])
    assert full == tokenizer.apply_chat_template(row["messages"], tokenize=False)
    assert trained_text(tokenizer, example) == "the answer is 4.<|end|>\nthe answer is 2.<|end|>\n"


def test_prompt_template_with_completion_column(tokenizer: Any) -> None:
    rows = [{"question": "what is two plus one?", "completion": "3"}]
    (example,), report = tokenize_rows(
        rows, tokenizer, FormatOptions(max_seq_length=64, prompt_template="Q: {question}\nA: ")
    )
    assert tokenizer.decode(example["input_ids"]) == "<s>Q: what is two plus one?\nA: 3<|end|>"
    # Byte-level BPE glues the prompt's trailing space to the first target token, which is trained.
    assert trained_text(tokenizer, example) == " 3<|end|>"
    assert report.shapes == {"prompt_template": 1}


def test_prompt_template_holding_the_target_trains_on_the_last_placeholder(tokenizer: Any) -> None:
    (example,), _ = tokenize_rows(
        task_rows(1, kind="columns"),
        tokenizer,
        FormatOptions(max_seq_length=64, prompt_template="Q: {question}\nA: {answer}"),
    )
    assert trained_text(tokenizer, example).startswith(" the answer is")


def test_prompt_template_errors_name_the_column_and_row(tokenizer: Any) -> None:
    with pytest.raises(DataError, match=r"row 1: dataset.prompt_template uses \{missing\}"):
        tokenize_rows([{"question": "q"}], tokenizer, FormatOptions(max_seq_length=64, prompt_template="{missing}"))
    with pytest.raises(DataError, match=r"no \{column\} placeholder"):
        FormatOptions(max_seq_length=64, prompt_template="no placeholders")
    with pytest.raises(DataError, match="not a valid template"):
        FormatOptions(max_seq_length=64, prompt_template="{unclosed")


def test_plain_text_trains_on_everything_and_unknown_rows_are_refused(tokenizer: Any) -> None:
    (example,), _ = tokenize_rows([{"text": "hello world"}], tokenizer, FormatOptions(max_seq_length=64))
    assert trained_text(tokenizer, example) == "hello world<|end|>"
    with pytest.raises(
        DataError, match=r"row 1: the row has none of the columns messages, prompt\+completion, or text"
    ):
        tokenize_rows([{"foo": "bar"}], tokenizer, FormatOptions(max_seq_length=64))


def test_unknown_row_hint_fits_the_backend(tokenizer: Any) -> None:
    unsloth = FormatOptions(max_seq_length=64, text_field="body", prompt_template_available=False)
    with pytest.raises(DataError, match=r"set dataset.text_field to the column that holds the text \(now 'body'\)"):
        tokenize_rows([{"question": "q"}], tokenizer, unsloth)
    with pytest.raises(DataError, match=r"set dataset\.prompt_template"):
        tokenize_rows([{"question": "q"}], tokenizer, FormatOptions(max_seq_length=64))
    assert issubclass(DataError, ConfigError)  # one-line termination reason, no traceback


CHAT = [{"role": "user", "content": "what is one plus one?"}, {"role": "assistant", "content": "the answer is 2."}]


def unsloth_options(*, apply_chat_template: bool) -> FormatOptions:
    """How the Unsloth trainer reads rows (kubetune_trainer.unsloth.dataset), text_field "body"."""
    return FormatOptions(
        max_seq_length=128,
        text_field="body",
        apply_chat_template=apply_chat_template,
        prompt_template_available=False,
        text_field_first=True,
    )


@pytest.mark.parametrize(
    "row,apply_chat_template,shape,trained",
    [
        # The column is there: it is what is trained on, whatever else the row holds.
        ({"body": "one two", "prompt": "what? ", "completion": "three"}, False, "text", "one two<|end|>"),
        ({"body": "one two", "prompt": "what? ", "completion": "three"}, True, "text", "one two<|end|>"),
        ({"body": "one two", "messages": CHAT}, False, "text", "one two<|end|>"),
        # ... unless apply_chat_template asks for the chat template and the row is a conversation.
        ({"body": "one two", "messages": CHAT}, True, "messages", "the answer is 2.<|end|>\n"),
        (
            {"body": "one two", "prompt": CHAT[:1], "completion": CHAT[1:]},
            True,
            "prompt_completion",
            "the answer is 2.<|end|>\n",
        ),
        # Without the column, the structured shapes apply.
        ({"prompt": "what? ", "completion": "three"}, False, "prompt_completion", " three<|end|>"),
        ({"messages": CHAT}, True, "messages", "the answer is 2.<|end|>\n"),
    ],
)
def test_unsloth_text_field_is_the_column_consumed(
    tokenizer: Any, row: dict[str, Any], apply_chat_template: bool, shape: str, trained: str
) -> None:
    (example,), report = tokenize_rows([row], tokenizer, unsloth_options(apply_chat_template=apply_chat_template))
    assert report.shapes == {shape: 1}
    assert trained_text(tokenizer, example) == trained


def test_automodel_rows_keep_the_structured_shapes_first(tokenizer: Any) -> None:
    """AutomodelJob has no text_field: a row with text and prompt/completion trains on the completion."""
    row = {"text": "one two", "prompt": "what? ", "completion": "three"}
    (example,), report = tokenize_rows([row], tokenizer, FormatOptions(max_seq_length=64))
    assert report.shapes == {"prompt_completion": 1}
    assert trained_text(tokenizer, example) == " three<|end|>"


def test_the_report_says_which_shape_each_file_used(tokenizer: Any, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"body": "one two", "prompt": "p ", "completion": "c"}] * 2)
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p ", "completion": "c"}, {"body": "three"}])
    _, report = tokenize_rows(read_rows(tmp_path), tokenizer, unsloth_options(apply_chat_template=False))
    assert report.file_shapes == {
        str(tmp_path / "a.jsonl"): {"text": 2},
        str(tmp_path / "b.jsonl"): {"prompt_completion": 1, "text": 1},
    }
    assert report.file_lines() == [
        f"{tmp_path / 'a.jsonl'}: text=2",
        f"{tmp_path / 'b.jsonl'}: prompt_completion=1, text=1",
    ]


def test_truncation_and_rows_left_without_targets(tokenizer: Any) -> None:
    long_prompt = "one two three four five six seven eight nine " * 4
    rows = [
        {"prompt": long_prompt, "completion": "the answer."},
        {"text": "one two three four five six seven eight nine zero"},
    ]
    examples, report = tokenize_rows(rows, tokenizer, FormatOptions(max_seq_length=8))
    assert all(len(e["input_ids"]) <= 8 for e in examples)
    assert report.truncated == 2 and report.dropped_no_target == 1 and report.examples == 1


def test_holdout_split_is_seeded_and_disjoint() -> None:
    items = list(range(100))
    train, val = holdout_split(items, seed=3)
    assert len(val) == 5 and sorted(train + val) == items
    assert holdout_split(items, seed=3) == (train, val)
    assert holdout_split(items, seed=4)[1] != val
    with pytest.raises(DataError, match="at least 2"):
        holdout_split([1], seed=0)


def test_packing_keeps_boundaries_and_reports_padding(tokenizer: Any) -> None:
    examples, _ = tokenize_rows(task_rows(10, seed=1), tokenizer, FormatOptions(max_seq_length=64))
    packed, report = pack_examples(examples, 64, micro_batch_size=2)
    assert sum(len(p["seq_lengths"]) for p in packed) == 10
    for row in packed:
        assert len(row["input_ids"]) <= 64
        starts = [sum(row["seq_lengths"][:i]) for i in range(len(row["seq_lengths"]))]
        assert all(row["position_ids"][s] == 0 and row["labels"][s] == IGNORE_INDEX for s in starts)
    assert report.real_tokens == sum(len(e["input_ids"]) for e in examples)
    assert report.packed_rows < 10 and "padding tokens" in report.summary()


def test_read_rows_from_directory_in_sorted_order_and_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "b.jsonl", [{"text": "second"}])
    pq.write_table(pa.Table.from_pylist([{"text": "third"}]), tmp_path / "c.parquet")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "first"}])
    (tmp_path / "notes.txt").write_text("ignored")
    assert [r.data["text"] for r in read_rows(tmp_path)] == ["first", "second", "third"]
    bad = tmp_path / "bad" / "x.jsonl"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"text": "ok"}) + "\n{broken\n")
    with pytest.raises(DataError, match=r"x.jsonl line 2: not valid JSON"):
        read_rows(bad.parent)
    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path / "missing")
