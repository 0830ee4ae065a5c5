"""The AutomodelJob spec as the loop needs it: typed, checked, with derived sizes.

The API layer already validated the spec; the checks here repeat only what
the loop depends on (and what a hand-written config could get wrong), each
naming the field and the fix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from kubetune_trainer.common.config import ConfigError, TrainerConfig

FINETUNING_TYPES = ("lora", "lora_merged", "all_weights")
TRAINING_TYPES = ("sft", "distillation")
TEACHER_PRECISIONS = ("bf16", "fp16", "fp32")


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
    training_type: str
    finetuning_type: str
    lora: LoraSettings | None
    max_seq_length: int
    prompt_template: str | None
    teacher_precision: str
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


def _int(cfg: TrainerConfig, dotted: str, default: int, *, minimum: int = 1) -> int:
    value = cfg.get(dotted, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"spec.{dotted} must be an integer >= {minimum}, got {value!r}")
    return value


def _float(cfg: TrainerConfig, dotted: str, default: float, *, minimum: float, maximum: float | None = None) -> float:
    value = cfg.get(dotted, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ConfigError(f"spec.{dotted} must be a number >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"spec.{dotted} must be <= {maximum}, got {value!r}")
    return float(value)


def _choice(cfg: TrainerConfig, dotted: str, default: str, choices: tuple[str, ...]) -> str:
    value = cfg.get(dotted, default)
    if value not in choices:
        raise ConfigError(f"spec.{dotted} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def parse_settings(cfg: TrainerConfig) -> AutomodelSettings:
    if cfg.kind != "AutomodelJob":
        raise ConfigError(f"the Automodel trainer runs AutomodelJob configs, got kind {cfg.kind!r}")
    finetuning_type = _choice(cfg, "training.finetuning_type", "lora", FINETUNING_TYPES)
    lora: LoraSettings | None = None
    if finetuning_type in ("lora", "lora_merged"):
        target_modules = cfg.get("training.lora.target_modules")
        if target_modules is not None and (
            not isinstance(target_modules, list) or not all(isinstance(m, str) and m for m in target_modules)
        ):
            raise ConfigError("spec.training.lora.target_modules must be null or a list of module name patterns")
        lora = LoraSettings(
            rank=_int(cfg, "training.lora.rank", 16),
            alpha=_int(cfg, "training.lora.alpha", 32),
            target_modules=target_modules,
            merge=bool(cfg.get("training.lora.merge", False)),
        )
        if lora.merge:
            finetuning_type = "lora_merged"
    parallel = ParallelSettings(
        num_nodes=_int(cfg, "parallelism.num_nodes", 1),
        gpus_per_node=_int(cfg, "parallelism.num_gpus_per_node", 1),
        tp=_int(cfg, "parallelism.tensor_parallel_size", 1),
        pp=_int(cfg, "parallelism.pipeline_parallel_size", 1),
        cp=_int(cfg, "parallelism.context_parallel_size", 1),
        ep=cfg.get("parallelism.expert_parallel_size"),
    )
    model_parallel = parallel.tp * parallel.pp * parallel.cp
    if parallel.world_size % model_parallel:
        raise ConfigError(
            f"parallelism: num_nodes x num_gpus_per_node = {parallel.world_size} is not divisible by "
            f"tensor x pipeline x context parallel size = {model_parallel}"
        )
    global_batch = _int(cfg, "batch.global_batch_size", 8)
    micro_batch = _int(cfg, "batch.micro_batch_size", 1)
    if global_batch % (micro_batch * parallel.dp):
        raise ConfigError(
            f"batch.global_batch_size {global_batch} must be divisible by micro_batch_size {micro_batch} x "
            f"data-parallel size {parallel.dp}; set it to a multiple of {micro_batch * parallel.dp}"
        )
    seed_value: Any = cfg.get("schedule.seed")
    seed_was_set = seed_value is not None
    # Every rank and every restart of the job must pick the same seed (data order,
    # held-out split), so an unset seed derives from the job's identity.
    identity = str(cfg.metadata.get("uid") or cfg.metadata.get("name") or "kubetune")
    seed = int(seed_value) if seed_was_set else int(hashlib.sha256(identity.encode()).hexdigest(), 16) % 2**31
    interval = cfg.get("schedule.val_check_interval")
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0):
        raise ConfigError(
            f"spec.schedule.val_check_interval must be > 0 (a fraction of an epoch or steps), got {interval!r}"
        )
    max_steps = cfg.get("schedule.max_steps")
    if max_steps is not None:
        max_steps = _int(cfg, "schedule.max_steps", 1)
    return AutomodelSettings(
        training_type=_choice(cfg, "training.training_type", "sft", TRAINING_TYPES),
        finetuning_type=finetuning_type,
        lora=lora,
        max_seq_length=_int(cfg, "training.max_seq_length", 2048, minimum=2),
        prompt_template=cfg.get("dataset.prompt_template"),
        teacher_precision=_choice(cfg, "training.teacher_precision", "bf16", TEACHER_PRECISIONS),
        distillation_ratio=_float(cfg, "training.distillation_ratio", 0.5, minimum=0.0, maximum=1.0),
        distillation_temperature=_float(cfg, "training.distillation_temperature", 1.0, minimum=1e-6),
        offload_teacher=bool(cfg.get("training.offload_teacher", False)),
        epochs=_int(cfg, "schedule.epochs", 1),
        max_steps=max_steps,
        val_check_interval=float(interval) if interval is not None else None,
        seed=seed,
        seed_was_set=seed_was_set,
        global_batch_size=global_batch,
        micro_batch_size=micro_batch,
        sequence_packing=bool(cfg.get("batch.sequence_packing", False)),
        learning_rate=_float(cfg, "optimizer.learning_rate", 5e-6, minimum=0.0),
        weight_decay=_float(cfg, "optimizer.weight_decay", 0.01, minimum=0.0),
        warmup_steps=_int(cfg, "optimizer.warmup_steps", 0, minimum=0),
        parallel=parallel,
    )
