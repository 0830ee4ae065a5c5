"""Expert parallelism (issue 15 item 2) on CPU (gloo): a tiny Qwen3-MoE (2 layers, 4 experts,
top-2) trained with expert_parallel_size 2 in 2 processes (each holds 2 experts, tokens go to
them by all-to-all; FSDP2 shards the rest) matches one process on the same global batch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from automodel_helpers import Job, admitted_and_runs, run_entrypoint, run_in_process, tiny_spec
from test_distributed import DISTRIBUTED_RTOL, STEPS, TORCHRUN, curve, spec
from tiny_llama import build_tiny_qwen3_moe

from kubetune_trainer.automodel.train import STOP_AFTER_STEP_ENV

pytestmark = pytest.mark.training

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EP2 = {"num_gpus_per_node": 2, "expert_parallel_size": 2}


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny-moe"))


@pytest.fixture(scope="module")
def tiny_moe_fused_dir(tiny_moe_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model with its experts stored fused (one 3D tensor per MoE layer, the model's own
    names), the layout sharded loading can read piecewise."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-moe-fused")
    shutil.copytree(tiny_moe_dir, out, dirs_exist_ok=True)
    state = AutoModelForCausalLM.from_pretrained(str(tiny_moe_dir)).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_expert_parallel_reads_fused_experts_shard_wise(make_job: Callable[..., Job], tiny_moe_fused_dir: Path) -> None:
    """With fused experts on disk, each rank builds the model on the meta device and reads only
    its experts (the Shard(0) DTensor's rows) and its FSDP2 shards; losses as one process."""
    single = make_job(spec({}, **overrides("all_weights")), name="fused-single", model=tiny_moe_fused_dir)
    assert run_in_process(single) == 0
    job = make_job(spec(EP2, **overrides("all_weights")), name="fused-ep2", model=tiny_moe_fused_dir)
    result = run_entrypoint(job, launcher=TORCHRUN)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "tensors read shard-wise" in result.stderr, result.stderr[-4000:]
    got, expected = curve(job), curve(single)
    print(f"ep2 fused, sharded loading: {got} vs 1 process {expected}")
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=DISTRIBUTED_RTOL, atol=0.0)


def overrides(finetuning_type: str) -> dict[str, Any]:
    if finetuning_type == "all_weights":
        return {"training": {"finetuning_type": "all_weights", "lora": None}}
    # LoRA on attention only: the experts stay frozen, their forward still goes through the all-to-all.
    return {
        "training": {
            "finetuning_type": "lora",
            "lora": {"rank": 8, "alpha": 16, "merge": False, "target_modules": ATTENTION},
        }
    }


@pytest.mark.parametrize("finetuning_type", ["all_weights", "lora"])
def test_expert_parallel_two_processes_match_one(
    make_job: Callable[..., Job], tiny_moe_dir: Path, finetuning_type: str
) -> None:
    single = make_job(spec({}, **overrides(finetuning_type)), name=f"single-{finetuning_type}", model=tiny_moe_dir)
    assert run_in_process(single) == 0
    expected = curve(single)
    job = make_job(spec(EP2, **overrides(finetuning_type)), name=f"ep2-{finetuning_type}", model=tiny_moe_dir)
    result = run_entrypoint(job, launcher=TORCHRUN)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "expert parallel 2: the experts of 2 MoE layers split over dp ranks" in result.stderr, result.stderr[-4000:]
    # Qwen3-MoE checkpoints store one tensor per expert, the model fuses them: sharded loading
    # cannot map them, so every rank loads the whole model and keeps its experts.
    assert "replicated loading (every rank reads the whole model)" in result.stderr, result.stderr[-4000:]
    got = curve(job)
    assert len(got) == 2 * STEPS + 2
    diff = max(abs(a - b) / abs(b) for a, b in zip(got, expected, strict=True))
    print(f"ep2 {finetuning_type}: {got} vs 1 process {expected}: max rel diff {diff:.2e}")
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=DISTRIBUTED_RTOL, atol=0.0)
    if finetuning_type == "all_weights":
        # Export: rank 0 gathers every rank's experts into one ordinary HF checkpoint that
        # transformers loads, with the one-process export's weights.
        from transformers import AutoModelForCausalLM

        exported = AutoModelForCausalLM.from_pretrained(str(job.output / "model")).state_dict()
        reference = AutoModelForCausalLM.from_pretrained(str(single.output / "model")).state_dict()
        assert exported.keys() == reference.keys()
        assert exported["model.layers.0.mlp.experts.gate_up_proj"].shape[0] == 4
        worst = max(float((exported[k] - reference[k]).abs().max()) for k in reference)
        print(f"ep2 export vs 1 process: max abs weight diff {worst:.2e}")
        for name, value in reference.items():
            torch.testing.assert_close(exported[name], value, rtol=DISTRIBUTED_RTOL, atol=1e-6, msg=name)


def test_expert_parallel_stopped_and_resumed_matches_one_process(
    make_job: Callable[..., Job], tiny_moe_dir: Path
) -> None:
    """The DCP checkpoint holds each rank's experts (and their AdamW state) as Shard(0) pieces of
    the full tensor; a restarted EP job loads them back and continues one process's curve."""

    def resume_spec(parallelism: dict[str, Any]) -> dict[str, Any]:
        return tiny_spec(
            schedule={"max_steps": 4, "val_check_interval": 2},
            batch={"global_batch_size": 8, "micro_batch_size": 2},
            parallelism=parallelism,
            **overrides("all_weights"),
        )

    reference = make_job(resume_spec({}), name="moe-single", model=tiny_moe_dir)
    assert run_in_process(reference) == 0
    job = make_job(resume_spec(EP2), name="moe-ep2-resumed", model=tiny_moe_dir)
    stopped = run_entrypoint(job, launcher=TORCHRUN, extra_env={STOP_AFTER_STEP_ENV: "2"})
    assert stopped.returncode != 0
    assert "stopped by signal at step 2/4" in stopped.stderr, stopped.stderr[-4000:]
    assert (job.output / "checkpoints" / "latest").read_text().strip() == "step-0000002"
    resumed = run_entrypoint(job, launcher=TORCHRUN)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr
    assert [m["step"] for m in job.metrics() if "loss" in m] == [1, 2, 3, 4]
    got = job.train_losses() + [m["grad_norm"] for m in job.metrics() if "grad_norm" in m]
    expected = reference.train_losses() + [m["grad_norm"] for m in reference.metrics() if "grad_norm" in m]
    print(f"ep2 stopped+resumed: {got} vs 1 process {expected}")
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=DISTRIBUTED_RTOL, atol=0.0)


def test_admission_and_trainer_agree_on_expert_parallel_layouts() -> None:
    """Every small layout with expert_parallel_size set: the API admits it exactly when the
    trainer's own check accepts it, so no EP layout
    is refused only after the pods start."""
    import itertools

    from kubetune_trainer.automodel.settings import ParallelSettings

    checked = 0
    for nodes, gpus, tp, pp, cp, ep in itertools.product((1, 2), (1, 2, 4), (1, 2), (1, 2), (1, 2), (1, 2, 4)):
        if (nodes * gpus) % (tp * pp * cp):
            continue  # refused by gpus-divisible-by-model-parallel, which has nothing to do with EP
        dp = nodes * gpus // (tp * pp * cp)
        parallelism = {
            "num_nodes": nodes,
            "num_gpus_per_node": gpus,
            "tensor_parallel_size": tp,
            "pipeline_parallel_size": pp,
            "context_parallel_size": cp,
            "expert_parallel_size": ep,
        }
        raw = {
            "model": "base",
            "dataset": {"training": "train"},
            "parallelism": parallelism,
            "batch": {"global_batch_size": 2 * dp, "micro_batch_size": 2},
        }
        admitted, runs = admitted_and_runs(raw, ParallelSettings(nodes, gpus, tp, pp, cp, ep))
        assert admitted == runs, (parallelism, admitted, runs)
        checked += 1
    assert checked > 50


def test_expert_parallel_refuses_models_it_cannot_split(tiny_moe_dir: Path) -> None:
    """A dense model has no experts to split, and a fused-experts class whose math the EP forward
    does not reproduce (here: a subclass under another name) is refused, not computed wrongly."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from kubetune_trainer.automodel.expert_parallel import apply_expert_parallel, expert_modules
    from kubetune_trainer.common.termination import TrainerError

    dense = LlamaForCausalLM(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    )
    with pytest.raises(TrainerError, match="needs a mixture-of-experts model"):
        apply_expert_parallel(dense, mesh=None)
    moe = AutoModelForCausalLM.from_pretrained(str(tiny_moe_dir))
    for module in expert_modules(moe):
        module.__class__ = type("BiasedExperts", (type(module),), {})
    with pytest.raises(TrainerError, match=r"does not support this model's experts \(BiasedExperts\)"):
        apply_expert_parallel(moe, mesh=None)
