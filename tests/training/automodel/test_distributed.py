"""Distributed parity on CPU (gloo): FSDP2, tensor parallel 2, pipeline parallel 2, context
parallel 2 and 2 "nodes" give the same losses as one process on the same global batch. The
distributed runs load the model shard-wise (meta device, each rank reads its shard;
test_sharded_loading.py), the one process loads it whole, so these are also the parity tests
of sharded loading."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from automodel_helpers import Job, run_entrypoint, run_in_process, tiny_spec, trainer_env
from localcluster import free_port

pytestmark = pytest.mark.training

# The same global batch split over ranks changes only the order of float32
# sums (all-reduce, reduce-scatter, sharded matmuls): measured differences are
# ~1e-7 relative; 1e-5 still fails on any real mismatch (a wrong normalisation
# or a missing gradient shifts step 2's loss by 1e-3 or more).
DISTRIBUTED_RTOL = 1e-5
STEPS = 3
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def spec(parallelism: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    return tiny_spec(
        schedule={"max_steps": STEPS},
        batch={"global_batch_size": 8, "micro_batch_size": 2},
        parallelism=parallelism,
        **overrides,
    )


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[float]]:
    return {}


def _reference(make_job: Callable[..., Job], cache: dict[str, list[float]], finetuning_type: str) -> list[float]:
    if finetuning_type not in cache:
        overrides: dict[str, Any] = {"training": {"finetuning_type": finetuning_type}}
        if finetuning_type == "all_weights":
            overrides["training"]["lora"] = None
        job = make_job(spec({}, **overrides), name=f"single-{finetuning_type}")
        assert run_in_process(job) == 0
        cache[finetuning_type] = curve(job)
    return cache[finetuning_type]


def curve(job: Job) -> list[float]:
    """Train losses, validation losses and gradient norms (the global norm must see every shard/stage)."""
    grad_norms = [m["grad_norm"] for m in job.metrics() if "grad_norm" in m]
    return job.train_losses() + [v for _, v in job.val_losses()] + grad_norms


@pytest.mark.parametrize(
    ("name", "parallelism", "finetuning_type", "launch"),
    [
        ("fsdp2", {"num_gpus_per_node": 2}, "lora", "torchrun"),
        ("fsdp2-full", {"num_gpus_per_node": 2}, "all_weights", "torchrun"),
        ("tp2", {"num_gpus_per_node": 2, "tensor_parallel_size": 2}, "lora", "entrypoint"),
        ("pp2", {"num_gpus_per_node": 2, "pipeline_parallel_size": 2}, "lora", "torchrun"),
        # On CPU, context parallel's attention is the all-gather stand-in for ring attention
        # (CUDA only); everything else (sharding, shifted labels, FSDP2 over dp x cp) is the GPU path.
        ("cp2-allgather-attention", {"num_gpus_per_node": 2, "context_parallel_size": 2}, "lora", "torchrun"),
        (
            "cp2-allgather-attention-full",
            {"num_gpus_per_node": 2, "context_parallel_size": 2},
            "all_weights",
            "entrypoint",
        ),
    ],
)
def test_two_processes_match_one(
    make_job: Callable[..., Job],
    reference_losses: dict[str, list[float]],
    name: str,
    parallelism: dict[str, Any],
    finetuning_type: str,
    launch: str,
) -> None:
    expected = _reference(make_job, reference_losses, finetuning_type)
    overrides: dict[str, Any] = {"training": {"finetuning_type": finetuning_type}}
    if finetuning_type == "all_weights":
        overrides["training"]["lora"] = None
    job = make_job(spec(parallelism, **overrides), name=name)
    # "entrypoint": plain `python -m kubetune_trainer.automodel`, which relaunches itself under torchrun.
    result = run_entrypoint(job, launcher=TORCHRUN if launch == "torchrun" else None)
    assert result.returncode == 0, result.stderr[-4000:]
    # Each rank built the model on the meta device and read only its shard (issue 15).
    assert "tensors read shard-wise" in result.stderr, result.stderr[-4000:]
    got = curve(job)
    assert len(got) == 2 * STEPS + 2
    diff = max(abs(a - b) / abs(b) for a, b in zip(got, expected, strict=True))
    print(f"{name}: losses {got} vs 1 process {expected}: max rel diff {diff:.2e}")
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=DISTRIBUTED_RTOL, atol=0.0)
    kind = "adapter" if finetuning_type == "lora" else "model"
    assert (job.output / kind / "config.json").exists() or (job.output / kind / "adapter_config.json").exists()


def test_two_nodes_via_pytorchjob_environment(
    make_job: Callable[..., Job], reference_losses: dict[str, list[float]]
) -> None:
    """2 "nodes" x 1 process on localhost, started the way the training-operator starts the
    Worker pods of the operator's elastic PyTorchJob (builders.build_pytorchjob): the pod
    command `torchrun -m kubetune_trainer.automodel --config ...` with only the PET_*
    variables, a c10d rendezvous on worker 0 (here 127.0.0.1), no MASTER_ADDR and no rank."""
    expected = _reference(make_job, reference_losses, "lora")
    job = make_job(spec({"num_nodes": 2, "num_gpus_per_node": 1}), name="two-nodes")
    env = trainer_env(
        {
            "PET_NNODES": "2:2",
            "PET_NPROC_PER_NODE": "1",
            "PET_RDZV_BACKEND": "c10d",
            "PET_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
        }
    )
    command = [
        sys.executable, "-m", "torch.distributed.run", "-m", "kubetune_trainer.automodel", "--config", str(job.config)
    ]  # fmt: skip
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-4000:]
    got = curve(job)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=DISTRIBUTED_RTOL, atol=0.0)
    assert (job.output / "adapter" / "adapter_model.safetensors").exists()


def test_expert_parallel_must_span_the_data_parallel_ranks(make_job: Callable[..., Job], tmp_path: Any) -> None:
    """EP splits experts over all dp ranks (test_expert_parallel.py): 2 expert groups in 1 process
    are refused by the spec's own rule (as admission refuses them) before any process group."""
    job = make_job(spec({"expert_parallel_size": 2}), name="ep")
    log = tmp_path / "termination-log"
    result = run_entrypoint(job, extra_env={"KUBETUNE_TERMINATION_LOG": str(log)})
    assert result.returncode == 1
    reason = log.read_text()
    assert "spec.parallelism.expert_parallel_size" in reason and "must equal the data-parallel size" in reason
