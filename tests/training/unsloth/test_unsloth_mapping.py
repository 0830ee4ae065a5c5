"""The spec -> Unsloth/trl mapping and the device substitutions, as pure functions (no torch).

Golden files in golden/; regenerate with KUBETUNE_UPDATE_GOLDEN=1 after a
deliberate change and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from unsloth_helpers import config_document, parsed, unsloth_spec

from kubetune_trainer.common.config import ConfigError
from kubetune_trainer.unsloth.mapping import (
    DeviceCapabilities,
    UnslothConfigError,
    UnslothKwargs,
    effective_settings,
    map_spec,
)

GOLDEN = Path(__file__).resolve().parent / "golden"

CPU_BF16 = DeviceCapabilities("cpu", "x86_64 with AVX512-BF16", bf16=True, fp16=False, bnb_4bit=True, bnb_8bit=False)
CPU_PLAIN = DeviceCapabilities("cpu", "x86_64 AVX2 only", bf16=False, fp16=False, bnb_4bit=False, bnb_8bit=False)
CPU_AMX_FP16 = DeviceCapabilities("cpu", "AMX-FP16 without bf16", bf16=False, fp16=True, bnb_4bit=True, bnb_8bit=False)
CUDA_AMPERE = DeviceCapabilities("cuda", "NVIDIA A100", bf16=True, fp16=True, bnb_4bit=True, bnb_8bit=True)
CUDA_T4 = DeviceCapabilities("cuda", "Tesla T4", bf16=False, fp16=True, bnb_4bit=True, bnb_8bit=True)
DEVICES = {
    "cpu_bf16": CPU_BF16,
    "cpu_plain": CPU_PLAIN,
    "cpu_amx_fp16": CPU_AMX_FP16,
    "cuda_ampere": CUDA_AMPERE,
    "cuda_t4": CUDA_T4,
}

# Every field set away from its default (validation data present).
ALL_FIELDS = unsloth_spec(
    model={
        "max_seq_length": 1024,
        "load_in_4bit": False,
        "load_in_8bit": True,
        "dtype": "float16",
        "trust_remote_code": True,
    },
    dataset={"text_field": "body", "apply_chat_template": True, "validation_path": "val", "packing": True},
    training={
        "use_gradient_checkpointing": "true",
        "lora": {
            "rank": 8,
            "alpha": 32,
            "dropout": 0.05,
            "target_modules": ["q_proj", "v_proj"],
            "bias": "lora_only",
            "use_rslora": True,
            "random_state": 7,
        },
    },
    schedule={
        "epochs": 3,
        "max_steps": 100,
        "warmup_ratio": 0.1,
        "lr_scheduler_type": "cosine",
        "logging_steps": 5,
        "save_steps": 50,
        "eval_steps": 25,
        "seed": 11,
    },
    batch={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 8},
    optimizer={"learning_rate": 1e-4, "weight_decay": 0.01, "optim": "paged_adamw_8bit"},
    hardware={"gpus": "1,2", "precision": "fp16"},
    output={"save_method": "merged_16bit"},
    integrations={
        "mlflow": {
            "tracking_uri": "http://mlflow:5000",
            "experiment_name": "exp",
            "token_secret": {"name": "mlflow", "key": "token"},
        },
        "wandb": {"project": "proj", "entity": "team", "api_key_secret": {"name": "wandb", "key": "k"}},
    },
)
ALL_WEIGHTS = unsloth_spec(model={"load_in_4bit": False}, training={"finetuning_type": "all_weights"})
DEFAULTS = unsloth_spec()
SPECS = {"defaults": (DEFAULTS, False), "all_fields": (ALL_FIELDS, True), "all_weights": (ALL_WEIGHTS, False)}


def mapped(spec: dict[str, Any], *, validation: bool = False, hand_edited: bool = False) -> UnslothKwargs:
    validation_data = "/kubetune/data/validation" if validation else None
    return map_spec(parsed(config_document(spec, validation_data=validation_data, hand_edited=hand_edited)))


def check_golden(name: str, actual: Any) -> None:
    path = GOLDEN / f"{name}.json"
    text = json.dumps(actual, indent=2, sort_keys=True) + "\n"
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing; run with KUBETUNE_UPDATE_GOLDEN=1 once and review it"
    assert json.loads(path.read_text()) == json.loads(text), f"{name} differs from {path}"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_mapping_matches_golden(name: str) -> None:
    spec, validation = SPECS[name]
    check_golden(f"mapping_{name}", mapped(spec, validation=validation).as_dict())


def test_effective_settings_match_golden() -> None:
    table = {}
    for spec_name, (spec, validation) in sorted(SPECS.items()):
        requested = mapped(spec, validation=validation)
        for device_name, device in sorted(DEVICES.items()):
            effective, subs = effective_settings(requested, device)
            table[f"{spec_name}@{device_name}"] = {
                "substitutions": [s.as_dict() for s in subs],
                "from_pretrained": effective.from_pretrained,
                "use_gradient_checkpointing_peft": (effective.get_peft_model or {}).get("use_gradient_checkpointing"),
                "sft": {k: effective.sft_config.get(k) for k in ("optim", "bf16", "fp16", "packing", "use_cpu")},
            }
    check_golden("effective_settings", table)


# (overrides, validation, {kwarg path: expected}) — one row per spec field.
FIELD_CASES: list[tuple[str, dict[str, Any], bool, dict[str, Any]]] = [
    (
        "model.max_seq_length",
        {"model": {"max_seq_length": 512}},
        False,
        {
            "from_pretrained.max_seq_length": 512,
            "sft_config.max_length": 512,
            "get_peft_model.max_seq_length": 512,
            "data.max_seq_length": 512,
        },
    ),
    ("model.load_in_4bit", {"model": {"load_in_4bit": False}}, False, {"from_pretrained.load_in_4bit": False}),
    (
        "model.load_in_8bit",
        {"model": {"load_in_4bit": False, "load_in_8bit": True}},
        False,
        {"from_pretrained.load_in_8bit": True, "from_pretrained.load_in_4bit": False},
    ),
    ("model.dtype auto", {}, False, {"from_pretrained.dtype": None}),
    ("model.dtype", {"model": {"dtype": "bfloat16"}}, False, {"from_pretrained.dtype": "bfloat16"}),
    (
        "model.trust_remote_code",
        {"model": {"trust_remote_code": True}},
        False,
        {"from_pretrained.trust_remote_code": True},
    ),
    ("dataset.text_field", {"dataset": {"text_field": "body"}}, False, {"data.text_field": "body"}),
    (
        "dataset.apply_chat_template",
        {"dataset": {"apply_chat_template": True}},
        False,
        {"data.apply_chat_template": True},
    ),
    (
        "dataset.validation_path",
        {"dataset": {"validation_path": "val"}},
        True,
        {"data.validation_data": "/kubetune/data/validation", "sft_config.eval_strategy": "epoch"},
    ),
    ("dataset.packing", {"dataset": {"packing": True}}, False, {"sft_config.packing": True}),
    (
        "training.finetuning_type",
        {"model": {"load_in_4bit": False}, "training": {"finetuning_type": "all_weights"}},
        False,
        {"from_pretrained.full_finetuning": True, "get_peft_model": None, "output_subdir": "model"},
    ),
    (
        "training.use_gradient_checkpointing",
        {"training": {"use_gradient_checkpointing": "false"}},
        False,
        {"from_pretrained.use_gradient_checkpointing": False, "get_peft_model.use_gradient_checkpointing": False},
    ),
    (
        "training.use_gradient_checkpointing true",
        {"training": {"use_gradient_checkpointing": "true"}},
        False,
        {"from_pretrained.use_gradient_checkpointing": True},
    ),
    ("training.lora.rank", {"training": {"lora": {"rank": 8}}}, False, {"get_peft_model.r": 8}),
    ("training.lora.alpha", {"training": {"lora": {"alpha": 64}}}, False, {"get_peft_model.lora_alpha": 64}),
    ("training.lora.dropout", {"training": {"lora": {"dropout": 0.1}}}, False, {"get_peft_model.lora_dropout": 0.1}),
    (
        "training.lora.target_modules",
        {"training": {"lora": {"target_modules": ["q_proj"]}}},
        False,
        {"get_peft_model.target_modules": ["q_proj"]},
    ),
    ("training.lora.bias", {"training": {"lora": {"bias": "all"}}}, False, {"get_peft_model.bias": "all"}),
    (
        "training.lora.use_rslora",
        {"training": {"lora": {"use_rslora": True}}},
        False,
        {"get_peft_model.use_rslora": True},
    ),
    (
        "training.lora.random_state",
        {"training": {"lora": {"random_state": 1}}},
        False,
        {"get_peft_model.random_state": 1},
    ),
    ("schedule.epochs", {"schedule": {"epochs": 3}}, False, {"sft_config.num_train_epochs": 3.0}),
    ("schedule.max_steps null", {}, False, {"sft_config.max_steps": -1}),
    ("schedule.max_steps", {"schedule": {"max_steps": 40}}, False, {"sft_config.max_steps": 40}),
    ("schedule.warmup_steps", {"schedule": {"warmup_steps": 5}}, False, {"sft_config.warmup_steps": 5}),
    ("schedule.warmup_ratio", {"schedule": {"warmup_ratio": 0.25}}, False, {"sft_config.warmup_steps": 0.25}),
    (
        "schedule.lr_scheduler_type",
        {"schedule": {"lr_scheduler_type": "cosine_with_restarts"}},
        False,
        {"sft_config.lr_scheduler_type": "cosine_with_restarts"},
    ),
    ("schedule.logging_steps", {"schedule": {"logging_steps": 7}}, False, {"sft_config.logging_steps": 7}),
    ("schedule.save_steps null", {}, False, {"sft_config.save_strategy": "epoch"}),
    (
        "schedule.save_steps",
        {"schedule": {"save_steps": 9}},
        False,
        {"sft_config.save_strategy": "steps", "sft_config.save_steps": 9},
    ),
    (
        "schedule.eval_steps",
        {"dataset": {"validation_path": "v"}, "schedule": {"eval_steps": 3}},
        True,
        {"sft_config.eval_strategy": "steps", "sft_config.eval_steps": 3},
    ),
    ("schedule.seed", {"schedule": {"seed": 5}}, False, {"sft_config.seed": 5}),
    (
        "batch.per_device_train_batch_size",
        {"batch": {"per_device_train_batch_size": 3}},
        False,
        {"sft_config.per_device_train_batch_size": 3, "sft_config.per_device_eval_batch_size": 3},
    ),
    (
        "batch.gradient_accumulation_steps",
        {"batch": {"gradient_accumulation_steps": 4}},
        False,
        {"sft_config.gradient_accumulation_steps": 4},
    ),
    ("optimizer.learning_rate", {"optimizer": {"learning_rate": 3e-5}}, False, {"sft_config.learning_rate": 3e-5}),
    ("optimizer.weight_decay", {"optimizer": {"weight_decay": 0.1}}, False, {"sft_config.weight_decay": 0.1}),
    ("optimizer.optim", {"optimizer": {"optim": "sgd"}}, False, {"sft_config.optim": "sgd"}),
    ("hardware.gpus", {"hardware": {"gpus": "0,3"}}, False, {"env.CUDA_VISIBLE_DEVICES": "0,3"}),
    (
        "hardware.precision",
        {"hardware": {"precision": "fp16"}},
        False,
        {"sft_config.fp16": True, "sft_config.bf16": False},
    ),
    (
        "output.save_method",
        {"output": {"save_method": "merged_16bit"}},
        False,
        {"save_method": "merged_16bit", "output_subdir": "model"},
    ),
    (
        "output.save_method merged_4bit",
        {"output": {"save_method": "merged_4bit"}},
        False,
        {"save_method": "merged_4bit", "output_subdir": "model"},
    ),
    (
        "integrations.mlflow",
        {"integrations": {"mlflow": {"tracking_uri": "file:///m"}}},
        False,
        {
            "sft_config.report_to": ["mlflow"],
            "env.MLFLOW_TRACKING_URI": "file:///m",
            "env.MLFLOW_EXPERIMENT_NAME": "unsloth-test",
        },
    ),
    (
        "integrations.wandb",
        {"integrations": {"wandb": {"project": "p", "entity": "e"}}},
        False,
        {"sft_config.report_to": ["wandb"], "env.WANDB_PROJECT": "p", "env.WANDB_ENTITY": "e"},
    ),
]

# Spec fields the trainer does not map, and why (checked so a new API field cannot be silently ignored).
NOT_MAPPED = {
    "model.name": "resolved by the operator into paths.model",
    "dataset.path": "resolved by the operator into paths.training_data",
    "training.training_type": "sft is the only value; anything else is refused",
    "output.name": "the operator's output Model entity",
    "output.description": "the operator's output Model entity",
    "suspend": "the operator's workload (Kueue)",
    "image": "the operator's pod template",
    "retries.disruptions": "the operator's retry budget (it stops the child); the trainer resumes either way",
    "retries.failures": "the operator's retry budget (it stops the child); the trainer resumes either way",
    "stall_timeout_seconds": "the operator's Stalled condition, from the progress the trainer reports",
    "restart_stalled": "the operator evicts a stalled trainer's pods; the trainer resumes as after any eviction",
    "resume_from": "resolved by the operator into paths.resume_from (a checkpoint mounted read only)",
    "integrations": "mapped per tracker (integrations.mlflow / integrations.wandb)",
}


def lookup(kwargs: UnslothKwargs, dotted: str) -> Any:
    node: Any = kwargs.as_dict()
    for part in dotted.split("."):
        node = node[part] if node is not None else None
    return node


@pytest.mark.parametrize(("field", "overrides", "validation", "expected"), FIELD_CASES, ids=[c[0] for c in FIELD_CASES])
def test_each_field_is_honoured(
    field: str, overrides: dict[str, Any], validation: bool, expected: dict[str, Any]
) -> None:
    kwargs = mapped(unsloth_spec(**overrides), validation=validation)
    for path, value in expected.items():
        assert lookup(kwargs, path) == value, f"{field}: {path}"


def _leaves(node: Any, prefix: str = "") -> set[str]:
    if isinstance(node, dict) and node and prefix not in ("integrations.mlflow", "integrations.wandb"):
        out: set[str] = set()
        for key, value in node.items():
            out |= _leaves(value, f"{prefix}.{key}" if prefix else key)
        return out
    return {prefix}


def test_every_spec_field_is_mapped_or_explained() -> None:
    covered = {case[0].split(" ")[0] for case in FIELD_CASES} | set(NOT_MAPPED)
    leaves = _leaves(ALL_FIELDS)
    missing = sorted(leaf for leaf in leaves if leaf not in covered)
    assert not missing, f"spec fields with no mapping test and no NOT_MAPPED reason: {missing}"


def test_gpu_runs_the_defaults_unchanged() -> None:
    effective, subs = effective_settings(mapped(DEFAULTS), CUDA_AMPERE)
    assert subs == []
    assert effective == mapped(DEFAULTS)


def test_cpu_substitutions_for_the_defaults() -> None:
    effective, subs = effective_settings(mapped(DEFAULTS), CPU_BF16)
    assert {s.field: (s.requested, s.effective) for s in subs} == {
        "training.use_gradient_checkpointing": ("unsloth", True),
        "optimizer.optim": ("adamw_8bit", "adamw_torch_fused"),
    }
    # 4-bit really runs on a CPU whose bitsandbytes passes Unsloth's probe; bf16 is native here.
    assert effective.from_pretrained["load_in_4bit"] is True
    assert effective.from_pretrained["dtype"] == "bfloat16"
    assert effective.sft_config["bf16"] is True


def test_cpu_substitutions_for_everything_gpu_only() -> None:
    _, subs = effective_settings(mapped(ALL_FIELDS, validation=True), CPU_PLAIN)
    assert {s.field: (s.requested, s.effective) for s in subs} == {
        "model.load_in_8bit": (True, False),
        "model.dtype": ("float16", "float32"),
        "hardware.precision": ("fp16", "fp32"),
        "optimizer.optim": ("paged_adamw_8bit", "adamw_torch_fused"),
        "dataset.packing": (True, False),
        "hardware.gpus": ("1,2", None),
    }
    assert all(s.reason for s in subs)


def test_t4_trains_bf16_jobs_in_fp16() -> None:
    effective, subs = effective_settings(mapped(DEFAULTS), CUDA_T4)
    assert [(s.field, s.requested, s.effective) for s in subs] == [("hardware.precision", "bf16", "fp16")]
    assert effective.sft_config["fp16"] and not effective.sft_config["bf16"]
    assert effective.from_pretrained["dtype"] == "float16"


def test_fp16_with_auto_dtype_on_ampere_loads_float16() -> None:
    effective, subs = effective_settings(mapped(unsloth_spec(hardware={"precision": "fp16"})), CUDA_AMPERE)
    assert [(s.field, s.effective) for s in subs] == [("model.dtype", "float16")]
    assert effective.from_pretrained["dtype"] == "float16"


def test_merged_4bit_is_refused_off_cuda() -> None:
    requested = mapped(unsloth_spec(output={"save_method": "merged_4bit"}))
    for cpu in (CPU_PLAIN, CPU_BF16):  # refused even where bitsandbytes 4-bit runs on the CPU
        with pytest.raises(UnslothConfigError, match="merged_4bit cannot be written on cpu"):
            effective_settings(requested, cpu)
    effective_settings(requested, CUDA_AMPERE)  # honoured on a GPU


@pytest.mark.parametrize(
    ("overrides", "validation", "message"),
    [
        (
            {"model": {"load_in_4bit": False}, "output": {"save_method": "merged_4bit"}},
            False,
            r"spec\.output\.save_method: merged_4bit needs model\.load_in_4bit: true",
        ),
        ({"schedule": {"eval_steps": 5}}, False, r"spec\.schedule\.eval_steps: .*needs dataset\.validation_path"),
        ({"model": {"dtype": "float16"}}, False, r"spec\.model\.dtype: model\.dtype and hardware\.precision disagree"),
        ({"model": {"dtype": "bfloat16"}, "hardware": {"precision": "fp16"}}, False, "disagree"),
        ({"model": {"load_in_8bit": True}}, False, r"spec\.model\.load_in_8bit: .*mutually exclusive"),
        (
            {
                "model": {"load_in_4bit": False},
                "training": {"finetuning_type": "all_weights", "lora": None},
                "output": {"save_method": "merged_16bit"},
            },
            False,
            r"spec\.output\.save_method: merged_16bit and merged_4bit are only valid when .*lora",
        ),
        ({"hardware": {"gpus": "0,a"}}, False, r"spec\.hardware\.gpus: String should match pattern"),
        ({"training": {"lora": {"rank": "8"}}}, False, r"spec\.training\.lora\.rank: Input should be a valid integer"),
        ({"training": {"lora_rank": 8}}, False, r"spec\.training\.lora_rank: Extra inputs are not permitted"),
    ],
)
def test_a_hand_edited_config_that_breaks_a_rule_is_refused_when_parsed(
    overrides: dict[str, Any], validation: bool, message: str
) -> None:
    # The API refuses these (CEL and pydantic); a config that skipped it meets the same models in
    # the trainer, which parses the file before anything loads: each rule is written once.
    spec = unsloth_spec()
    for section, values in overrides.items():
        spec[section].update(values)
    with pytest.raises(ConfigError, match=message):
        mapped(spec, validation=validation, hand_edited=True)


def test_a_config_whose_paths_disagree_with_its_spec_is_refused() -> None:
    spec = unsloth_spec(dataset={"validation_path": "val"})
    with pytest.raises(ConfigError, match=r"paths\.validation_data is required"):
        mapped(spec, validation=False, hand_edited=True)


def test_a_pod_s_cuda_visible_devices_wins_over_host_indices(
    monkeypatch: pytest.MonkeyPatch, restore_environ: None
) -> None:
    """The operator's pod has one GPU, numbered 0, and CUDA_VISIBLE_DEVICES=0 whatever hardware.gpus
    lists; without the operator (`kubetune run`) the spec's host indices select the devices."""
    from kubetune_trainer.unsloth.train import prepare_environment

    requested = mapped(unsloth_spec(hardware={"gpus": "2,3"}))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    prepare_environment(requested)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    prepare_environment(requested)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
