"""Spec builders shared by the unit and cluster tiers: minimal valid specs, and for
every cross-field rule a spec that keeps it and one that breaks it."""

from __future__ import annotations

import copy
from typing import Any

from kubetune_api.automodel import AutomodelJobSpec
from kubetune_api.entities import FilesetSpec, ModelSpec
from kubetune_api.unsloth import UnslothJobSpec

AUTOMODEL_MIN: dict[str, Any] = {"model": "base", "dataset": {"training": "train"}}
UNSLOTH_MIN: dict[str, Any] = {"model": {"name": "base"}, "dataset": {"path": "train"}}


def get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj[part]
    return obj


def with_value(base: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(base)
    cur = spec
    *parents, last = dotted.split(".")
    for part in parents:
        cur = cur.setdefault(part, {})
    cur[last] = value
    return spec


def without(base: dict[str, Any], dotted: str) -> dict[str, Any]:
    spec = copy.deepcopy(base)
    cur = spec
    *parents, last = dotted.split(".")
    for part in parents:
        cur = cur[part]
    del cur[last]
    return spec


RULE_CASES: dict[str, tuple[Any, dict[str, Any], dict[str, Any]]] = {
    # rule name: (model, good spec, bad spec)
    "gpus-divisible-by-model-parallel": (
        AutomodelJobSpec,
        with_value(
            with_value(AUTOMODEL_MIN, "parallelism", {"num_gpus_per_node": 4, "tensor_parallel_size": 2}),
            "batch.global_batch_size",
            8,
        ),
        with_value(AUTOMODEL_MIN, "parallelism", {"num_gpus_per_node": 3, "tensor_parallel_size": 2}),
    ),
    "global-batch-divisible": (
        AutomodelJobSpec,
        with_value(
            with_value(AUTOMODEL_MIN, "parallelism", {"num_nodes": 2, "num_gpus_per_node": 2}),
            "batch",
            {"global_batch_size": 8, "micro_batch_size": 2},
        ),
        with_value(
            with_value(AUTOMODEL_MIN, "parallelism", {"num_nodes": 2, "num_gpus_per_node": 2}),
            "batch",
            {"global_batch_size": 12, "micro_batch_size": 2},
        ),
    ),
    "expert-parallel-needs-tp-1": (
        AutomodelJobSpec,
        with_value(AUTOMODEL_MIN, "parallelism", {"num_gpus_per_node": 2, "expert_parallel_size": 2}),
        with_value(
            AUTOMODEL_MIN, "parallelism", {"num_gpus_per_node": 2, "tensor_parallel_size": 2, "expert_parallel_size": 2}
        ),
    ),
    "expert-parallel-spans-data-parallel": (
        AutomodelJobSpec,
        with_value(AUTOMODEL_MIN, "parallelism", {"num_gpus_per_node": 2, "expert_parallel_size": 2}),
        with_value(
            with_value(AUTOMODEL_MIN, "parallelism", {"num_gpus_per_node": 4, "expert_parallel_size": 2}),
            "batch",
            {"global_batch_size": 8, "micro_batch_size": 2},
        ),
    ),
    "context-parallel-with-data-parallel-only": (
        AutomodelJobSpec,
        with_value(AUTOMODEL_MIN, "parallelism", {"num_gpus_per_node": 2, "context_parallel_size": 2}),
        with_value(
            AUTOMODEL_MIN,
            "parallelism",
            {"num_gpus_per_node": 4, "context_parallel_size": 2, "tensor_parallel_size": 2},
        ),
    ),
    "context-parallel-without-packing": (
        AutomodelJobSpec,
        with_value(AUTOMODEL_MIN, "parallelism", {"num_gpus_per_node": 2, "context_parallel_size": 2}),
        with_value(
            with_value(AUTOMODEL_MIN, "parallelism", {"num_gpus_per_node": 2, "context_parallel_size": 2}),
            "batch.sequence_packing",
            True,
        ),
    ),
    "context-parallel-sft-only": (
        AutomodelJobSpec,
        with_value(AUTOMODEL_MIN, "parallelism", {"num_gpus_per_node": 2, "context_parallel_size": 2}),
        with_value(
            with_value(AUTOMODEL_MIN, "parallelism", {"num_gpus_per_node": 2, "context_parallel_size": 2}),
            "training",
            {"training_type": "distillation", "teacher_model": "t"},
        ),
    ),
    "distillation-needs-teacher": (
        AutomodelJobSpec,
        with_value(AUTOMODEL_MIN, "training", {"training_type": "distillation", "teacher_model": "t"}),
        with_value(AUTOMODEL_MIN, "training", {"training_type": "distillation"}),
    ),
    "teacher-only-for-distillation": (
        AutomodelJobSpec,
        with_value(AUTOMODEL_MIN, "training", {"training_type": "distillation", "teacher_model": "t"}),
        with_value(AUTOMODEL_MIN, "training", {"training_type": "sft", "teacher_model": "t"}),
    ),
    "lora-only-for-lora-methods": (
        AutomodelJobSpec,
        with_value(AUTOMODEL_MIN, "training", {"finetuning_type": "lora", "lora": {"rank": 4}}),
        with_value(AUTOMODEL_MIN, "training", {"finetuning_type": "all_weights", "lora": {"rank": 4}}),
    ),
    "val-check-interval-whole-steps": (
        AutomodelJobSpec,
        with_value(AUTOMODEL_MIN, "schedule.val_check_interval", 100),
        with_value(AUTOMODEL_MIN, "schedule.val_check_interval", 2.5),
    ),
    "quantized-loading-exclusive": (
        UnslothJobSpec,
        with_value(with_value(UNSLOTH_MIN, "model.load_in_8bit", True), "model.load_in_4bit", False),
        with_value(UNSLOTH_MIN, "model.load_in_8bit", True),
    ),
    "all-weights-unquantized": (
        UnslothJobSpec,
        with_value(with_value(UNSLOTH_MIN, "training.finetuning_type", "all_weights"), "model.load_in_4bit", False),
        with_value(UNSLOTH_MIN, "training.finetuning_type", "all_weights"),
    ),
    "merged-save-needs-lora": (
        UnslothJobSpec,
        with_value(UNSLOTH_MIN, "output.save_method", "merged_16bit"),
        with_value(
            with_value(
                with_value(UNSLOTH_MIN, "output.save_method", "merged_16bit"), "training.finetuning_type", "all_weights"
            ),
            "model.load_in_4bit",
            False,
        ),
    ),
    "merged-4bit-needs-4bit-base": (
        UnslothJobSpec,
        with_value(UNSLOTH_MIN, "output.save_method", "merged_4bit"),
        with_value(with_value(UNSLOTH_MIN, "output.save_method", "merged_4bit"), "model.load_in_4bit", False),
    ),
    "dtype-matches-precision": (
        UnslothJobSpec,
        with_value(with_value(UNSLOTH_MIN, "model.dtype", "float16"), "hardware.precision", "fp16"),
        with_value(UNSLOTH_MIN, "model.dtype", "float16"),
    ),
    "eval-steps-need-validation": (
        UnslothJobSpec,
        with_value(with_value(UNSLOTH_MIN, "schedule.eval_steps", 10), "dataset.validation_path", "val"),
        with_value(UNSLOTH_MIN, "schedule.eval_steps", 10),
    ),
    "warmup-exclusive": (
        UnslothJobSpec,
        with_value(with_value(UNSLOTH_MIN, "schedule.warmup_ratio", 0.1), "schedule.warmup_steps", 0),
        with_value(with_value(UNSLOTH_MIN, "schedule.warmup_ratio", 0.1), "schedule.warmup_steps", 5),
    ),
    "lora-only-for-lora": (
        UnslothJobSpec,
        with_value(UNSLOTH_MIN, "training.lora", {"rank": 8}),
        with_value(
            with_value(
                with_value(UNSLOTH_MIN, "training.lora", {"rank": 8}), "training.finetuning_type", "all_weights"
            ),
            "model.load_in_4bit",
            False,
        ),
    ),
    "gpu-indices-distinct": (
        UnslothJobSpec,
        with_value(UNSLOTH_MIN, "hardware.gpus", "0,1"),
        with_value(UNSLOTH_MIN, "hardware.gpus", "1,01"),
    ),
    "storage-has-a-location": (
        FilesetSpec,
        {"storage": {"localPath": "data"}},
        {"storage": {}},
    ),
    "source-is-one-of": (
        FilesetSpec,
        {"storage": {"localPath": "data"}, "source": {"s3": {"bucket": "data"}}},
        {"storage": {"localPath": "data"}, "source": {"s3": {"bucket": "data"}, "huggingface": {"repo": "org/chat"}}},
    ),
    "adapter-needs-base": (
        ModelSpec,
        {"storage": {"pvc": {"claimName": "m"}}, "format": "adapter", "baseModel": "base"},
        {"storage": {"pvc": {"claimName": "m"}}, "format": "adapter"},
    ),
}


KIND_OF_MODEL = {
    AutomodelJobSpec: "AutomodelJob",
    UnslothJobSpec: "UnslothJob",
    ModelSpec: "Model",
    FilesetSpec: "Fileset",
}


def manifest(model: Any, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": KIND_OF_MODEL[model],
        "metadata": {"name": name},
        "spec": spec,
    }
