"""Pipeline parallel with torch.distributed.pipelining (GPipe schedule).

Each pipeline rank keeps a contiguous share of the decoder layers (the first
also the embeddings, the last the final norm and the head) inside the original
model object: the kept layers move from a ModuleList to a ModuleDict keyed by
their original index, so every parameter keeps its fully-qualified name and
checkpoints/exports line up with the unsplit model. The stage forward is a
plain Llama/Qwen-style decoder pass.

Limits (refused with a clear error): sequence packing (per-sample position ids
would have to travel between stages) and distillation (the teacher's logits
would have to follow the micro batches to the last stage). Batches are padded
to max_seq_length so every micro batch has the shape the stages agreed on.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from kubetune_trainer.automodel.batches import Batch
from kubetune_trainer.automodel.distributed import Runtime
from kubetune_trainer.automodel.losses import cross_entropy_sum
from kubetune_trainer.automodel.settings import AutomodelSettings
from kubetune_trainer.common.termination import TrainerError


def _decoder_and_lm(model: nn.Module) -> tuple[Any, Any]:
    """(decoder, causal LM) inside a plain or peft-wrapped model."""
    for module in model.modules():
        decoder = getattr(module, "model", None)
        if hasattr(module, "lm_head") and hasattr(decoder, "layers") and hasattr(decoder, "rotary_emb"):
            return decoder, module
    raise TrainerError(
        "pipeline parallel needs a Llama/Qwen-style causal LM (lm_head + model.layers + rotary embedding)"
    )


def split_for_pipeline(model: nn.Module, runtime: Runtime) -> nn.Module:
    settings_pp = runtime.parallel.pp
    decoder, lm = _decoder_and_lm(model)
    layers = list(decoder.layers)
    if len(layers) < settings_pp:
        raise TrainerError(
            f"parallelism.pipeline_parallel_size {settings_pp} exceeds the model's {len(layers)} decoder layers"
        )
    stage = runtime.pp_rank
    bounds = [round(i * len(layers) / settings_pp) for i in range(settings_pp + 1)]
    keep = range(bounds[stage], bounds[stage + 1])
    decoder.layers = nn.ModuleDict({str(i): layers[i] for i in keep})
    first, last = stage == 0, stage == settings_pp - 1
    if not first:
        decoder.embed_tokens = None
    if not last:
        decoder.norm = None
        lm.lm_head = None
    config = decoder.config

    def stage_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        hidden = decoder.embed_tokens(x) if first else x
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=positions
        )
        rotary = decoder.rotary_emb(hidden, position_ids=positions)
        for layer in decoder.layers.values():
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
        if last:
            hidden = lm.lm_head(decoder.norm(hidden))
        return hidden

    model.forward = types.MethodType(stage_forward, model)
    return model


class PipelineEngine:
    """Runs a global batch's micro batches through the GPipe schedule; the last stage computes the loss."""

    def __init__(self, model: nn.Module, settings: AutomodelSettings, runtime: Runtime, teacher: Any) -> None:
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        if teacher is not None:
            raise TrainerError(
                "distillation with parallelism.pipeline_parallel_size > 1 is not supported; "
                "use data or tensor parallel for distillation"
            )
        if settings.sequence_packing:
            raise TrainerError(
                "batch.sequence_packing with parallelism.pipeline_parallel_size > 1 is not supported; "
                "turn packing off or use data/tensor parallel"
            )
        self.model = model
        self.settings = settings
        self.runtime = runtime
        self.scale = 1.0
        self.pad_to: int | None = settings.max_seq_length
        self.n_micro = settings.grad_accumulation
        stage = PipelineStage(model, runtime.pp_rank, settings.parallel.pp, runtime.device, group=runtime.group("pp"))
        # Our loss is already normalised by the global token count: no extra 1/n_microbatches.
        self.schedule = ScheduleGPipe(stage, n_microbatches=self.n_micro, loss_fn=self._loss, scale_grads=False)

    def _inputs(
        self, args: list[tuple[torch.Tensor]], targets: list[torch.Tensor], losses: list[torch.Tensor]
    ) -> dict[str, Any]:
        # Only the first stage takes inputs and only the last one targets and losses.
        last = self.runtime.is_last_stage
        return {
            "arg_mbs": args if self.runtime.pp_rank == 0 else None,
            "target_mbs": targets if last else None,
            "losses": losses if last else None,
        }

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy_sum(logits, labels) * self.scale

    def _stack(self, batches: list[Batch]) -> tuple[list[tuple[torch.Tensor]], list[torch.Tensor]]:
        device = self.runtime.device
        return [(b.input_ids.to(device),) for b in batches], [b.labels.to(device) for b in batches]

    def train_micro_batches(self, batches: list[Batch], target_tokens: int) -> tuple[float, float, float]:
        self.model.train()
        self.scale = self.runtime.parallel.dp / max(1, target_tokens)
        args, targets = self._stack(batches)
        losses: list[torch.Tensor] = []
        self.schedule.step(**self._inputs(args, targets, losses))
        total = sum(float(loss.detach()) for loss in losses) / self.scale if losses else 0.0
        return total, total, 0.0

    @torch.no_grad()
    def eval_batches(self, batches: list[Batch]) -> float:
        """CE sum over exactly n_micro micro batches (the schedule's fixed count)."""
        self.model.eval()
        self.scale = 1.0
        args, targets = self._stack(batches)
        losses: list[torch.Tensor] = []
        self.schedule.eval(**self._inputs(args, targets, losses))
        return sum(float(loss) for loss in losses)
