"""Sharded loading (issue 15 item 1): the model is built on the meta device, sharded, and each
rank reads only its shard from the safetensors files; training must be unchanged.

The 2-process FSDP2 run here uses a model with tied embeddings (the checkpoint has no
lm_head.weight; the head must stay the input embedding after sharding). test_distributed.py's
parity tests (FSDP2 LoRA and full weights, TP 2, PP 2) go through sharded loading too and
check that they did.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from automodel_helpers import Job, run_entrypoint, run_in_process, tiny_spec
from test_distributed import DISTRIBUTED_RTOL, STEPS, TORCHRUN, curve, spec
from tiny_llama import build_tiny_llama

from kubetune_api.constants import EXIT_PREEMPTED
from kubetune_trainer.automodel.distributed import Runtime
from kubetune_trainer.automodel.loading import (
    ShardedLoad,
    _meta_causal_lm,
    lora_initial_values,
    plan_sharded_load,
)
from kubetune_trainer.automodel.model import apply_lora, load_causal_lm
from kubetune_trainer.automodel.settings import LoraSettings, ParallelSettings
from kubetune_trainer.automodel.train import STOP_AFTER_STEP_ENV

pytestmark = pytest.mark.training

LORA = LoraSettings(rank=8, alpha=16, target_modules=None, merge=False)


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tied-llama"), tie_word_embeddings=True, seed=2)


def two_ranks() -> Runtime:
    """Where plan_sharded_load sits in a 2-process job (it only asks whether the run is distributed)."""
    parallel = ParallelSettings(num_nodes=1, gpus_per_node=2, tp=1, pp=1, cp=1, ep=None)
    return Runtime(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), mesh=None, parallel=parallel)


def test_adapters_and_buffers_match_the_loaded_model(tied_llama_dir: Path) -> None:
    """The values sharded loading writes besides the checkpoint's: LoRA adapters as peft draws
    them on the loaded model after the same seed, and the rotary buffers the checkpoint lacks."""
    loaded = load_causal_lm(tied_llama_dir, torch.float32)
    buffers = {name: b.clone() for name, b in loaded.named_buffers()}
    torch.manual_seed(7)
    loaded = apply_lora(loaded, LORA)
    expected = {name: p.detach() for name, p in loaded.named_parameters() if p.requires_grad}

    got = lora_initial_values(tied_llama_dir, torch.float32, LORA, seed=7)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert any(value.abs().sum() > 0 for value in got.values())  # lora_A is random, not zero

    meta = _meta_causal_lm(tied_llama_dir, torch.float32)
    assert all(p.is_meta for p in meta.parameters())
    meta_buffers = dict(meta.named_buffers())
    assert any("inv_freq" in name for name in buffers)
    assert sorted(meta_buffers) == sorted(buffers)
    for name, value in buffers.items():
        assert torch.equal(meta_buffers[name], value), name


def test_plan_maps_tied_head_to_the_stored_embedding(tied_llama_dir: Path) -> None:
    plan = plan_sharded_load(tied_llama_dir, torch.float32, LORA, 7, two_ranks())
    assert isinstance(plan, ShardedLoad), plan
    names = plan.checkpoint_names
    head = "base_model.model.lm_head.weight"
    assert names[head] == "model.embed_tokens.weight"
    assert names["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == (
        "model.layers.0.self_attn.q_proj.weight"
    )
    assert not any("lora_" in name for name in names)
    assert plan.model.get_parameter(head).is_meta


def test_checkpoint_with_other_names_falls_back_to_replicated_loading(tied_llama_dir: Path, tmp_path: Path) -> None:
    """A checkpoint whose names differ from the model's (transformers renames some layouts at
    load time) cannot be read shard-wise by name: the plan says why instead of failing later."""
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "renamed"
    shutil.copytree(tied_llama_dir, model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["model.norm.scale"] = weights.pop("model.norm.weight")
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    reason = plan_sharded_load(model_dir, torch.float32, None, 7, two_ranks())
    assert isinstance(reason, str)
    assert "'model.norm.weight'" in reason


@pytest.mark.parametrize("finetuning_type", ["all_weights"])
def test_fsdp2_sharded_loading_with_tied_embeddings_matches_one_process(
    make_job: Callable[..., Job], tied_llama_dir: Path, finetuning_type: str
) -> None:
    overrides: dict[str, Any] = {"training": {"finetuning_type": finetuning_type, "lora": None}}
    reference = make_job(spec({}, **overrides), name="tied-single", model=tied_llama_dir)
    assert run_in_process(reference) == 0
    expected = curve(reference)

    job = make_job(spec({"num_gpus_per_node": 2}, **overrides), name="tied-fsdp2", model=tied_llama_dir)
    result = run_entrypoint(job, launcher=TORCHRUN)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sharded loading: model built on the meta device" in result.stderr
    assert "tensors read shard-wise" in result.stderr
    got = curve(job)
    assert len(got) == 2 * STEPS + 2
    diff = max(abs(a - b) / abs(b) for a, b in zip(got, expected, strict=True))
    print(f"tied fsdp2 sharded: losses {got} vs 1 process {expected}: max rel diff {diff:.2e}")
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=DISTRIBUTED_RTOL, atol=0.0)
    # The exported model keeps the tie: one embedding, no separate head in the safetensors.
    from safetensors import safe_open

    with safe_open(str(job.output / "model" / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())


def test_fsdp2_lora_stopped_and_resumed_matches_one_process(make_job: Callable[..., Job], tied_llama_dir: Path) -> None:
    """A restarted pod loads shard-wise again (fresh adapters from the seed) and the checkpoint
    then replaces the adapters and optimizer state: the curve continues as one process's."""

    def resume_spec(parallelism: dict[str, Any]) -> dict[str, Any]:
        return tiny_spec(
            schedule={"max_steps": 4, "val_check_interval": 2},
            batch={"global_batch_size": 8, "micro_batch_size": 2},
            parallelism=parallelism,
        )

    reference = make_job(resume_spec({}), name="tied-lora-single", model=tied_llama_dir)
    assert run_in_process(reference) == 0

    job = make_job(resume_spec({"num_gpus_per_node": 2}), name="tied-lora-resumed", model=tied_llama_dir)
    stopped = run_entrypoint(job, launcher=TORCHRUN, extra_env={STOP_AFTER_STEP_ENV: "2"})
    # The ranks exit EXIT_PREEMPTED; torchrun reports a failed worker as 1.
    assert stopped.returncode != 0
    assert "stopped by signal at step 2/4" in stopped.stderr, stopped.stderr[-4000:]
    assert f"exitcode: {EXIT_PREEMPTED}" in stopped.stderr
    assert (job.output / "checkpoints" / "latest").read_text().strip() == "step-0000002"
    assert [m["step"] for m in job.metrics() if "loss" in m] == [1, 2]
    resumed = run_entrypoint(job, launcher=TORCHRUN)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr and "tensors read shard-wise" in resumed.stderr
    assert [m["step"] for m in job.metrics() if "loss" in m] == [1, 2, 3, 4]
    torch.testing.assert_close(
        torch.tensor(job.train_losses()), torch.tensor(reference.train_losses()), rtol=DISTRIBUTED_RTOL, atol=0.0
    )
