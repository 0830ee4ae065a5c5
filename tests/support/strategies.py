"""Hypothesis strategies for job specs that are valid field by field, so that only the
cross-field rules decide whether they pass: the unit tier feeds them to cel-python,
the cluster tier to the real API server."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

small = st.integers(min_value=1, max_value=4)
maybe = st.none() | st.just(True)


@st.composite
def automodel_specs(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": "base", "dataset": {"training": "train"}}
    par: dict[str, Any] = {}
    for key in (
        "num_nodes",
        "num_gpus_per_node",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "context_parallel_size",
    ):
        if draw(st.booleans()):
            par[key] = draw(small)
    if draw(st.booleans()):
        par["expert_parallel_size"] = draw(small)
    if par:
        spec["parallelism"] = par
    batch: dict[str, Any] = {}
    if draw(st.booleans()):
        batch["global_batch_size"] = draw(st.integers(1, 32))
    if draw(st.booleans()):
        batch["micro_batch_size"] = draw(small)
    if batch:
        spec["batch"] = batch
    training: dict[str, Any] = {}
    if draw(st.booleans()):
        training["training_type"] = draw(st.sampled_from(["sft", "distillation"]))
    if draw(st.booleans()):
        training["finetuning_type"] = draw(st.sampled_from(["lora", "lora_merged", "all_weights"]))
    if draw(st.booleans()):
        training["teacher_model"] = "teacher"
    if draw(st.booleans()):
        training["lora"] = {"merge": draw(st.booleans())}
    if training:
        spec["training"] = training
    if draw(st.booleans()):
        spec["schedule"] = {"val_check_interval": draw(st.sampled_from([0.25, 0.5, 0.99, 1, 2, 2.5, 10, 10.5, 100.0]))}
    return spec


@st.composite
def unsloth_specs(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": {"name": "base"}, "dataset": {"path": "train"}}
    for key in ("load_in_4bit", "load_in_8bit"):
        if draw(st.booleans()):
            spec["model"][key] = draw(st.booleans())
    training: dict[str, Any] = {}
    if draw(st.booleans()):
        training["finetuning_type"] = draw(st.sampled_from(["lora", "all_weights"]))
    if draw(st.booleans()):
        training["lora"] = {"rank": draw(small)}
    if training:
        spec["training"] = training
    if draw(st.booleans()):
        spec["output"] = {"save_method": draw(st.sampled_from(["lora", "merged_16bit", "merged_4bit"]))}
    schedule: dict[str, Any] = {}
    if draw(st.booleans()):
        schedule["warmup_steps"] = draw(st.integers(0, 3))
    if draw(st.booleans()):
        schedule["warmup_ratio"] = draw(st.sampled_from([0.0, 0.1, 0.5]))
    if schedule:
        spec["schedule"] = schedule
    if draw(st.booleans()):
        spec["model"]["dtype"] = draw(st.sampled_from(["auto", "bfloat16", "float16", "float32"]))
    if draw(st.booleans()):
        spec["hardware"] = {"precision": draw(st.sampled_from(["bf16", "fp16"]))}
    if draw(st.booleans()):
        schedule["eval_steps"] = draw(st.integers(1, 5))
        spec["schedule"] = schedule
    if draw(st.booleans()):
        spec["dataset"]["validation_path"] = "val"
    if draw(st.booleans()):
        n = draw(st.integers(1, 4))
        spec.setdefault("hardware", {})["gpus"] = ",".join(str(draw(st.integers(0, 3))) for _ in range(n))
    return spec
