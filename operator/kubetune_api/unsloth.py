"""UnslothJob spec: the Unsloth backend table of the seed, field for field."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from kubetune_api.common import (
    CrossFieldRule,
    Integrations,
    Reference,
    ResumeFrom,
    Retries,
    RuleCheckedSpec,
    StrictModel,
    image_field,
    integrations_field,
    output_description_field,
    output_name_field,
    restart_stalled_field,
    resume_from_field,
    retries_field,
    stall_timeout_field,
    suspend_field,
)
from kubetune_api.constants import UNSLOTH_DEFAULT_TARGET_MODULES

GPU_LIST_PATTERN = r"^[0-9]+(,[0-9]+)*$"


class UnslothModel(StrictModel):
    """Base model and how to load it."""

    name: Reference = Field(description="Base Model entity reference (name or workspace/name).")
    max_seq_length: int = Field(
        default=2048,
        ge=2,
        description="Maximum sequence length in tokens, at least 2 (a token and the next one it predicts).",
    )
    load_in_4bit: bool = Field(
        default=True, description="Load the base model in 4-bit (bitsandbytes). Mutually exclusive with load_in_8bit."
    )
    load_in_8bit: bool = Field(default=False, description="Load the base model in 8-bit.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Compute dtype: auto, bfloat16, float16 or float32."
    )
    trust_remote_code: bool = Field(default=False, description="Allow custom model code from the checkpoint.")


class UnslothDataset(StrictModel):
    """Training and validation data."""

    path: Reference = Field(description="Training Fileset reference (name or workspace/name).")
    text_field: str = Field(
        default="text",
        min_length=1,
        max_length=256,
        description="Row field consumed by the trainer: a row that has it is trained on as plain text, whatever "
        "else it holds (unless apply_chat_template picks its conversation). Rows without it are read as messages "
        "or prompt/completion. The log names the shapes each file was read as.",
    )
    apply_chat_template: bool = Field(
        default=False,
        description="Apply the tokenizer's chat template to rows containing a messages field (or prompt and "
        "completion as lists of messages), even when they also have text_field.",
    )
    validation_path: Reference | None = Field(default=None, description="Optional validation Fileset reference.")
    packing: bool = Field(default=False, description="Pack multiple samples into one sequence to reduce padding.")


class UnslothLora(StrictModel):
    """LoRA configuration (filled with defaults when finetuning_type is lora)."""

    rank: int = Field(default=16, gt=0, description="LoRA rank.")
    alpha: int = Field(default=16, gt=0, description="LoRA scaling factor.")
    dropout: float = Field(default=0.0, ge=0.0, le=1.0, description="LoRA dropout probability.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=lambda: list(UNSLOTH_DEFAULT_TARGET_MODULES),
        min_length=1,
        description="Modules to adapt; default: Unsloth's 7-module set "
        "(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        default="none", description="Bias training mode: none, all, lora_only."
    )
    use_rslora: bool = Field(default=False, description="Use rank-stabilized LoRA.")
    random_state: int = Field(default=3407, ge=0, description="LoRA initialization seed.")


class UnslothTraining(StrictModel):
    """Training method."""

    training_type: Literal["sft"] = Field(default="sft", description="Training method: sft.")
    finetuning_type: Literal["lora", "all_weights"] = Field(
        default="lora", description="Adapter regime: lora trains an adapter; all_weights performs full-weight training."
    )
    lora: UnslothLora | None = Field(default=None, description="LoRA configuration; filled with defaults when lora.")
    use_gradient_checkpointing: Literal["unsloth", "true", "false"] = Field(
        default="unsloth",
        description='Gradient checkpointing: "unsloth" (Unsloth\'s optimized implementation), "true" or "false". '
        "A string, quoted in YAML: a Kubernetes schema field cannot be both a boolean and a string.",
    )

    @field_validator("use_gradient_checkpointing", mode="before")
    @classmethod
    def _explain_boolean(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError(
                f'write it as a quoted string: use_gradient_checkpointing: "{str(value).lower()}" '
                "(Kubernetes schemas cannot type a field as both boolean and string)"
            )
        return value

    @model_validator(mode="after")
    def _fill_lora(self) -> UnslothTraining:
        if self.finetuning_type == "lora" and self.lora is None:
            self.lora = UnslothLora()
        return self


class UnslothSchedule(StrictModel):
    """How long to train, warmup, logging, checkpoint and evaluation cadence."""

    epochs: int = Field(default=1, gt=0, description="Number of passes over the training data.")
    max_steps: int | None = Field(
        default=None, gt=0, description="Optional cap on training steps (overrides epochs when set)."
    )
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup steps. Mutually exclusive with warmup_ratio.")
    warmup_ratio: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        description="Warmup as a fraction of total steps. Mutually exclusive with warmup_steps.",
    )
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts"] = Field(
        default="linear", description="linear, cosine, constant, constant_with_warmup or cosine_with_restarts."
    )
    logging_steps: int = Field(default=1, gt=0, description="Logging cadence (steps).")
    save_steps: int | None = Field(
        default=None,
        gt=0,
        description="Checkpoint cadence (steps); null: one checkpoint per epoch (what a restarted pod resumes from).",
    )
    eval_steps: int | None = Field(default=None, gt=0, description="Evaluation cadence (steps); null: once per epoch.")
    seed: int = Field(default=3407, ge=0, description="Random seed.")


class UnslothBatch(StrictModel):
    """Batch sizes."""

    per_device_train_batch_size: int = Field(default=1, gt=0, description="Per-step batch size on the GPU.")
    gradient_accumulation_steps: int = Field(default=1, gt=0, description="Steps to accumulate before a weight update.")


class UnslothOptimizer(StrictModel):
    """Optimizer settings."""

    learning_rate: float = Field(default=2e-4, gt=0.0, description="Step size for weight updates.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="L2 regularization strength.")
    optim: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd"] = Field(
        default="adamw_8bit",
        description="Optimizer: adamw_torch, adamw_torch_fused, adamw_8bit, paged_adamw_8bit or sgd. "
        "8-bit optimizers reduce optimizer-state memory.",
    )


class UnslothHardware(StrictModel):
    """GPU selection and precision."""

    gpus: str | None = Field(
        default=None,
        pattern=GPU_LIST_PATTERN,
        max_length=64,
        description='Comma-separated, distinct GPU indices ("0" or "0,1") for CUDA_VISIBLE_DEVICES: a selection, '
        "not a reservation. In the cluster the pod requests one GPU whatever the list holds (Unsloth trains on one) "
        "and sees it as device 0, so the indices do not apply there; under `kubetune run` they select the host's "
        "devices, and Unsloth trains on the first of them.",
    )
    precision: Literal["bf16", "fp16"] = Field(default="bf16", description="Mixed-precision dtype: bf16 or fp16.")


class UnslothOutput(StrictModel):
    """How the result is saved and the Model entity it becomes."""

    save_method: Literal["lora", "merged_16bit", "merged_4bit"] = Field(
        default="lora",
        description="lora: the adapter; merged_16bit: adapter merged into the base, 16-bit checkpoint; "
        "merged_4bit: merged, 4-bit checkpoint. merged_* only with finetuning_type lora.",
    )
    name: str | None = output_name_field()
    description: str | None = output_description_field()


UNSLOTH_RULES: tuple[CrossFieldRule, ...] = (
    CrossFieldRule(
        name="quantized-loading-exclusive",
        scope=("model",),
        cel="!(self.load_in_4bit && self.load_in_8bit)",
        check=lambda m: not (m["load_in_4bit"] and m["load_in_8bit"]),
        message="load_in_4bit and load_in_8bit are mutually exclusive: set one of them to false "
        "(load_in_4bit defaults to true)",
        field=".load_in_8bit",
    ),
    CrossFieldRule(
        name="all-weights-unquantized",
        scope=(),
        cel="self.training.finetuning_type != 'all_weights' || (!self.model.load_in_4bit && !self.model.load_in_8bit)",
        check=lambda s: (
            s["training"]["finetuning_type"] != "all_weights"
            or not (s["model"]["load_in_4bit"] or s["model"]["load_in_8bit"])
        ),
        message="finetuning_type all_weights cannot be combined with quantized loading: set model.load_in_4bit "
        "and model.load_in_8bit to false (load_in_4bit defaults to true)",
        field=".model.load_in_4bit",
    ),
    CrossFieldRule(
        name="merged-save-needs-lora",
        scope=(),
        cel="!self.output.save_method.startsWith('merged_') || self.training.finetuning_type == 'lora'",
        check=lambda s: (
            not s["output"]["save_method"].startswith("merged_") or s["training"]["finetuning_type"] == "lora"
        ),
        message="merged_16bit and merged_4bit are only valid when training.finetuning_type is lora",
        field=".output.save_method",
    ),
    CrossFieldRule(
        name="merged-4bit-needs-4bit-base",
        scope=(),
        cel="self.output.save_method != 'merged_4bit' || self.model.load_in_4bit",
        check=lambda s: s["output"]["save_method"] != "merged_4bit" or s["model"]["load_in_4bit"],
        message="merged_4bit needs model.load_in_4bit: true (Unsloth writes 4-bit weights only from a 4-bit "
        "base; otherwise it would silently save 16-bit ones)",
        field=".output.save_method",
    ),
    CrossFieldRule(
        name="dtype-matches-precision",
        scope=(),
        cel="!(self.model.dtype == 'float16' && self.hardware.precision == 'bf16') && "
        "!(self.model.dtype == 'bfloat16' && self.hardware.precision == 'fp16')",
        check=lambda s: (
            not (s["model"]["dtype"] == "float16" and s["hardware"]["precision"] == "bf16")
            and not (s["model"]["dtype"] == "bfloat16" and s["hardware"]["precision"] == "fp16")
        ),
        message="model.dtype and hardware.precision disagree (float16 goes with fp16, bfloat16 with bf16); "
        "set one to match the other, or model.dtype: auto",
        field=".model.dtype",
    ),
    CrossFieldRule(
        name="eval-steps-need-validation",
        scope=(),
        cel="!has(self.schedule.eval_steps) || has(self.dataset.validation_path)",
        check=lambda s: "eval_steps" not in s["schedule"] or "validation_path" in s["dataset"],
        message="schedule.eval_steps needs dataset.validation_path (the data to evaluate on)",
        field=".schedule.eval_steps",
    ),
    CrossFieldRule(
        name="warmup-exclusive",
        scope=("schedule",),
        cel="!has(self.warmup_ratio) || self.warmup_steps == 0",
        check=lambda s: "warmup_ratio" not in s or s["warmup_steps"] == 0,
        message="warmup_steps and warmup_ratio are mutually exclusive: remove one of them",
        field=".warmup_ratio",
    ),
    CrossFieldRule(
        name="lora-only-for-lora",
        scope=("training",),
        cel="self.finetuning_type != 'all_weights' || !has(self.lora)",
        check=lambda t: t["finetuning_type"] != "all_weights" or "lora" not in t,
        message="is only used with finetuning_type lora: remove it, or change finetuning_type",
        field=".lora",
    ),
    CrossFieldRule(
        name="gpu-indices-distinct",
        scope=("hardware",),
        cel="!has(self.gpus) || "
        "self.gpus.split(',').all(g, self.gpus.split(',').filter(h, int(h) == int(g)).size() == 1)",
        check=lambda h: "gpus" not in h or len({int(g) for g in h["gpus"].split(",")}) == len(h["gpus"].split(",")),
        message='must list distinct GPU indices, e.g. "0,1"',
        field=".gpus",
    ),
)


class UnslothJobSpec(RuleCheckedSpec):
    """An Unsloth fine-tuning job: single-GPU LoRA or full weights, with 4-bit / 8-bit loading."""

    RULES: ClassVar[tuple[CrossFieldRule, ...]] = UNSLOTH_RULES

    model: UnslothModel = Field(description="Base model and how to load it.")
    dataset: UnslothDataset = Field(description="Training and validation data.")
    training: UnslothTraining = Field(default_factory=UnslothTraining, description="Training method.")
    schedule: UnslothSchedule = Field(
        default_factory=UnslothSchedule, description="Epochs, steps, warmup, cadences, seed."
    )
    batch: UnslothBatch = Field(default_factory=UnslothBatch, description="Batch sizes.")
    optimizer: UnslothOptimizer = Field(default_factory=UnslothOptimizer, description="Optimizer settings.")
    hardware: UnslothHardware = Field(default_factory=UnslothHardware, description="GPU selection and precision.")
    output: UnslothOutput = Field(default_factory=UnslothOutput, description="Save method and output Model entity.")
    integrations: Integrations | None = integrations_field()
    suspend: bool = suspend_field()
    image: str | None = image_field("Unsloth")
    retries: Retries = retries_field()
    stall_timeout_seconds: int | None = stall_timeout_field()
    restart_stalled: bool = restart_stalled_field()
    resume_from: ResumeFrom | None = resume_from_field()
