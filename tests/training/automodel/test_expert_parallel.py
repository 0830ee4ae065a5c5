"""Expert parallelism (issue 15 item 2) on CPU (gloo): a tiny Qwen3-MoE (2 layers, 4 experts,
top-2) trained with expert_parallel_size 2 in 2 processes (each holds 2 experts, tokens go to
them by all-to-all; FSDP2 shards the rest) matches one process on the same global batch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from automodel_helpers import Job, run_entrypoint, run_in_process
from test_distributed import DISTRIBUTED_RTOL, STEPS, TORCHRUN, curve, spec
from tiny_llama import build_tiny_qwen3_moe

pytestmark = pytest.mark.training

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EP2 = {"num_gpus_per_node": 2, "expert_parallel_size": 2}


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny-moe"))


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
    got = curve(job)
    assert len(got) == 2 * STEPS + 2
    diff = max(abs(a - b) / abs(b) for a, b in zip(got, expected, strict=True))
    print(f"ep2 {finetuning_type}: {got} vs 1 process {expected}: max rel diff {diff:.2e}")
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=DISTRIBUTED_RTOL, atol=0.0)
