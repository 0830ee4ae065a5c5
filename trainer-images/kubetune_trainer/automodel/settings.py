"""The AutomodelJob spec as the loop needs it: read from the typed spec, with derived sizes.

The spec arrives parsed into `kubetune_api`'s AutomodelJobSpec: types, enums,
ranges (a sequence of at least 2 tokens among them) and the cross-field rules
(GPU and batch divisibility, teacher, LoRA) were checked once, by the model.
What stays here is only what the loop adds: the derived sizes and the seed for
a job that named none.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from kubetune_api.automodel import AutomodelJobSpec
from kubetune_trainer.common.config import AutomodelTrainerConfig, TrainerConfig, expect_kind


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: int
    target_modules: list[str] | None
    merge: bool


@dataclass(frozen=True)
class ParallelSettings:
    num_nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    cp: int
    ep: int | None

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)


@dataclass(frozen=True)
class AutomodelSettings:
    training_type: Literal["sft", "distillation"]
    finetuning_type: Literal["lora", "lora_merged", "all_weights"]
    lora: LoraSettings | None
    max_seq_length: int
    prompt_template: str | None
    teacher_precision: Literal["bf16", "fp16", "fp32"]
    distillation_ratio: float
    distillation_temperature: float
    offload_teacher: bool
    epochs: int
    max_steps: int | None
    val_check_interval: float | None
    seed: int
    seed_was_set: bool
    global_batch_size: int
    micro_batch_size: int
    sequence_packing: bool
    learning_rate: float
    weight_decay: float
    warmup_steps: int
    parallel: ParallelSettings

    @property
    def grad_accumulation(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.parallel.dp)

    @property
    def merge_lora(self) -> bool:
        return self.finetuning_type == "lora_merged" or (self.lora is not None and self.lora.merge)


def parse_settings(cfg: TrainerConfig) -> AutomodelSettings:
    cfg = expect_kind(cfg, AutomodelTrainerConfig)
    spec: AutomodelJobSpec = cfg.spec
    training = spec.training
    lora: LoraSettings | None = None
    if training.lora is not None:  # the model fills it for lora / lora_merged, and only then
        lora = LoraSettings(
            rank=training.lora.rank,
            alpha=training.lora.alpha,
            target_modules=list(training.lora.target_modules) if training.lora.target_modules is not None else None,
            merge=training.lora.merge,
        )
    p = spec.parallelism
    parallel = ParallelSettings(
        num_nodes=p.num_nodes,
        gpus_per_node=p.num_gpus_per_node,
        tp=p.tensor_parallel_size,
        pp=p.pipeline_parallel_size,
        cp=p.context_parallel_size,
        ep=p.expert_parallel_size,
    )
    seed_was_set = spec.schedule.seed is not None
    # Every rank and every restart of the job must pick the same seed (data order,
    # held-out split), so an unset seed derives from the job's identity.
    identity = cfg.metadata.uid or cfg.metadata.name
    seed = (
        spec.schedule.seed
        if spec.schedule.seed is not None
        else int(hashlib.sha256(identity.encode()).hexdigest(), 16) % 2**31
    )
    return AutomodelSettings(
        training_type=training.training_type,
        finetuning_type=training.finetuning_type,
        lora=lora,
        max_seq_length=training.max_seq_length,
        prompt_template=spec.dataset.prompt_template,
        teacher_precision=training.teacher_precision,
        distillation_ratio=training.distillation_ratio,
        distillation_temperature=training.distillation_temperature,
        offload_teacher=training.offload_teacher,
        epochs=spec.schedule.epochs,
        max_steps=spec.schedule.max_steps,
        val_check_interval=spec.schedule.val_check_interval,
        seed=seed,
        seed_was_set=seed_was_set,
        global_batch_size=spec.batch.global_batch_size,
        micro_batch_size=spec.batch.micro_batch_size,
        sequence_packing=spec.batch.sequence_packing,
        learning_rate=spec.optimizer.learning_rate,
        weight_decay=spec.optimizer.weight_decay,
        warmup_steps=spec.optimizer.warmup_steps,
        parallel=parallel,
    )
