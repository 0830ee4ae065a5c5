"""Context parallel, the parts below the training loop (the 2-process parity runs are in
test_distributed.py; on CPU they use the all-gather attention, as ring attention runs only
on CUDA's SDPA kernels: its parity run is `cp_gpu_check.py`, for 2 GPUs).

Here: admission and the trainer agree on every layout; the attention function the trainer
switches models to equals transformers' SDPA and builds no mask where a CP shard's
positions jump; and labels shifted before sharding give the whole row's loss over
head/tail shards.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from automodel_helpers import admitted_and_runs

pytestmark = pytest.mark.training


def test_admission_and_trainer_agree_on_context_parallel_layouts() -> None:
    """Every small layout x packing x training type: the API admits it exactly when the trainer's
    own check (on GPUs) accepts it, so no context-parallel job is refused only in its pods."""
    from kubetune_trainer.automodel.settings import ParallelSettings

    checked = refused = 0
    layouts = itertools.product((1, 2), (1, 2, 4), (1, 2), (1, 2), (1, 2, 4), (False, True), ("sft", "distillation"))
    for nodes, gpus, tp, pp, cp, packing, training_type in layouts:
        if (nodes * gpus) % (tp * pp * cp):
            continue  # refused by gpus-divisible-by-model-parallel, which has nothing to do with CP
        dp = nodes * gpus // (tp * pp * cp)
        training: dict[str, Any] = {"training_type": training_type}
        if training_type == "distillation":
            training["teacher_model"] = "teacher"
        raw = {
            "model": "base",
            "dataset": {"training": "train"},
            "training": training,
            "parallelism": {
                "num_nodes": nodes,
                "num_gpus_per_node": gpus,
                "tensor_parallel_size": tp,
                "pipeline_parallel_size": pp,
                "context_parallel_size": cp,
            },
            "batch": {"global_batch_size": 2 * dp, "micro_batch_size": 2, "sequence_packing": packing},
        }
        admitted, runs = admitted_and_runs(
            raw, ParallelSettings(nodes, gpus, tp, pp, cp, None), sequence_packing=packing, training_type=training_type
        )
        assert admitted == runs, (raw, admitted, runs)
        checked += 1
        refused += not admitted
    assert checked > 100 and refused > 40, (checked, refused)


def _gqa_llama(tmp_path: Path) -> Any:
    from tiny_llama import build_tiny_llama
    from transformers import AutoModelForCausalLM

    path = build_tiny_llama(tmp_path / "gqa", num_heads=4, num_kv_heads=2)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa").eval()


def test_causal_sdpa_equals_transformers_sdpa(tmp_path: Path) -> None:
    """Grouped-query heads repeated, scale and layout right: the same logits as transformers' SDPA."""
    from kubetune_trainer.automodel.context_parallel import use_causal_sdpa

    model = _gqa_llama(tmp_path)
    ids = torch.randint(5, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(24).expand(2, 24)
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        use_causal_sdpa(model)
        assert model.config._attn_implementation == "kubetune_cp_sdpa"
        got = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_causal_sdpa_attends_across_a_cp_shards_position_jump(tmp_path: Path) -> None:
    """A CP rank holds chunks r and 2cp-1-r, so its position ids jump (here 0-3, then 12-15).
    Ring attention needs one causal attention over all of them: the last token must see the
    first. transformers' own SDPA takes the jump for two packed samples and masks them apart,
    which is why the trainer switches the model's attention."""
    from kubetune_trainer.automodel.context_parallel import use_causal_sdpa

    model = _gqa_llama(tmp_path)
    ids = torch.randint(5, 200, (1, 8), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, 0] = (int(ids[0, 0]) + 1) % 200 + 5
    positions = torch.tensor([[0, 1, 2, 3, 12, 13, 14, 15]])

    def last_logits(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=batch, position_ids=positions, use_cache=False).logits[0, -1]

    packed_view = (last_logits(ids) - last_logits(changed)).abs().max()
    use_causal_sdpa(model)
    causal_view = (last_logits(ids) - last_logits(changed)).abs().max()
    assert causal_view > 1e-4, "the last token does not see the first under kubetune_cp_sdpa"
    assert packed_view < 1e-6, "transformers' SDPA no longer splits at a position jump: revisit use_causal_sdpa"


def test_sliding_window_models_are_refused(tmp_path: Path) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    from kubetune_trainer.automodel.context_parallel import use_causal_sdpa
    from kubetune_trainer.common.termination import TrainerError

    config = MistralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=8,
    )
    with pytest.raises(TrainerError, match="sliding-window attention"):
        use_causal_sdpa(MistralForCausalLM(config))


@pytest.mark.parametrize("length", [16, 13])
def test_shifted_labels_on_head_tail_shards_sum_to_the_rows_loss(length: int) -> None:
    """Pad to 2 x cp, shift, then split as torch's head/tail load balancer does (rank r: chunks r
    and 2cp-1-r): the ranks' summed losses are the unsharded row's loss."""
    from kubetune_trainer.automodel.context_parallel import head_tail_positions, pad_rows_to_multiple, shift_labels
    from kubetune_trainer.automodel.losses import cross_entropy_sum
    from kubetune_trainer.data import IGNORE_INDEX

    cp, vocab = 2, 11
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(0, vocab, (2, length), generator=generator)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX  # a prompt
    positions = torch.arange(length).expand(2, length)
    logits = torch.randn(2, length, vocab, generator=generator)
    whole = cross_entropy_sum(logits, labels)
    padded_ids, padded_labels, padded_positions = pad_rows_to_multiple(ids, labels, positions, 2 * cp, pad_id=0)
    assert padded_ids.shape[1] % (2 * cp) == 0
    assert padded_positions[0, -1] == padded_ids.shape[1] - 1
    # Logits at padded positions: anything, their targets are ignored.
    padded_logits = torch.cat([logits, torch.randn(2, padded_ids.shape[1] - length, vocab)], dim=1)
    targets = shift_labels(padded_labels)
    places = [head_tail_positions(padded_ids.shape[1], cp, rank) for rank in range(cp)]
    chunk = padded_ids.shape[1] // 4
    assert places[0] == [*range(0, chunk), *range(3 * chunk, 4 * chunk)]  # torch's layout for cp 2
    assert sorted(p for rank in places for p in rank) == list(range(padded_ids.shape[1]))
    total = torch.zeros(())
    for keep in places:
        total += cross_entropy_sum(padded_logits[:, keep], targets[:, keep], labels_shifted=True)
    torch.testing.assert_close(total, whole)
