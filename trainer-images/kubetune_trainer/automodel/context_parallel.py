"""Context parallel: each rank of a cp group holds 1/cp of every row's tokens.

On CUDA, PyTorch's `context_parallel` (torch.distributed.tensor.experimental) shards
the step's buffers along the sequence and replaces SDPA with ring attention over the
cp group: queries stay local, keys and values travel around the ring. Ring attention
runs only on CUDA's SDPA kernels (flash, memory-efficient, cuDNN), so on CPU (gloo)
this module shards the rows the same way itself and each rank all-gathers the keys and
values instead (`AllGatherAttention`): exact, with memory for the whole row's keys and
values on each rank, and what the CPU tests check. What this module adds for Hugging
Face models, on both:

- Rows are padded to a multiple of 2 x cp. torch's load balancer splits a row into
  2 x cp chunks and gives rank r chunks r and 2cp-1-r (causal work evens out); on
  any other length it silently does not balance while the ring still assumes it.
- Labels are shifted before sharding (`shift_labels`): the next-token target of a
  rank's last token lives on another rank, so the usual `logits[:-1]` / `labels[1:]`
  shift cannot be done after it.
- The model's attention is `kubetune_cp_sdpa`: SDPA with `is_causal=True`, no mask,
  and key/value heads repeated for grouped-query attention. Ring attention accepts
  no mask, and with transformers' own "sdpa" a rank whose position ids jump between
  its two chunks would be taken for packed samples and get a block-diagonal mask.
  transformers builds no mask at all for an attention function it does not know.
- FSDP2 shards over the flattened dp x cp mesh, so gradients are averaged over
  dp x cp ranks; the loop scales the loss by that count (`Runtime.grad_ranks`).

What neither can run (`check_context_parallel`) the admission rules
(kubetune_api.automodel) refuse before any pod starts.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubetune_trainer.automodel.settings import ParallelSettings
from kubetune_trainer.common.config import ConfigError
from kubetune_trainer.common.termination import TrainerError
from kubetune_trainer.data.formatting import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: distributed.py imports this module before the
# torchrun relaunch, which should not pay for importing torch twice.
ATTENTION = "kubetune_cp_sdpa"


def check_context_parallel(parallel: ParallelSettings, *, sequence_packing: bool, training_type: str) -> None:
    """What the trainer cannot run with context_parallel_size > 1; admission refuses the same
    layouts (context-parallel-* rules), so this only fires for configs made by hand."""
    if parallel.cp <= 1:
        return
    if parallel.tp > 1 or parallel.pp > 1:
        raise ConfigError(
            "parallelism.context_parallel_size > 1 runs with data parallel (FSDP2) only in the Automodel trainer: "
            "set tensor_parallel_size and pipeline_parallel_size to 1"
        )
    if sequence_packing:
        raise ConfigError(
            "batch.sequence_packing must be false when parallelism.context_parallel_size > 1: ring attention "
            "runs one causal attention over the whole row"
        )
    if training_type != "sft":
        raise ConfigError(
            "training.training_type must be sft when parallelism.context_parallel_size > 1: the distillation "
            "teacher does not run under context parallel"
        )


def repeat_kv_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention: each key/value head repeated for the query heads it serves."""
    groups = query.shape[1] // key.shape[1]
    if groups == 1:
        return key, value
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)


def causal_sdpa_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (batch, heads, seq, dim) in, (batch, seq, heads, dim) out.

    F.scaled_dot_product_attention is looked up at call time: inside `context_parallel`
    it is torch's ring-attention replacement. Inside `ContextParallel.shard` on CPU, the
    all-gather attention runs instead.
    """
    import torch.nn.functional as F

    if attention_mask is not None:
        raise TrainerError(
            "context parallel got an attention mask from the model; it supports plain causal decoders only"
        )
    dropout_p = dropout if module.training else 0.0
    gathered = _ALL_GATHER.get()
    if gathered is not None:
        return gathered.attend(query, key, value, dropout_p, scaling), None
    key, value = repeat_kv_heads(query, key, value)
    output = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, is_causal=True, scale=scaling)
    return output.transpose(1, 2).contiguous(), None


def use_causal_sdpa(model: Any) -> None:
    """Switch a transformers model (or a peft model around one) to `kubetune_cp_sdpa`."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, causal_sdpa_attention)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    sliding = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    layer_types = getattr(config, "layer_types", None) or []
    if sliding or any(kind != "full_attention" for kind in layer_types):
        raise TrainerError(
            "parallelism.context_parallel_size > 1 needs full causal attention in every layer; this model uses "
            "sliding-window attention: set context_parallel_size to 1"
        )
    base.set_attn_implementation(ATTENTION)


def pad_rows_to_multiple(
    input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, multiple: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (batch, seq) tensors to a multiple of `multiple`; padding carries no target and
    continues each row's positions, as `collate`'s padding does."""
    import torch

    length = input_ids.shape[1]
    extra = -length % multiple
    if extra == 0:
        return input_ids, labels, position_ids
    rows = input_ids.shape[0]
    more_positions = position_ids[:, -1:] + torch.arange(1, extra + 1, device=position_ids.device)
    return (
        torch.cat([input_ids, input_ids.new_full((rows, extra), pad_id)], dim=1),
        torch.cat([labels, labels.new_full((rows, extra), IGNORE_INDEX)], dim=1),
        torch.cat([position_ids, more_positions], dim=1),
    )


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t's target is token t+1; the last position has none."""
    import torch

    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


@dataclass
class ModelInputs:
    """What one forward sees: the whole row, or this rank's context-parallel shard of it."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    labels_shifted: bool  # True when labels[t] already is token t's target


def head_tail_positions(length: int, cp: int, rank: int) -> list[int]:
    """The sequence positions rank `rank` holds: of 2 x cp equal chunks, chunk rank and chunk
    2cp-1-rank (torch's head/tail load balancing, so every rank has the same causal work)."""
    chunk = length // (2 * cp)
    tail = 2 * cp - 1 - rank
    return [*range(rank * chunk, (rank + 1) * chunk), *range(tail * chunk, (tail + 1) * chunk)]


def _gather_sequence(tensor: torch.Tensor, group: Any, cp: int, rank: int) -> torch.Tensor:
    """All ranks' (batch, heads, local seq, dim) tensors concatenated along the sequence, in
    rank order; the backward sums the gradient over ranks and keeps this rank's slice."""
    import torch
    import torch.distributed as dist

    class GatherSequence(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, local: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(local) for _ in range(cp)]
            dist.all_gather(parts, local.contiguous(), group=group)
            ctx.length = local.shape[2]
            return torch.cat(parts, dim=2)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            grad = grad.contiguous()
            dist.all_reduce(grad, group=group)
            return grad[:, :, rank * ctx.length : (rank + 1) * ctx.length]

    gathered: torch.Tensor = GatherSequence.apply(tensor)  # type: ignore[no-untyped-call]
    return gathered


@dataclass
class AllGatherAttention:
    """Context-parallel attention without ring kernels: this rank's queries against every
    rank's keys and values, masked by the tokens' places in the whole row."""

    group: Any
    cp: int
    rank: int
    query_places: torch.Tensor  # (local seq,) this rank's places in the row
    key_places: torch.Tensor  # (seq,) the places of the gathered keys, rank by rank

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, scaling: float | None
    ) -> torch.Tensor:
        import torch.nn.functional as F

        key = _gather_sequence(key, self.group, self.cp, self.rank)
        value = _gather_sequence(value, self.group, self.cp, self.rank)
        key, value = repeat_kv_heads(query, key, value)
        causal = self.key_places[None, :] <= self.query_places[:, None]
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=causal, dropout_p=dropout, scale=scaling)
        return output.transpose(1, 2).contiguous()


# Set while a micro batch runs inside ContextParallel.shard on CPU.
_ALL_GATHER: contextvars.ContextVar[AllGatherAttention | None] = contextvars.ContextVar(
    "kubetune_cp_all_gather", default=None
)


class ContextParallel:
    """Shards each micro batch over the cp mesh for the forward and backward run inside `shard`."""

    def __init__(self, cp_mesh: Any, cp: int, pad_id: int) -> None:
        self.mesh = cp_mesh
        self.cp = cp
        self.multiple = 2 * cp
        self.pad_id = pad_id

    @contextlib.contextmanager
    def shard(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor) -> Iterator[ModelInputs]:
        import torch
        from torch.distributed.tensor.experimental import context_parallel
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ids, targets, positions = pad_rows_to_multiple(input_ids, labels, position_ids, self.multiple, self.pad_id)
        targets = shift_labels(targets)
        if ids.device.type != "cuda":
            length, rank = ids.shape[1], self.mesh.get_local_rank()
            mine = torch.tensor(head_tail_positions(length, self.cp, rank), device=ids.device)
            every = [p for r in range(self.cp) for p in head_tail_positions(length, self.cp, r)]
            attention = AllGatherAttention(
                self.mesh.get_group(), self.cp, rank, mine, torch.tensor(every, device=ids.device)
            )
            token = _ALL_GATHER.set(attention)
            try:
                yield ModelInputs(ids[:, mine], targets[:, mine], positions[:, mine], labels_shifted=True)
            finally:
                _ALL_GATHER.reset(token)
            return
        # Fresh tensors: context_parallel shards its buffers in place (and need not restore them).
        buffers = [ids.clone(), targets, positions.clone()]
        kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
        with (
            sdpa_kernel(kernels),
            context_parallel(self.mesh, buffers=buffers, buffer_seq_dims=[1, 1, 1], no_restore_buffers=set(buffers)),
        ):
            yield ModelInputs(buffers[0], buffers[1], buffers[2], labels_shifted=True)
