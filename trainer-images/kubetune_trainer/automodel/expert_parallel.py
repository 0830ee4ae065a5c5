"""Expert parallelism for transformers' fused-experts MoE blocks (Qwen3-MoE, Mixtral, OLMoE, ...).

transformers 5 stores a MoE layer's experts as one module with two 3D parameters,
`gate_up_proj` [experts, 2 * intermediate, hidden] and `down_proj` [experts, hidden,
intermediate], called as `experts(hidden [tokens, hidden], top_k_index, top_k_weights)`.
Expert parallelism here:

- the expert group is the data-parallel group (parallelism.expert_parallel_size must equal
  the number of data-parallel ranks, tensor/pipeline/context parallel 1): each rank keeps
  num_experts / ep consecutive experts. The two parameters become DTensors on the dp mesh
  with Shard(0) along the expert dim, the placement FSDP2 gives every other parameter, so
  sharded loading, DCP checkpoints, the optimizer and the global gradient norm treat them
  like any FSDP2 shard. FSDP2 itself ignores them (`expert_parameters`): it would otherwise
  all-gather what must stay local and average gradients of different experts;
- the router and every non-expert weight stay as today (FSDP2-sharded, replicated math);
- each rank routes its own tokens, sends each (token, expert) pair to the rank holding the
  expert (all_to_all_single with per-rank split sizes), runs its local experts on what it
  received and sends the results back; `_AllToAll` is the autograd function whose backward
  is the reverse all-to-all, so gradients reach the tokens' ranks and the experts' rank.

Gradient scale: the loop scales each rank's loss by dp (FSDP2 averages gradients over dp);
an expert's gradient is not averaged but summed over the ranks whose tokens it served, so
`_ScaleGrad` divides it by ep (= dp) once, in the backward pass.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kubetune_trainer.common.termination import TrainerError

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
# Expert modules whose forward is exactly `_ep_forward`'s math (per expert: act(x W_gate) * x W_up,
# then W_down, times the routing weight; no biases, no clamping), checked against transformers
# 5.24's modeling files. Other fused-experts classes (gpt-oss's biased, clamped experts, ...)
# would be computed wrongly without an error, so they are refused.
SUPPORTED_EXPERTS = ("Qwen3MoeExperts", "MixtralExperts", "OlmoeExperts", "Qwen2MoeExperts")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows; backward sends the gradients back the same way reversed."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, send: list[int], receive: list[int], group: Any) -> torch.Tensor:
        import torch.distributed as dist

        ctx.send, ctx.receive, ctx.group = send, receive, group
        out = rows.new_empty((sum(receive), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), receive, send, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        import torch.distributed as dist

        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.receive, group=ctx.group)
        return back, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `factor` on the way back."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """The fused-experts modules (3D gate_up_proj and down_proj parameters plus an act_fn)."""
    found = []
    for module in model.modules():
        params = [getattr(module, name, None) for name in EXPERT_PARAMS]
        if all(isinstance(p, nn.Parameter) and p.ndim == 3 for p in params) and hasattr(module, "act_fn"):
            found.append(module)
    return found


def expert_parameters(model: nn.Module) -> set[nn.Parameter]:
    return {getattr(m, name) for m in expert_modules(model) for name in EXPERT_PARAMS}


@dataclass(frozen=True)
class ExpertGroup:
    """The ranks one MoE layer's experts are split over, and this rank's place among them."""

    group: Any  # ProcessGroup
    size: int
    rank: int


def _local(param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


def _ep_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """What the fused-experts forward computes, with this rank's experts and its peers' tokens."""
    import torch.distributed as dist

    where: ExpertGroup = self.__dict__["_kubetune_ep"]
    group, ep, rank = where.group, where.size, where.rank
    act_fn = getattr(self, "act_fn")  # noqa: B009 (nn.Module's __getattr__ types it as Tensor | Module)
    gate_up = _ScaleGrad.apply(_local(getattr(self, "gate_up_proj")), 1.0 / ep)  # noqa: B009
    down = _ScaleGrad.apply(_local(getattr(self, "down_proj")), 1.0 / ep)  # noqa: B009
    per_rank = gate_up.shape[0]
    tokens, top_k = top_k_index.shape
    experts = top_k_index.reshape(-1)
    # (token, expert) pairs ordered by expert, hence by destination rank.
    order = torch.argsort(experts, stable=True)
    pair_token = torch.arange(tokens, device=experts.device).repeat_interleave(top_k)[order]
    pair_expert = experts[order]
    send_counts = torch.bincount(pair_expert // per_rank, minlength=ep)
    receive_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(receive_counts, send_counts, group=group)
    send, receive = send_counts.tolist(), receive_counts.tolist()
    received_expert = pair_expert.new_empty(sum(receive))
    dist.all_to_all_single(received_expert, pair_expert, receive, send, group=group)
    received = _AllToAll.apply(hidden_states[pair_token], send, receive, group)
    out = received.new_zeros(received.shape)
    # Every local expert runs, on zero rows when no token chose it, so each rank's expert
    # parameters always get a gradient (the global norm is a collective over them).
    for local in range(per_rank):
        rows = torch.nonzero(received_expert == rank * per_rank + local).squeeze(-1)
        gate, up = nn.functional.linear(received[rows], gate_up[local]).chunk(2, dim=-1)
        result = nn.functional.linear(act_fn(gate) * up, down[local])
        out = out.index_add(0, rows, result.to(out.dtype))
    returned = _AllToAll.apply(out, receive, send, group)
    weighted = returned * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(returned.dtype)
    final: torch.Tensor = torch.zeros_like(hidden_states).index_add(0, pair_token, weighted.to(hidden_states.dtype))
    return final


def apply_expert_parallel(model: nn.Module, mesh: Any) -> int:
    """Keep this rank's experts (Shard(0) DTensors on `mesh`) and dispatch tokens to them.

    Works on a whole model (each rank slices its experts) and on one built on the meta device
    (sharded loading then reads only the local experts). Returns the number of MoE layers.
    """
    from torch.distributed.tensor import DTensor, Shard

    modules = expert_modules(model)
    unsupported = sorted({type(m).__name__ for m in modules} - set(SUPPORTED_EXPERTS))
    if unsupported:
        raise TrainerError(
            f"parallelism.expert_parallel_size > 1 does not support this model's experts ({', '.join(unsupported)}); "
            f"supported: {', '.join(SUPPORTED_EXPERTS)} (Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE)"
        )
    if not modules:
        raise TrainerError(
            "parallelism.expert_parallel_size > 1 needs a mixture-of-experts model with transformers' fused "
            "experts (gate_up_proj/down_proj per MoE layer, e.g. Qwen3-MoE, Mixtral, OLMoE); this model has none"
        )
    ep, rank = mesh.size(), mesh.get_local_rank()
    for module in modules:
        count = getattr(module, "gate_up_proj").shape[0]  # noqa: B009
        if count % ep:
            raise TrainerError(
                f"parallelism.expert_parallel_size {ep} must divide the model's number of experts ({count})"
            )
        for name in EXPERT_PARAMS:
            full = getattr(module, name)
            local = full.detach().chunk(ep, dim=0)[rank].clone()
            sharded = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
            setattr(module, name, nn.Parameter(sharded, requires_grad=full.requires_grad))
        module.__dict__["_kubetune_ep"] = ExpertGroup(group=mesh.get_group(), size=ep, rank=rank)
        module.forward = types.MethodType(_ep_forward, module)
    return len(modules)
