"""Process group, device mesh and the torchrun / PyTorchJob launch contract.

Launch modes that all end up in `init_runtime`:
- single process (`python -m kubetune_trainer.automodel`, 1 GPU or CPU);
- under torchrun (RANK/WORLD_SIZE/LOCAL_RANK and TORCHELASTIC_RUN_ID set);
- in a Kubeflow PyTorchJob pod started without torchrun: the pod has
  PET_NNODES / PET_NPROC_PER_NODE / PET_NODE_RANK / MASTER_ADDR / MASTER_PORT
  and `relaunch_under_torchrun` re-executes the entrypoint under torchrun,
  which reads those PET_* variables itself.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from kubetune_trainer.automodel.context_parallel import check_context_parallel
from kubetune_trainer.automodel.settings import AutomodelSettings, ParallelSettings
from kubetune_trainer.common.config import ConfigError

MESH_DIMS = ("pp", "dp", "cp", "tp")


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def torchrun_command(argv: list[str], parallel: ParallelSettings) -> list[str] | None:
    """The torchrun command line that replaces this process, or None to run in-process.

    PET_* variables (set by the Kubeflow training-operator) win over the spec,
    because they describe the pods that really exist.
    """
    if under_torchrun():
        return None
    nnodes = os.environ.get("PET_NNODES", str(parallel.num_nodes))
    nproc = os.environ.get("PET_NPROC_PER_NODE", str(parallel.gpus_per_node))
    if nnodes == "1" and nproc == "1":
        return None
    if "PET_NNODES" not in os.environ and parallel.num_nodes > 1:
        raise ConfigError(
            f"parallelism.num_nodes is {parallel.num_nodes} but this process was started without a PyTorchJob "
            "environment (PET_NNODES, MASTER_ADDR, ...); run it through the operator or torchrun on every node"
        )
    command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}"]
    if "PET_NNODES" not in os.environ:
        command.append("--standalone")
    else:
        # The training-operator sets MASTER_ADDR/MASTER_PORT (the master pod's
        # service) and PET_NODE_RANK; torchrun itself only reads PET_* names.
        for flag, names in (
            ("--node-rank", ("PET_NODE_RANK",)),
            ("--master-addr", ("PET_MASTER_ADDR", "MASTER_ADDR")),
            ("--master-port", ("PET_MASTER_PORT", "MASTER_PORT")),
        ):
            value = next((os.environ[n] for n in names if os.environ.get(n)), None)
            if value is not None:
                command.append(f"{flag}={value}")
    return [*command, "-m", "kubetune_trainer.automodel", *argv]


@dataclass
class Runtime:
    """Where this process sits: ranks, device and the mesh (None when world size is 1)."""

    rank: int
    world_size: int
    local_rank: int
    device: Any  # torch.device
    mesh: Any  # DeviceMesh | None
    parallel: ParallelSettings

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def coordinate(self, dim: str) -> int:
        if self.mesh is None:
            return 0
        return int(self.mesh[dim].get_local_rank())

    def size(self, dim: str) -> int:
        return {"pp": self.parallel.pp, "dp": self.parallel.dp, "cp": self.parallel.cp, "tp": self.parallel.tp}[dim]

    @property
    def dp_rank(self) -> int:
        return self.coordinate("dp")

    @property
    def pp_rank(self) -> int:
        return self.coordinate("pp")

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.parallel.pp - 1

    @property
    def reports_loss(self) -> bool:
        """The ranks whose loss sums add up to the global one: one per tensor-parallel group on the
        last stage. Context-parallel ranks each hold a different part of every row, so all count."""
        return self.is_last_stage and self.coordinate("tp") == 0

    @property
    def counts_tokens(self) -> bool:
        """One rank per data-parallel replica counts a batch's (unsharded) target tokens."""
        return self.reports_loss and self.coordinate("cp") == 0

    @property
    def grad_ranks(self) -> int:
        """How many ranks FSDP2 averages gradients over (dp x cp; see apply_fsdp)."""
        return self.parallel.dp * self.parallel.cp

    @property
    def fsdp_mesh(self) -> Any:
        """dp, or with context parallel the flattened dp x cp mesh: cp ranks hold the same
        parameters and each computes gradients from its part of the tokens."""
        return self.mesh["dp_cp"] if self.parallel.cp > 1 else self.mesh["dp"]

    def group(self, dim: str) -> Any:
        return None if self.mesh is None else self.mesh[dim].get_group()

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum floats over every rank (float64 on CPU for exact token counts)."""
        if not self.distributed:
            return values
        import torch
        import torch.distributed as dist

        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.tolist()]

    def shutdown(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def check_parallel_support(
    parallel: ParallelSettings, *, sequence_packing: bool = False, training_type: str = "sft"
) -> None:
    """Refuse what this trainer cannot do, before any process group exists."""
    if parallel.ep is not None and parallel.ep > 1:
        # The expert group is the data-parallel group (expert_parallel.py): experts are split
        # over the dp ranks, everything else is FSDP2-sharded over the same ranks.
        if parallel.tp > 1 or parallel.pp > 1 or parallel.cp > 1:
            raise ConfigError(
                "parallelism.expert_parallel_size > 1 runs with data parallel only in the Automodel trainer: "
                "set tensor_parallel_size, pipeline_parallel_size and context_parallel_size to 1"
            )
        if parallel.ep != parallel.dp:
            raise ConfigError(
                f"parallelism.expert_parallel_size {parallel.ep} must equal the number of data-parallel "
                f"processes ({parallel.dp} = num_nodes x num_gpus_per_node): the Automodel trainer splits "
                "the experts over all data-parallel ranks"
            )
    check_context_parallel(parallel, sequence_packing=sequence_packing, training_type=training_type)


def init_runtime(settings: AutomodelSettings) -> Runtime:
    import torch

    parallel = settings.parallel

    world_size = int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun() else 1
    rank = int(os.environ.get("RANK", "0")) if under_torchrun() else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if under_torchrun() else 0
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    check_parallel_support(parallel, sequence_packing=settings.sequence_packing, training_type=settings.training_type)
    if world_size != parallel.world_size:
        raise ConfigError(
            f"parallelism asks for {parallel.world_size} processes (num_nodes {parallel.num_nodes} x "
            f"num_gpus_per_node {parallel.gpus_per_node}) but {world_size} were started; "
            "launch with a matching torchrun --nnodes/--nproc-per-node or fix the parallelism block"
        )
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size == 1:
        return Runtime(rank=0, world_size=1, local_rank=0, device=device, mesh=None, parallel=parallel)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    shape = (parallel.pp, parallel.dp, parallel.cp, parallel.tp)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=MESH_DIMS)
    if parallel.cp > 1:
        # FSDP2 shards over dp x cp as one dimension (Runtime.fsdp_mesh). _flatten is private,
        # but it is how torch's own multi-dimensional recipes (torchtitan) build that mesh.
        mesh["dp", "cp"]._flatten(mesh_dim_name="dp_cp")
    return Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=device, mesh=mesh, parallel=parallel)
