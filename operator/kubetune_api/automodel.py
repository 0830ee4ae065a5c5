"""AutomodelJob spec: the Automodel backend table of the seed, field for field."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

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

PositiveInt = Annotated[int, Field(gt=0)]


class AutomodelDataset(StrictModel):
    """Training and validation data."""

    training: Reference = Field(description="Training Fileset reference (name or workspace/name).")
    validation: Reference | None = Field(
        default=None,
        description="Optional validation Fileset reference; without it a seeded 5% of the training rows is held out.",
    )
    prompt_template: str | None = Field(
        max_length=16384,
        default=None,
        min_length=1,
        description="Optional prompt template for custom dataset schemas: `{column}` placeholders are filled "
        "from each row; the row's `completion` (or `output`) column is the target.",
    )


class AutomodelLora(StrictModel):
    """LoRA configuration (filled with defaults when finetuning_type is a LoRA variant)."""

    rank: int = Field(
        default=16, gt=0, description="LoRA rank (low-rank dimension). Higher = more capacity and memory."
    )
    alpha: int = Field(default=32, gt=0, description="LoRA scaling factor.")
    merge: bool = Field(
        default=False,
        description="Merge the adapter into the base model at the end of training. `true` means the same as "
        "finetuning_type lora_merged; kubetune normalises both to finetuning_type: lora_merged with merge: true.",
    )
    target_modules: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None, min_length=1, description="Module name patterns to adapt; null applies LoRA to all linear layers."
    )


class AutomodelTraining(StrictModel):
    """Training method."""

    training_type: Literal["sft", "distillation"] = Field(
        default="sft", description="Training method: sft or distillation."
    )
    finetuning_type: Literal["lora", "lora_merged", "all_weights"] = Field(
        default="lora",
        description="Adapter regime: lora trains an adapter; lora_merged merges it into the base weights; "
        "all_weights performs full-weight training.",
    )
    lora: AutomodelLora | None = Field(
        default=None, description="LoRA configuration; filled with defaults when finetuning_type is a LoRA variant."
    )
    max_seq_length: int = Field(
        default=2048,
        ge=2,
        description="Maximum sequence length in tokens, at least 2 (a token and the next one it predicts); "
        "longer samples are truncated.",
    )
    teacher_model: Reference | None = Field(
        default=None,
        description="Teacher Model entity reference. Required for distillation. Must share the student's tokenizer "
        "and vocabulary.",
    )
    teacher_precision: Literal["bf16", "fp16", "fp32"] = Field(
        default="bf16", description="Precision for loading the frozen teacher: bf16, fp16 or fp32."
    )
    distillation_ratio: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Balance of the losses: 0.0 = cross-entropy only, 1.0 = KD only."
    )
    distillation_temperature: float = Field(
        default=1.0, gt=0.0, description="Softmax temperature for KD. Higher = softer distributions."
    )
    offload_teacher: bool = Field(default=False, description="Offload the teacher model to save GPU memory.")

    @model_validator(mode="after")
    def _normalise_lora(self) -> AutomodelTraining:
        # One canonical form: a merged adapter is finetuning_type lora_merged AND lora.merge true,
        # so readers may look at either.
        if self.finetuning_type != "all_weights":
            if self.lora is None:
                self.lora = AutomodelLora()
            if self.lora.merge:
                self.finetuning_type = "lora_merged"
            if self.finetuning_type == "lora_merged":
                self.lora.merge = True
        return self


class AutomodelSchedule(StrictModel):
    """How long to train and how often to validate."""

    epochs: int = Field(default=1, gt=0, description="Number of passes over the training data.")
    max_steps: int | None = Field(
        default=None,
        gt=0,
        description="Optional cap on optimizer steps; training stops there even if epochs is not reached.",
    )
    val_check_interval: float | None = Field(
        default=None,
        gt=0.0,
        description="Validation cadence. Below 1: a fraction of an epoch, validated at each of its multiples "
        "within every epoch (0.5 = twice per epoch: mid-epoch and at its end; on the first step at or past each "
        "point when the epoch length is odd). A whole number from 2 up: every that many optimizer steps. Null or 1: "
        "once per epoch. Every epoch end validates and saves a checkpoint, whatever the value. The number decides, "
        "not its type: the API server stores 1.0 as 1, so 1 and 1.0 both mean one epoch, never every step (for "
        "every step, give a fraction no larger than 1 / steps per epoch).",
    )
    seed: int | None = Field(default=None, ge=0, description="Random seed; null picks one and logs it.")


class AutomodelBatch(StrictModel):
    """Batch sizes."""

    global_batch_size: int = Field(default=8, gt=0, description="Effective batch size across all data-parallel ranks.")
    micro_batch_size: int = Field(default=1, gt=0, description="Per-step batch size on each device.")
    sequence_packing: bool = Field(
        default=False, description="Pack multiple samples into one sequence to reduce padding."
    )


class AutomodelOptimizer(StrictModel):
    """AdamW with linear warmup, then linear decay."""

    learning_rate: float = Field(default=5e-6, gt=0.0, description="Step size for weight updates.")
    weight_decay: float = Field(default=0.01, ge=0.0, description="L2 regularization strength.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup steps before the main schedule.")


class AutomodelParallelism(StrictModel):
    """How training is spread across GPUs and nodes."""

    num_nodes: int = Field(default=1, gt=0, description="Number of training nodes.")
    num_gpus_per_node: int = Field(default=1, gt=0, description="GPUs per node.")
    tensor_parallel_size: int = Field(default=1, gt=0, description="GPUs for tensor parallelism (splits layers).")
    pipeline_parallel_size: int = Field(
        default=1, gt=0, description="GPUs for pipeline parallelism (splits model stages)."
    )
    context_parallel_size: int = Field(
        default=1,
        gt=0,
        description="GPUs for context parallelism (for very long sequences): each row's tokens are split over "
        "this many GPUs, which run ring attention over SDPA. When > 1, tensor and pipeline parallel must be 1, "
        "sequence_packing false and training_type sft.",
    )
    expert_parallel_size: int | None = Field(
        default=None,
        gt=0,
        description="Expert parallelism for MoE models; must divide the number of experts. "
        "When > 1 it must equal the data-parallel size (num_nodes × num_gpus_per_node), with tensor, "
        "pipeline and context parallel 1: the experts are split over all data-parallel ranks.",
    )

    @property
    def total_gpus(self) -> int:
        return self.num_nodes * self.num_gpus_per_node

    @property
    def data_parallel_size(self) -> int:
        return self.total_gpus // (self.tensor_parallel_size * self.pipeline_parallel_size * self.context_parallel_size)


class AutomodelOutput(StrictModel):
    """The Model entity the job produces."""

    name: str | None = output_name_field()
    description: str | None = output_description_field()


def _total(p: Any) -> int:
    return int(p["num_nodes"] * p["num_gpus_per_node"])


def _model_parallel(p: Any) -> int:
    return int(p["tensor_parallel_size"] * p["pipeline_parallel_size"] * p["context_parallel_size"])


_CEL_TOTAL = "(self.parallelism.num_nodes * self.parallelism.num_gpus_per_node)"
_CEL_MP = (
    "(self.parallelism.tensor_parallel_size * self.parallelism.pipeline_parallel_size"
    " * self.parallelism.context_parallel_size)"
)

AUTOMODEL_RULES: tuple[CrossFieldRule, ...] = (
    CrossFieldRule(
        name="gpus-divisible-by-model-parallel",
        scope=("parallelism",),
        cel="(self.num_nodes * self.num_gpus_per_node) % "
        "(self.tensor_parallel_size * self.pipeline_parallel_size * self.context_parallel_size) == 0",
        check=lambda p: _total(p) % _model_parallel(p) == 0,
        message="total GPUs (num_nodes × num_gpus_per_node) must be divisible by "
        "tensor_parallel_size × pipeline_parallel_size × context_parallel_size",
        field=".num_gpus_per_node",
    ),
    CrossFieldRule(
        name="global-batch-divisible",
        scope=(),
        cel=f"{_CEL_TOTAL} % {_CEL_MP} != 0 || self.batch.global_batch_size % "
        f"(self.batch.micro_batch_size * ({_CEL_TOTAL} / {_CEL_MP})) == 0",
        check=lambda s: (
            _total(s["parallelism"]) % _model_parallel(s["parallelism"]) != 0
            or s["batch"]["global_batch_size"]
            % (s["batch"]["micro_batch_size"] * (_total(s["parallelism"]) // _model_parallel(s["parallelism"])))
            == 0
        ),
        message="must be divisible by batch.micro_batch_size × the data-parallel size "
        "(total GPUs / (tensor × pipeline × context parallel size))",
        field=".batch.global_batch_size",
    ),
    CrossFieldRule(
        name="expert-parallel-needs-tp-1",
        scope=("parallelism",),
        cel="!has(self.expert_parallel_size) || self.expert_parallel_size <= 1 || self.tensor_parallel_size == 1",
        check=lambda p: p.get("expert_parallel_size", 1) <= 1 or p["tensor_parallel_size"] == 1,
        message="must be 1 when expert_parallel_size > 1 (MoE models)",
        field=".tensor_parallel_size",
    ),
    CrossFieldRule(
        # The Automodel trainer splits the experts over all data-parallel ranks (and runs EP with
        # data parallel only): refused here rather than in the pod, with GPUs held.
        name="expert-parallel-spans-data-parallel",
        scope=("parallelism",),
        # tensor_parallel_size > 1 is expert-parallel-needs-tp-1's to report.
        cel="!has(self.expert_parallel_size) || self.expert_parallel_size <= 1 || self.tensor_parallel_size != 1 || "
        "(self.pipeline_parallel_size == 1 && self.context_parallel_size == 1 && "
        "self.expert_parallel_size == self.num_nodes * self.num_gpus_per_node)",
        check=lambda p: (
            p.get("expert_parallel_size", 1) <= 1
            or p["tensor_parallel_size"] != 1
            or (
                p["pipeline_parallel_size"] == 1
                and p["context_parallel_size"] == 1
                and p["expert_parallel_size"] == _total(p)
            )
        ),
        message="must equal the data-parallel size (num_nodes × num_gpus_per_node) when > 1, with "
        "pipeline_parallel_size and context_parallel_size 1: the experts are split over all data-parallel ranks",
        field=".expert_parallel_size",
    ),
    # Context parallel (PyTorch's ring attention over SDPA) is composed with FSDP2 data parallel
    # only, and needs plain causal attention over whole rows: what it cannot run is refused here,
    # not in a pod with GPUs held (the trainer's check_context_parallel says the same).
    CrossFieldRule(
        name="context-parallel-with-data-parallel-only",
        scope=("parallelism",),
        cel="self.context_parallel_size <= 1 || (self.tensor_parallel_size == 1 && self.pipeline_parallel_size == 1)",
        check=lambda p: (
            p["context_parallel_size"] <= 1 or (p["tensor_parallel_size"] == 1 and p["pipeline_parallel_size"] == 1)
        ),
        message="must be 1 unless tensor_parallel_size and pipeline_parallel_size are 1: the Automodel trainer "
        "composes context parallel with data parallel (FSDP2) only",
        field=".context_parallel_size",
    ),
    CrossFieldRule(
        name="context-parallel-without-packing",
        scope=(),
        cel="self.parallelism.context_parallel_size <= 1 || !self.batch.sequence_packing",
        check=lambda s: s["parallelism"]["context_parallel_size"] <= 1 or not s["batch"]["sequence_packing"],
        message="must be false when parallelism.context_parallel_size > 1: ring attention runs one causal "
        "attention over the whole row, and packed samples would attend to each other",
        field=".batch.sequence_packing",
    ),
    CrossFieldRule(
        name="context-parallel-sft-only",
        scope=(),
        cel="self.parallelism.context_parallel_size <= 1 || self.training.training_type == 'sft'",
        check=lambda s: s["parallelism"]["context_parallel_size"] <= 1 or s["training"]["training_type"] == "sft",
        message="must be sft when parallelism.context_parallel_size > 1: the Automodel trainer does not run "
        "the distillation teacher under context parallel; set context_parallel_size to 1",
        field=".training.training_type",
    ),
    CrossFieldRule(
        name="distillation-needs-teacher",
        scope=("training",),
        cel="self.training_type != 'distillation' || has(self.teacher_model)",
        check=lambda t: t["training_type"] != "distillation" or "teacher_model" in t,
        message="is required when training_type is distillation",
        field=".teacher_model",
    ),
    CrossFieldRule(
        name="teacher-only-for-distillation",
        scope=("training",),
        cel="self.training_type == 'distillation' || !has(self.teacher_model)",
        check=lambda t: t["training_type"] == "distillation" or "teacher_model" not in t,
        message="is only used when training_type is distillation: remove it or set training_type: distillation",
        field=".teacher_model",
    ),
    CrossFieldRule(
        name="lora-only-for-lora-methods",
        scope=("training",),
        cel="self.finetuning_type != 'all_weights' || !has(self.lora)",
        check=lambda t: t["finetuning_type"] != "all_weights" or "lora" not in t,
        message="is only used with finetuning_type lora or lora_merged: remove it, or change finetuning_type",
        field=".lora",
    ),
    CrossFieldRule(
        name="val-check-interval-whole-steps",
        scope=("schedule",),
        cel="!has(self.val_check_interval) || self.val_check_interval < 1.0 || "
        "self.val_check_interval == double(int(self.val_check_interval))",
        check=lambda s: (
            "val_check_interval" not in s
            or s["val_check_interval"] < 1.0
            or float(s["val_check_interval"]).is_integer()
        ),
        message="must be a fraction of an epoch below 1 (e.g. 0.5), 1 (once per epoch) or a whole number of "
        "steps from 2 (e.g. 100)",
        field=".val_check_interval",
    ),
)


class AutomodelJobSpec(RuleCheckedSpec):
    """An Automodel fine-tuning job: SFT or distillation; LoRA, merged LoRA or full weights; 1 GPU to many nodes."""

    RULES: ClassVar[tuple[CrossFieldRule, ...]] = AUTOMODEL_RULES

    model: Reference = Field(description="Base Model entity reference (name or workspace/name) to fine-tune.")
    dataset: AutomodelDataset = Field(description="Training and validation data.")
    training: AutomodelTraining = Field(default_factory=AutomodelTraining, description="Training method.")
    schedule: AutomodelSchedule = Field(
        default_factory=AutomodelSchedule, description="Epochs, steps, validation cadence, seed."
    )
    batch: AutomodelBatch = Field(default_factory=AutomodelBatch, description="Batch sizes and packing.")
    optimizer: AutomodelOptimizer = Field(default_factory=AutomodelOptimizer, description="Optimizer settings.")
    parallelism: AutomodelParallelism = Field(
        default_factory=AutomodelParallelism, description="Nodes, GPUs and tensor/pipeline/context/expert parallelism."
    )
    output: AutomodelOutput = Field(default_factory=AutomodelOutput, description="The output Model entity.")
    integrations: Integrations | None = integrations_field()
    suspend: bool = suspend_field()
    image: str | None = image_field("Automodel")
    retries: Retries = retries_field()
    stall_timeout_seconds: int | None = stall_timeout_field()
    restart_stalled: bool = restart_stalled_field()
    resume_from: ResumeFrom | None = resume_from_field()
