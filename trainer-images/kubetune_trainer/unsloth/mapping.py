"""UnslothJob spec -> the keyword arguments of Unsloth's and trl's API, as pure functions.

Two steps, both pure and golden-tested:

1. `map_spec` turns the parsed config (`kubetune_api`'s UnslothJobSpec, defaults
   filled and rules checked, see docs/CONTRACT.md) into what the job *asks for*: the kwargs of
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
from typing import Any, Literal

from kubetune_api.common import Integrations
from kubetune_trainer.common.config import ConfigError, UnslothTrainerConfig

DeviceKind = Literal["cuda", "cpu"]

# model.dtype -> what FastLanguageModel.from_pretrained takes (None: Unsloth picks).
DTYPES: dict[str, str | None] = {"auto": None, "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}

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


def gradient_checkpointing_value(value: Literal["unsloth", "true", "false"]) -> bool | str:
    """training.use_gradient_checkpointing (a string in the schema) -> what Unsloth takes."""
    return "unsloth" if value == "unsloth" else value == "true"


def integration_env(integrations: Integrations | None, job_name: str) -> tuple[list[str], dict[str, str]]:
    """report_to for trl and the environment its callbacks read.

    Tokens are not in the config (they are secret references); the operator
    injects them as MLFLOW_TRACKING_TOKEN / WANDB_API_KEY from the named secrets.
    """
    report_to: list[str] = []
    env: dict[str, str] = {}
    if integrations is None:
        return report_to, env
    if integrations.mlflow is not None:
        report_to.append("mlflow")
        env["MLFLOW_TRACKING_URI"] = integrations.mlflow.tracking_uri
        # The API documents "default: the job's name".
        env["MLFLOW_EXPERIMENT_NAME"] = integrations.mlflow.experiment_name or job_name
    if integrations.wandb is not None:
        report_to.append("wandb")
        env["WANDB_PROJECT"] = integrations.wandb.project
        if integrations.wandb.entity:
            env["WANDB_ENTITY"] = integrations.wandb.entity
    return report_to, env


def map_spec(config: UnslothTrainerConfig) -> UnslothKwargs:
    """The parsed trainer config (CONTRACT section 1) -> the kwargs a GPU run uses.

    The spec's rules (quantized loading exclusive, all_weights unquantized, merged_* only
    from LoRA, merged_4bit from a 4-bit base, dtype vs precision, warmup exclusive,
    eval_steps with validation data) were checked when the config was parsed.
    """
    spec = config.spec
    paths = config.paths
    model, training, schedule, batch = spec.model, spec.training, spec.schedule, spec.batch
    finetuning = training.finetuning_type
    gradient_checkpointing = gradient_checkpointing_value(training.use_gradient_checkpointing)
    save_method = spec.output.save_method

    from_pretrained: dict[str, Any] = {
        "model_name": str(paths.model),
        "max_seq_length": model.max_seq_length,
        "dtype": DTYPES[model.dtype],
        "load_in_4bit": model.load_in_4bit,
        "load_in_8bit": model.load_in_8bit,
        "full_finetuning": finetuning == "all_weights",
        "trust_remote_code": model.trust_remote_code,
        "use_gradient_checkpointing": gradient_checkpointing,
    }

    peft: dict[str, Any] | None = None
    if training.lora is not None:  # the model fills it for lora, and only then
        lora = training.lora
        peft = {
            "r": lora.rank,
            "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout,
            "target_modules": list(lora.target_modules),
            "bias": lora.bias,
            "use_rslora": lora.use_rslora,
            "random_state": lora.random_state,
            "use_gradient_checkpointing": gradient_checkpointing,
            "max_seq_length": model.max_seq_length,
        }

    has_validation = paths.validation_data is not None
    report_to, env = integration_env(spec.integrations, config.metadata.name)
    if spec.hardware.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = spec.hardware.gpus
    precision = spec.hardware.precision

    sft: dict[str, Any] = {
        "output_dir": str(paths.checkpoints),
        "num_train_epochs": float(schedule.epochs),
        "max_steps": schedule.max_steps if schedule.max_steps is not None else -1,
        "lr_scheduler_type": schedule.lr_scheduler_type,
        "logging_strategy": "steps",
        "logging_steps": schedule.logging_steps,
        "save_strategy": "steps" if schedule.save_steps is not None else DEFAULT_SAVE_STRATEGY,
        "save_total_limit": SAVE_TOTAL_LIMIT,
        "eval_strategy": ("steps" if schedule.eval_steps is not None else "epoch") if has_validation else "no",
        "seed": schedule.seed,
        "per_device_train_batch_size": batch.per_device_train_batch_size,
        "per_device_eval_batch_size": batch.per_device_train_batch_size,
        "gradient_accumulation_steps": batch.gradient_accumulation_steps,
        "learning_rate": spec.optimizer.learning_rate,
        "weight_decay": spec.optimizer.weight_decay,
        "optim": spec.optimizer.optim,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "max_length": model.max_seq_length,
        "packing": spec.dataset.packing,
        "report_to": report_to or "none",
        "run_name": config.metadata.name,
        # Gradient checkpointing is Unsloth's (get_peft_model / from_pretrained), not the Trainer's.
        "gradient_checkpointing": False,
        "disable_tqdm": True,
    }
    # transformers 5 dropped warmup_ratio: a float in [0, 1) in warmup_steps is the ratio.
    sft["warmup_steps"] = schedule.warmup_ratio if schedule.warmup_ratio is not None else schedule.warmup_steps
    if schedule.save_steps is not None:
        sft["save_steps"] = schedule.save_steps
    if schedule.eval_steps is not None:
        sft["eval_steps"] = schedule.eval_steps

    return UnslothKwargs(
        from_pretrained=from_pretrained,
        get_peft_model=peft,
        sft_config=sft,
        data={
            "training_data": str(paths.training_data),
            "validation_data": str(paths.validation_data) if paths.validation_data is not None else None,
            "text_field": spec.dataset.text_field,
            "apply_chat_template": spec.dataset.apply_chat_template,
            "max_seq_length": model.max_seq_length,
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
