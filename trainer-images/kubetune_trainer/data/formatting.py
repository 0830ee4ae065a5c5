"""Turning dataset rows into token ids and labels (-100 where no loss is taken).

Row shapes, first match wins (AutomodelJob):

1. `dataset.prompt_template` is set: the template is rendered over the row's
   columns (syntax below) into the prompt. The target (trained on) is the
   row's `completion` column, else its `output` column, when the template
   does not use that column itself. Otherwise the template holds the target
   too: the prompt is everything before the template's LAST placeholder and
   the target is that placeholder and the literal text after it.
2. `messages`: a list of `{role, content}`, rendered with the tokenizer's chat
   template; only the assistant turns (content and the template's end-of-turn
   text) are trained on.
3. `prompt` + `completion`: strings are concatenated as-is (no separator is
   added), lists of messages are rendered with the chat template; only the
   completion is trained on.
4. `text`: plain text, every token trained on.

UnslothJob (`text_field_first`): the seed calls `dataset.text_field` the column
the trainer consumes, so a row that has it is plain text (shape 4), unless
`dataset.apply_chat_template` asks for the chat template and the row has
`messages` (shape 2) or `prompt` + `completion` as lists of messages (shape 3).
A row without the column falls back to shapes 2 and 3 as above.

Prompt template syntax (Python `str.format`): `{column}` inserts the row's
value of `column`; `{column[key]}` / `{column.attr}` index into a nested value;
format specs work (`{score:.2f}`); `{{` and `}}` are literal braces. Example:
`"### Question:\\n{question}\\n### Answer:\\n"` over rows {question, completion}
trains on the completion; `"### Question:\\n{question}\\n### Answer:\\n{answer}"`
over rows {question, answer} trains on the answer. A template with one
placeholder and no completion/output column (`"{text}"`) trains on all of it. A
column named in the template but missing from a row is an error naming both.

Plain text and prompt/completion strings get the tokenizer's BOS (via its
special-token handling) and an EOS at the end, so the model learns to stop.
Sequences longer than max_seq_length are truncated from the right; a row that
has no trained token left after truncation is dropped and counted.

This module imports no torch: the Unsloth trainer shares it.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from kubetune_trainer.data.files import DataError, Row

IGNORE_INDEX = -100


class TokenizedExample(TypedDict):
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class FormatOptions:
    """How rows become examples. Automodel: prompt_template from the spec; Unsloth:
    text_field/apply_chat_template from its dataset block."""

    max_seq_length: int
    prompt_template: str | None = None
    text_field: str = "text"
    apply_chat_template: bool = True
    add_eos: bool = True
    prompt_template_available: bool = True  # False for UnslothJob, whose schema has no prompt_template
    # True for UnslothJob: a row's text_field column is what it trains on (see the module docstring).
    text_field_first: bool = False

    def __post_init__(self) -> None:
        if self.max_seq_length < 2:
            raise DataError(f"max_seq_length must be at least 2, got {self.max_seq_length}")
        if self.prompt_template is not None:
            template_fields(self.prompt_template)


@dataclass
class FormatReport:
    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    shapes: dict[str, int] = field(default_factory=dict)
    # Row shapes per data file, in reading order: a fileset mixing shapes shows which file is which.
    file_shapes: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, source: str, shape: str) -> None:
        self.shapes[shape] = self.shapes.get(shape, 0) + 1
        in_file = self.file_shapes.setdefault(source, {})
        in_file[shape] = in_file.get(shape, 0) + 1

    def summary(self) -> str:
        shapes = ", ".join(f"{k}={v}" for k, v in sorted(self.shapes.items()))
        return (
            f"{self.rows} rows -> {self.examples} examples ({shapes}); "
            f"{self.truncated} truncated to max_seq_length, "
            f"{self.dropped_no_target} dropped (no trained token left after truncation)"
        )

    def file_lines(self) -> list[str]:
        """One line per data file: the row shapes it was read as."""
        return [
            f"{source}: {', '.join(f'{k}={v}' for k, v in sorted(shapes.items()))}"
            for source, shapes in self.file_shapes.items()
        ]


def template_fields(template: str) -> list[str]:
    """The placeholder names of a prompt template, in order; raises DataError when it has none or is malformed."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise DataError(
            f"dataset.prompt_template is not a valid template ({exc}); write literal braces as {{{{ }}}}"
        ) from None
    names = [name for _, name, _, _ in parsed if name is not None]
    if not names:
        raise DataError("dataset.prompt_template has no {column} placeholder; name at least one row column")
    if any(name == "" or name.isdigit() for name in names):
        raise DataError(
            "dataset.prompt_template placeholders must name row columns, e.g. {question}; {} and {0} are not allowed"
        )
    return names


TARGET_COLUMNS = ("completion", "output")


def _render_template(template: str, row: Row) -> tuple[str, str]:
    """(prompt, target) from the template and the row (see the module docstring)."""
    formatter = string.Formatter()
    parts: list[str] = []
    split_at = 0
    used: set[str] = set()
    for literal, name, spec, conversion in formatter.parse(template):
        parts.append(literal)
        if name is None:
            continue
        split_at = sum(len(p) for p in parts)
        try:
            value, first = formatter.get_field(name, (), row.data)
        except (KeyError, IndexError, AttributeError):
            raise DataError(
                f"{row.where}: dataset.prompt_template uses {{{name}}} but the row has no such column "
                f"(columns: {', '.join(sorted(row.data))})"
            ) from None
        used.add(str(first))
        value = formatter.convert_field(value, conversion)
        parts.append(formatter.format_field(value, spec or ""))
    text = "".join(parts)
    for column in TARGET_COLUMNS:
        if column in row.data and column not in used:
            target = row.data[column]
            if not isinstance(target, str):
                raise DataError(f"{row.where}: {column} must be a string")
            return text, target
    return text[:split_at], text[split_at:]


def _check_messages(messages: Any, row: Row, column: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{row.where}: {column} must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{row.where}: {column}[{i}] must be an object with role and content")
    return messages


def _chat(tokenizer: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return str(text)


def _chat_segments(tokenizer: Any, messages: list[dict[str, Any]], row: Row) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"{row.where}: the row has messages but the model's tokenizer has no chat_template; "
            "use prompt/completion rows or dataset.prompt_template"
        )
    full = _chat(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    search_from = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if i and full.startswith(upto) and upto.startswith(before):
            spans.append((len(before), len(upto)))
            search_from = len(upto)
            continue
        # Templates that rewrite earlier turns (e.g. strip reasoning) break the
        # prefix property; fall back to the assistant content itself.
        content = str(message["content"])
        start = full.find(content, search_from)
        if start < 0:
            raise DataError(f"{row.where}: cannot locate assistant turn {i} in the chat-template output")
        spans.append((start, start + len(content)))
        search_from = start + len(content)
    if not spans:
        raise DataError(f"{row.where}: messages has no assistant turn to train on")
    return full, spans


def _label(
    tokenizer: Any, text: str, spans: Sequence[tuple[int, int]], *, add_special_tokens: bool
) -> TokenizedExample:
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    for index, (start, end) in enumerate(encoding["offset_mapping"]):
        if end <= start:
            continue  # special tokens the tokenizer inserted (BOS) have empty offsets
        # Overlap, not containment: byte-level BPE glues the space before a
        # completion's first word to that word's token, which must be trained.
        if any(start < s_end and end > s_start for s_start, s_end in spans):
            labels[index] = input_ids[index]
    return TokenizedExample(input_ids=input_ids, labels=labels)


def _append_eos(example: TokenizedExample, tokenizer: Any, *, trained: bool) -> None:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None or (example["input_ids"] and example["input_ids"][-1] == eos):
        return
    example["input_ids"].append(int(eos))
    example["labels"].append(int(eos) if trained else IGNORE_INDEX)


def row_shape(data: dict[str, Any], options: FormatOptions) -> str | None:
    """The shape a row is read as (the module docstring's order), or None when it has none."""
    if options.prompt_template is not None:
        return "prompt_template"
    if "messages" in data and options.apply_chat_template:
        return "messages"
    has_prompt_completion = "prompt" in data and "completion" in data
    if options.text_field_first and options.text_field in data:
        conversational = isinstance(data.get("prompt"), list) and isinstance(data.get("completion"), list)
        if has_prompt_completion and conversational and options.apply_chat_template:
            return "prompt_completion"
        return "text"
    if has_prompt_completion:
        return "prompt_completion"
    if options.text_field in data:
        return "text"
    return None


def format_row(row: Row | dict[str, Any], tokenizer: Any, options: FormatOptions) -> tuple[TokenizedExample, str]:
    """Tokenize one row (untruncated); returns the example and the row shape used.

    The tokenizer must be a fast tokenizer (offset mappings).
    """
    if not isinstance(row, Row):
        row = Row(data=row, source="<rows>", index=0)
    data = row.data
    shape = row_shape(data, options)
    if shape == "prompt_template":
        assert options.prompt_template is not None
        prompt, completion = _render_template(options.prompt_template, row)
        example = _label(
            tokenizer, prompt + completion, [(len(prompt), len(prompt) + len(completion))], add_special_tokens=True
        )
        if options.add_eos:
            _append_eos(example, tokenizer, trained=True)
        return example, "prompt_template"
    if shape == "messages":
        messages = _check_messages(data["messages"], row, "messages")
        text, spans = _chat_segments(tokenizer, messages, row)
        return _label(tokenizer, text, spans, add_special_tokens=False), "messages"
    if shape == "prompt_completion":
        prompt, completion = data["prompt"], data["completion"]
        if isinstance(prompt, list) and isinstance(completion, list) and options.apply_chat_template:
            messages = _check_messages(prompt, row, "prompt") + _check_messages(completion, row, "completion")
            text, spans = _chat_segments(tokenizer, messages, row)
            first_completion = len(prompt)
            # Only the completion's assistant turns are trained on.
            assistant_indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            spans = [span for span, i in zip(spans, assistant_indices, strict=True) if i >= first_completion]
            if not spans:
                raise DataError(f"{row.where}: completion has no assistant turn to train on")
            return _label(tokenizer, text, spans, add_special_tokens=False), "prompt_completion"
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{row.where}: prompt and completion must both be strings (or both lists of messages)")
        example = _label(
            tokenizer, prompt + completion, [(len(prompt), len(prompt) + len(completion))], add_special_tokens=True
        )
        if options.add_eos:
            _append_eos(example, tokenizer, trained=True)
        return example, "prompt_completion"
    if shape == "text":
        text = data[options.text_field]
        if not isinstance(text, str):
            raise DataError(f"{row.where}: {options.text_field} must be a string")
        example = _label(tokenizer, text, [(0, len(text))], add_special_tokens=True)
        if options.add_eos:
            _append_eos(example, tokenizer, trained=True)
        return example, "text"
    hint = "messages, prompt+completion, or " + options.text_field
    if "messages" in data:
        hint += " (messages rows need apply_chat_template)"
    # Only the Automodel backend has dataset.prompt_template; UnslothJob maps one column by text_field.
    fix = (
        "set dataset.prompt_template to map your columns"
        if options.prompt_template_available
        else f"set dataset.text_field to the column that holds the text (now {options.text_field!r})"
    )
    raise DataError(f"{row.where}: the row has none of the columns {hint} (columns: {', '.join(sorted(data))}); {fix}")


def tokenize_rows(
    rows: Iterable[Row | dict[str, Any]], tokenizer: Any, options: FormatOptions
) -> tuple[list[TokenizedExample], FormatReport]:
    """Format, tokenize and truncate every row; rows left without a trained token are dropped."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            "the model's tokenizer is not a fast tokenizer (tokenizer.json); offsets are needed to mask prompts"
        )
    report = FormatReport()
    examples: list[TokenizedExample] = []
    for row in rows:
        report.rows += 1
        example, shape = format_row(row, tokenizer, options)
        report.count(row.source if isinstance(row, Row) else "<rows>", shape)
        if len(example["input_ids"]) > options.max_seq_length:
            report.truncated += 1
            example = TokenizedExample(
                input_ids=example["input_ids"][: options.max_seq_length],
                labels=example["labels"][: options.max_seq_length],
            )
        if all(label == IGNORE_INDEX for label in example["labels"][1:]):
            # Labels are shifted by one for next-token prediction: a trained
            # token at position 0 contributes no loss.
            report.dropped_no_target += 1
            continue
        examples.append(example)
    report.examples = len(examples)
    if not examples:
        raise DataError(f"no usable training example: {report.summary()}")
    return examples, report
