"""UnslothJob spec -> the keyword arguments of Unsloth's and trl's API, as pure functions.

Two steps, both pure and golden-tested:

1. `map_spec` turns the validated spec (snake_case, defaults filled, see
   docs/CONTRACT.md) into what the job *asks for*: the kwargs of
   `FastLanguageModel.from_pretrained`, `FastLanguageModel.get_peft_model` and
   `trl.SFTConfig`, plus the save method. This is what runs on a CUDA GPU.
2. `effective_settings` takes that request and what the device can do and
   returns what will *really* run, with one `Substitution` per difference.
   Unsloth's CPU backend (unsloth_zoo.cpu) silently swaps several settings
   (8-bit optimizers, packing, 8-bit loading, fp16, ...); we compute the same
   swaps up front, pass the already-substituted values to Unsloth (so that it
   has nothing left to change), log each one as a warning and write them to
   metrics.jsonl and result.json. Nothing differs from the job without a line
   saying so.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Literal

from kubetune_trainer.common.config import ConfigError

DeviceKind = Literal["cuda", "cpu"]

# Unsloth's own default projection set; the seed's default for training.lora.target_modules.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

SAVE_METHODS = ("lora", "merged_16bit", "merged_4bit")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts")
DTYPES = {"auto": None, "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}

# A job that names no save cadence still gets a checkpoint per epoch: that is what a
# restarted pod resumes from (CONTRACT: checkpoints/), and it costs one save per pass.
DEFAULT_SAVE_STRATEGY = "epoch"
# Checkpoints hold optimizer state (2x the trainable weights, all weights for
# all_weights); two are enough to survive a crash during a save.
SAVE_TOTAL_LIMIT = 2


class UnslothConfigError(ConfigError):
    """The config cannot be run as written; the message names the field and the fix.

    A ConfigError, so the entrypoint reports it as a one-line reason without a traceback.
    """


@dataclasses.dataclass(frozen=True)
class DeviceCapabilities:
    """What the training device can do; filled by `kubetune_trainer.unsloth.device.probe_device`."""

    kind: DeviceKind
    name: str
    bf16: bool  # native bfloat16 compute
    fp16: bool  # float16 mixed precision worth using (always on CUDA; AMX-FP16 on CPU)
    bnb_4bit: bool  # bitsandbytes NF4 really runs forward+backward here
    bnb_8bit: bool  # bitsandbytes LLM.int8 loading and 8-bit/paged optimizers run here


@dataclasses.dataclass(frozen=True)
class Substitution:
    """One setting that runs differently from what the job asked."""

    field: str  # the spec field, e.g. "optimizer.optim"
    requested: Any
    effective: Any
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def message(self) -> str:
        return f"{self.field}: requested {self.requested!r}, running with {self.effective!r} ({self.reason})"


@dataclasses.dataclass(frozen=True)
class UnslothKwargs:
    """Everything the run passes to Unsloth and trl, JSON-serialisable (dtype as a string)."""

    from_pretrained: dict[str, Any]
    get_peft_model: dict[str, Any] | None  # None for all_weights
    sft_config: dict[str, Any]
    data: dict[str, Any]  # kubetune_trainer.data.FormatOptions for the training/validation rows
    save_method: str
    output_subdir: Literal["adapter", "model"]
    env: dict[str, str]  # environment the run needs (integrations); tokens come from secrets

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _section(spec: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = spec.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UnslothConfigError(f"spec.{name} must be an object, got {type(value).__name__}")
    return value


def _require(section: Mapping[str, Any], path: str, key: str) -> Any:
    if key not in section:
        raise UnslothConfigError(
            f"spec.{path}.{key} is missing; the config must be rendered with every default filled "
            "(kubetune.render.render_trainer_config)"
        )
    return section[key]


def _choice(value: Any, allowed: tuple[str, ...], field: str) -> str:
    if value not in allowed:
        raise UnslothConfigError(f"spec.{field} is {value!r}; allowed: {', '.join(allowed)}")
    return str(value)


def gradient_checkpointing_value(value: Any) -> bool | str:
    """training.use_gradient_checkpointing: "unsloth" | true | false (YAML may deliver strings)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("unsloth", "true", "false"):
        lowered = value.lower()
        return "unsloth" if lowered == "unsloth" else lowered == "true"
    raise UnslothConfigError(f"spec.training.use_gradient_checkpointing is {value!r}; allowed: unsloth, true, false")


def integration_env(spec: Mapping[str, Any], job_name: str) -> tuple[list[str], dict[str, str]]:
    """report_to for trl and the environment its callbacks read.

    Tokens are not in the config (they are secret references); the operator
    injects them as MLFLOW_TRACKING_TOKEN / WANDB_API_KEY from the named secrets.
    """
    integrations = spec.get("integrations") or {}
    report_to: list[str] = []
    env: dict[str, str] = {}
    mlflow = integrations.get("mlflow")
    if mlflow:
        report_to.append("mlflow")
        env["MLFLOW_TRACKING_URI"] = str(_require(mlflow, "integrations.mlflow", "tracking_uri"))
        # The API documents "default: the job's name".
        env["MLFLOW_EXPERIMENT_NAME"] = str(mlflow.get("experiment_name") or job_name)
    wandb = integrations.get("wandb")
    if wandb:
        report_to.append("wandb")
        env["WANDB_PROJECT"] = str(_require(wandb, "integrations.wandb", "project"))
        if wandb.get("entity"):
            env["WANDB_ENTITY"] = str(wandb["entity"])
    return report_to, env


def cuda_visible_devices(value: Any) -> str | None:
    """hardware.gpus ("0" or "0,1", or a list/int) -> CUDA_VISIBLE_DEVICES; None leaves it alone."""
    if value is None:
        return None
    items = [str(v).strip() for v in value] if isinstance(value, list) else str(value).split(",")
    items = [item.strip() for item in items if item.strip()]
    if not items or not all(item.isdigit() for item in items):
        raise UnslothConfigError(
            f"spec.hardware.gpus is {value!r}; give comma-separated GPU indices such as '0' or '0,1'"
        )
    return ",".join(items)


def map_spec(config: Mapping[str, Any]) -> UnslothKwargs:
    """The trainer config document (CONTRACT section 1) -> the kwargs a GPU run uses."""
    spec = config.get("spec")
    paths = config.get("paths")
    if not isinstance(spec, Mapping) or not isinstance(paths, Mapping):
        raise UnslothConfigError("the config must have 'spec' and 'paths' objects (docs/CONTRACT.md)")
    model = _section(spec, "model")
    dataset = _section(spec, "dataset")
    training = _section(spec, "training")
    schedule = _section(spec, "schedule")
    batch = _section(spec, "batch")
    optimizer = _section(spec, "optimizer")
    hardware = _section(spec, "hardware")
    output = _section(spec, "output")

    training_type = training.get("training_type", "sft")
    if training_type != "sft":
        raise UnslothConfigError(f"spec.training.training_type is {training_type!r}; UnslothJob runs sft only")
    finetuning = _choice(
        _require(training, "training", "finetuning_type"), ("lora", "all_weights"), "training.finetuning_type"
    )
    load_in_4bit = bool(_require(model, "model", "load_in_4bit"))
    load_in_8bit = bool(_require(model, "model", "load_in_8bit"))
    if load_in_4bit and load_in_8bit:
        raise UnslothConfigError("spec.model.load_in_4bit and spec.model.load_in_8bit are both true; pick one")
    if finetuning == "all_weights" and (load_in_4bit or load_in_8bit):
        raise UnslothConfigError(
            "spec.training.finetuning_type all_weights cannot train quantized weights; "
            "set spec.model.load_in_4bit and spec.model.load_in_8bit to false"
        )
    dtype_name = _choice(_require(model, "model", "dtype"), tuple(DTYPES), "model.dtype")
    gradient_checkpointing = gradient_checkpointing_value(_require(training, "training", "use_gradient_checkpointing"))
    save_method = _choice(_require(output, "output", "save_method"), SAVE_METHODS, "output.save_method")
    if save_method != "lora" and finetuning != "lora":
        raise UnslothConfigError(
            f"spec.output.save_method {save_method} merges a LoRA adapter; with finetuning_type "
            "all_weights use save_method lora (the full model is written to output/model)"
        )
    if save_method == "merged_4bit" and not load_in_4bit:
        # Unsloth merges into the weights as loaded: from a 16-bit base "merged_4bit" would
        # silently write 16-bit weights.
        raise UnslothConfigError(
            "spec.output.save_method merged_4bit needs spec.model.load_in_4bit: true (Unsloth merges "
            "the adapter into the loaded 4-bit weights); use merged_16bit for a 16-bit base"
        )

    from_pretrained: dict[str, Any] = {
        "model_name": str(_require(paths, "paths", "model")),
        "max_seq_length": int(_require(model, "model", "max_seq_length")),
        "dtype": DTYPES[dtype_name],
        "load_in_4bit": load_in_4bit,
        "load_in_8bit": load_in_8bit,
        "full_finetuning": finetuning == "all_weights",
        "trust_remote_code": bool(_require(model, "model", "trust_remote_code")),
        "use_gradient_checkpointing": gradient_checkpointing,
    }

    peft: dict[str, Any] | None = None
    if finetuning == "lora":
        lora = training.get("lora")
        if not isinstance(lora, Mapping):
            raise UnslothConfigError("spec.training.lora must be an object when finetuning_type is lora")
        targets = lora.get("target_modules", list(DEFAULT_TARGET_MODULES))
        peft = {
            "r": int(_require(lora, "training.lora", "rank")),
            "lora_alpha": _require(lora, "training.lora", "alpha"),
            "lora_dropout": float(_require(lora, "training.lora", "dropout")),
            "target_modules": list(targets) if targets is not None else list(DEFAULT_TARGET_MODULES),
            "bias": _choice(
                _require(lora, "training.lora", "bias"), ("none", "all", "lora_only"), "training.lora.bias"
            ),
            "use_rslora": bool(_require(lora, "training.lora", "use_rslora")),
            "random_state": int(_require(lora, "training.lora", "random_state")),
            "use_gradient_checkpointing": gradient_checkpointing,
            "max_seq_length": from_pretrained["max_seq_length"],
        }

    warmup_ratio = schedule.get("warmup_ratio")
    warmup_steps = int(schedule.get("warmup_steps") or 0)
    if warmup_ratio is not None and not 0.0 <= float(warmup_ratio) < 1.0:
        raise UnslothConfigError(f"spec.schedule.warmup_ratio is {warmup_ratio!r}; it must be in [0, 1)")
    if warmup_ratio is not None and warmup_steps:
        raise UnslothConfigError("spec.schedule.warmup_steps and spec.schedule.warmup_ratio are exclusive; set one")
    max_steps = schedule.get("max_steps")
    save_steps = schedule.get("save_steps")
    eval_steps = schedule.get("eval_steps")
    has_validation = paths.get("validation_data") is not None
    if eval_steps is not None and not has_validation:
        raise UnslothConfigError(
            "spec.schedule.eval_steps is set but there is no validation data "
            "(spec.dataset.validation_path is null); set validation_path or drop eval_steps"
        )
    precision = _choice(_require(hardware, "hardware", "precision"), ("bf16", "fp16"), "hardware.precision")
    if (dtype_name, precision) in (("float16", "bf16"), ("bfloat16", "fp16")):
        # Unsloth raises a TypeError for this pair at trainer construction, after loading.
        raise UnslothConfigError(
            f"spec.model.dtype {dtype_name} contradicts spec.hardware.precision {precision}; "
            "use dtype float16 with fp16, bfloat16 with bf16, or dtype auto"
        )
    metadata = config.get("metadata") or {}
    job_name = str(metadata.get("name") or "kubetune-unsloth")
    report_to, env = integration_env(spec, job_name)
    gpus = cuda_visible_devices(hardware.get("gpus"))
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus

    sft: dict[str, Any] = {
        "output_dir": os.path.join(str(_require(paths, "paths", "output")), "checkpoints"),
        "num_train_epochs": float(_require(schedule, "schedule", "epochs")),
        "max_steps": int(max_steps) if max_steps is not None else -1,
        "lr_scheduler_type": _choice(
            _require(schedule, "schedule", "lr_scheduler_type"), SCHEDULERS, "schedule.lr_scheduler_type"
        ),
        "logging_strategy": "steps",
        "logging_steps": int(_require(schedule, "schedule", "logging_steps")),
        "save_strategy": "steps" if save_steps is not None else DEFAULT_SAVE_STRATEGY,
        "save_total_limit": SAVE_TOTAL_LIMIT,
        "eval_strategy": ("steps" if eval_steps is not None else "epoch") if has_validation else "no",
        "seed": int(_require(schedule, "schedule", "seed")),
        "per_device_train_batch_size": int(_require(batch, "batch", "per_device_train_batch_size")),
        "per_device_eval_batch_size": int(batch["per_device_train_batch_size"]),
        "gradient_accumulation_steps": int(_require(batch, "batch", "gradient_accumulation_steps")),
        "learning_rate": float(_require(optimizer, "optimizer", "learning_rate")),
        "weight_decay": float(_require(optimizer, "optimizer", "weight_decay")),
        "optim": _choice(_require(optimizer, "optimizer", "optim"), OPTIMIZERS, "optimizer.optim"),
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "max_length": from_pretrained["max_seq_length"],
        "packing": bool(_require(dataset, "dataset", "packing")),
        "report_to": report_to or "none",
        "run_name": job_name,
        # Gradient checkpointing is Unsloth's (get_peft_model / from_pretrained), not the Trainer's.
        "gradient_checkpointing": False,
        "disable_tqdm": True,
    }
    # transformers 5 dropped warmup_ratio: a float in [0, 1) in warmup_steps is the ratio.
    sft["warmup_steps"] = float(warmup_ratio) if warmup_ratio is not None else warmup_steps
    if save_steps is not None:
        sft["save_steps"] = int(save_steps)
    if eval_steps is not None:
        sft["eval_steps"] = int(eval_steps)

    return UnslothKwargs(
        from_pretrained=from_pretrained,
        get_peft_model=peft,
        sft_config=sft,
        data={
            "training_data": str(paths["training_data"]),
            "validation_data": str(paths["validation_data"]) if has_validation else None,
            "text_field": str(_require(dataset, "dataset", "text_field")),
            "apply_chat_template": bool(_require(dataset, "dataset", "apply_chat_template")),
            "max_seq_length": from_pretrained["max_seq_length"],
        },
        save_method=save_method,
        output_subdir="adapter" if finetuning == "lora" and save_method == "lora" else "model",
        env=env,
    )


def _cpu_dtype(requested: str | None, device: DeviceCapabilities) -> str:
    """What unsloth_zoo.cpu.loader._resolve_dtype picks: bf16 when native, never fp16."""
    if requested in (None, "float16"):
        return "bfloat16" if device.bf16 else "float32"
    return requested


def effective_settings(
    requested: UnslothKwargs, device: DeviceCapabilities
) -> tuple[UnslothKwargs, list[Substitution]]:
    """What really runs on `device`, and every way it differs from `requested`.

    The rules mirror unsloth_zoo 2026.10.9 (cpu/loader.py, cpu/trainer.py) and
    Unsloth's GPU precision checks; the run re-checks them against the objects
    Unsloth actually built (see train.verify_effective).
    """
    fp = copy.deepcopy(requested.from_pretrained)
    peft = copy.deepcopy(requested.get_peft_model)
    sft = copy.deepcopy(requested.sft_config)
    subs: list[Substitution] = []
    cpu = device.kind == "cpu"
    where = f"{device.kind} ({device.name})"

    if requested.save_method == "merged_4bit" and device.kind != "cuda":
        # Even where bitsandbytes 4-bit runs on the CPU, unsloth_zoo's CPU save refuses merged_4bit.
        raise UnslothConfigError(
            f"spec.output.save_method merged_4bit cannot be written on {where}: Unsloth writes it only "
            "on a CUDA GPU (its CPU backend saves lora and merged_16bit); use merged_16bit or lora"
        )

    # Loading.
    if fp["load_in_8bit"] and not device.bnb_8bit:
        subs.append(
            Substitution(
                "model.load_in_8bit", True, False, f"bitsandbytes 8-bit loading does not run on {where}; 16-bit weights"
            )
        )
        fp["load_in_8bit"] = False
    if fp["load_in_4bit"] and not device.bnb_4bit:
        subs.append(
            Substitution(
                "model.load_in_4bit", True, False, f"bitsandbytes 4-bit does not run on {where}; 16-bit weights"
            )
        )
        fp["load_in_4bit"] = False
    if cpu:
        requested_dtype = fp["dtype"]
        resolved = _cpu_dtype(requested_dtype, device)
        if requested_dtype == "float16":
            subs.append(
                Substitution(
                    "model.dtype", "float16", resolved, "float16 matmuls are emulated on CPU and need loss scaling"
                )
            )
        # Pass the resolved dtype so that Unsloth's CPU loader has nothing left to decide.
        fp["dtype"] = resolved
    elif fp["dtype"] is None and sft["fp16"] and device.bf16:
        # Unsloth resolves dtype=None to bfloat16 on this GPU and then refuses fp16 training of
        # a bfloat16 model; "auto" with precision fp16 therefore means float16 weights.
        subs.append(
            Substitution(
                "model.dtype",
                "auto",
                "float16",
                "hardware.precision fp16 needs float16 weights (Unsloth refuses fp16 training of a bfloat16 model)",
            )
        )
        fp["dtype"] = "float16"

    # Gradient checkpointing: "unsloth" offloads activations to host RAM; on CPU they are there already.
    if cpu and fp["use_gradient_checkpointing"] == "unsloth":
        subs.append(
            Substitution(
                "training.use_gradient_checkpointing",
                "unsloth",
                True,
                "on CPU Unsloth's offloaded checkpointing is plain recomputation",
            )
        )
        fp["use_gradient_checkpointing"] = True
        if peft is not None:
            peft["use_gradient_checkpointing"] = True

    # Precision (Trainer autocast).
    if cpu:
        if sft["fp16"]:
            if device.bf16:
                new = "bf16"
            elif device.fp16:
                new = "fp16"
            else:
                new = "fp32"
            if new != "fp16":
                subs.append(
                    Substitution(
                        "hardware.precision",
                        "fp16",
                        new,
                        "float16 autocast is emulated on this CPU"
                        if new == "fp32"
                        else "bfloat16 is native on this CPU and needs no loss scaling",
                    )
                )
                sft["fp16"], sft["bf16"] = False, new == "bf16"
        elif sft["bf16"] and not device.bf16:
            subs.append(
                Substitution(
                    "hardware.precision",
                    "bf16",
                    "fp32",
                    "this CPU has no native bfloat16 (AMX / AVX512-BF16 / Arm BF16)",
                )
            )
            sft["bf16"] = False
    elif sft["bf16"] and not device.bf16:
        subs.append(
            Substitution(
                "hardware.precision",
                "bf16",
                "fp16",
                f"{device.name} has no bfloat16 (pre-Ampere); float16 with loss scaling",
            )
        )
        sft["bf16"], sft["fp16"] = False, True
        if fp["dtype"] in (None, "bfloat16"):
            fp["dtype"] = "float16"

    # Optimizer: bitsandbytes 8-bit / paged states have no CPU kernels.
    optim = sft["optim"]
    if cpu:
        if optim in ("adamw_8bit", "paged_adamw_8bit"):
            subs.append(
                Substitution(
                    "optimizer.optim", optim, "adamw_torch_fused", "bitsandbytes 8-bit / paged optimizers need a GPU"
                )
            )
            sft["optim"] = "adamw_torch_fused"
        elif optim == "adamw_torch":
            subs.append(
                Substitution(
                    "optimizer.optim",
                    optim,
                    "adamw_torch_fused",
                    "Unsloth's CPU backend always uses torch's fused AdamW (same update rule)",
                )
            )
            sft["optim"] = "adamw_torch_fused"
    elif optim in ("adamw_8bit", "paged_adamw_8bit") and not device.bnb_8bit:
        subs.append(
            Substitution(
                "optimizer.optim", optim, "adamw_torch_fused", f"bitsandbytes 8-bit optimizers do not run on {where}"
            )
        )
        sft["optim"] = "adamw_torch_fused"

    # Packing needs FlashAttention / varlen attention to keep packed rows apart.
    if cpu and sft["packing"]:
        subs.append(
            Substitution(
                "dataset.packing", True, False, "packed rows would attend to each other under CPU SDPA; padded batches"
            )
        )
        sft["packing"] = False

    if cpu and "CUDA_VISIBLE_DEVICES" in requested.env:
        subs.append(
            Substitution(
                "hardware.gpus", requested.env["CUDA_VISIBLE_DEVICES"], None, "no GPU on this node; training on CPU"
            )
        )

    if cpu:
        # Not a spec field but part of the run; recorded so the numbers are comparable.
        sft["use_cpu"] = True
        sft["dataloader_pin_memory"] = False

    return (
        dataclasses.replace(requested, from_pretrained=fp, get_peft_model=peft, sft_config=sft),
        subs,
    )
