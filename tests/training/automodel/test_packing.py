"""Sequence packing: packed samples do not attend to each other; the loss per token is unchanged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from automodel_helpers import Job, run_in_process, tiny_spec
from tiny_llama import task_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubetune_trainer.automodel.batches import collate
from kubetune_trainer.automodel.losses import cross_entropy_sum
from kubetune_trainer.data import FormatOptions, pack_examples, tokenize_rows

pytestmark = pytest.mark.training

# Packed and unpacked runs do the same maths on differently shaped tensors,
# so sums are reordered: float32 round-off only.
PACKING_TOLERANCE = 1e-5


def test_packed_row_logits_equal_unpacked(tiny_llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), attn_implementation="sdpa").eval()
    examples, _ = tokenize_rows(task_rows(3, seed=5), tokenizer, FormatOptions(max_seq_length=64))
    packed, report = pack_examples(examples, 64)
    assert report.packed_rows == 1 and packed[0]["seq_lengths"] == [len(e["input_ids"]) for e in examples]
    with torch.no_grad():
        batch = collate([packed[0]], tokenizer.pad_token_id)
        packed_logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
        offset = 0
        for example in examples:
            alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
            n = len(example["input_ids"])
            torch.testing.assert_close(packed_logits[offset : offset + n], alone, rtol=1e-4, atol=1e-5)
            offset += n
        # Without per-sample position ids the second sample would see the first: the check can fail.
        leaky = model(input_ids=batch.input_ids, use_cache=False).logits[0]
        n0 = len(examples[0]["input_ids"])
        assert not torch.allclose(leaky[n0 : n0 + 5], packed_logits[n0 : n0 + 5], atol=1e-3)
        unpacked = collate([dict(e) for e in examples], tokenizer.pad_token_id)
        ce_unpacked = cross_entropy_sum(
            model(input_ids=unpacked.input_ids, position_ids=unpacked.position_ids, use_cache=False).logits,
            unpacked.labels,
        )
        ce_packed = cross_entropy_sum(packed_logits[None], batch.labels)
        assert unpacked.target_tokens == batch.target_tokens
        torch.testing.assert_close(ce_packed, ce_unpacked, rtol=PACKING_TOLERANCE, atol=0.0)


def test_packed_and_unpacked_training_give_the_same_loss_per_token(
    make_job: Callable[..., Job], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    rows = task_rows(12, seed=11)
    data = write_jsonl(tmp_path / "train" / "train.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    examples, _ = tokenize_rows(rows, tokenizer, FormatOptions(max_seq_length=64))
    packed, report = pack_examples(examples, 64)
    assert report.padding_saved > 0 or report.packed_rows < len(examples)
    # One global batch = the whole data set in both runs, so every step sees the same tokens.
    common = {"schedule": {"max_steps": 3, "epochs": 3}}
    unpacked_job = make_job(
        tiny_spec(**common, batch={"global_batch_size": 12, "micro_batch_size": 4}), name="unpacked", training_data=data
    )
    packed_job = make_job(
        tiny_spec(**common, batch={"global_batch_size": len(packed), "micro_batch_size": 1, "sequence_packing": True}),
        name="packed",
        training_data=data,
    )
    assert run_in_process(unpacked_job) == 0
    assert run_in_process(packed_job) == 0
    torch.testing.assert_close(
        torch.tensor(packed_job.train_losses()),
        torch.tensor(unpacked_job.train_losses()),
        rtol=PACKING_TOLERANCE,
        atol=0.0,
    )
    assert len(packed_job.train_losses()) == 3
