"""What differs between the job kinds, as data: one `Backend` descriptor per trainer
(the image, the trainer's module and package, which spec fields are references, how
many pods and GPUs, a batch Job or a PyTorchJob, the output format). The operator's
builders and reference resolution, `kubetune run`, the CLI and the chart's generated
files look a job's descriptor up instead of testing its kind, so an unknown kind is an
error rather than one of the two, and a third backend is a descriptor here, its models
(kubetune_api), its `Resource` (resources.py) and its trainer package."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from kubetune_api import constants as c
from kubetune_api.automodel import AutomodelJobSpec
from kubetune_api.unsloth import UnslothJobSpec

# Every job spec model, for the type checker; the descriptors decide everything else.
JobSpec = AutomodelJobSpec | UnslothJobSpec
OutputFormat = Literal["full", "adapter"]
# The row of the seed's GPU memory guidelines a job is checked against (kubetune.memory);
# None where the guideline does not apply.
MemoryMethod = Literal["lora", "full"] | None
SpecT = TypeVar("SpecT", bound=BaseModel)


@dataclass(frozen=True)
class Reference:
    """One reference field of a job."""

    field: str  # full path, e.g. spec.training.teacher_model
    kind: str  # Model or Fileset
    value: str
    role: str  # model, teacher_model, training_data, validation_data


@dataclass(frozen=True)
class Backend(Generic[SpecT]):
    """One trainer backend. `name` is in the names of a job's children
    (`<job>-<name>`, the trainer ServiceAccount `<job>-<name>-trainer`), the operator's
    image flag (`--<name>-image`) and the chart's values (`trainer.<name>.image`)."""

    name: str
    spec_model: type[SpecT]
    # Run as `python -m MODULE --config FILE` (torchrun -m for several processes), in the
    # pod and by `kubetune run`.
    trainer_module: str
    # The image the operator uses when neither its flag nor the job's spec.image names one.
    default_image: str
    # True: several GPUs or nodes run as a PyTorchJob under torchrun; False: always one pod, a batch Job.
    distributed: bool
    references: Callable[[SpecT], list[Reference]]
    nodes: Callable[[SpecT], int]
    gpus_per_pod: Callable[[SpecT], int]
    # Environment the trainer's pod needs beyond the common one (docs/CONTRACT.md).
    pod_env: Callable[[SpecT], list[dict[str, Any]]]
    output_format: Callable[[SpecT], OutputFormat]
    # What an adapter output names as its baseModel: the job's base model reference.
    base_model: Callable[[SpecT], str]
    memory_method: Callable[[SpecT], MemoryMethod]
    # What to change when a trainer pod is OOMKilled: the fields that lower its memory.
    out_of_memory_hint: str
    # How the trainer names a checkpoint's directory under output/checkpoints: prefix and
    # zero-padded step (spec.resume_from mounts one by name).
    checkpoint_prefix: str
    checkpoint_width: int
    # `kubetune run`: the modules the interpreter must import, the variable that names one
    # that can, the repository's environment that has them and the requirements to install.
    local_imports: tuple[str, ...]
    local_python_env: str
    local_venv: str
    requirements: str

    def checkpoint_dir(self, step: int) -> str:
        return f"{self.checkpoint_prefix}{step:0{self.checkpoint_width}d}"

    def checkpoint_step(self, directory: str) -> int | None:
        """The step of a checkpoint directory's name, None for any other name."""
        digits = directory.removeprefix(self.checkpoint_prefix)
        return int(digits) if directory.startswith(self.checkpoint_prefix) and digits.isdigit() else None

    def total_gpus(self, spec: SpecT) -> int:
        return self.nodes(spec) * self.gpus_per_pod(spec)

    def uses_pytorchjob(self, spec: SpecT) -> bool:
        return self.distributed and (self.nodes(spec) > 1 or self.gpus_per_pod(spec) > 1)


class UnknownBackend(LookupError):
    """A kind or spec model without a descriptor: never guessed to be one of the others."""


# --- Automodel: SFT and distillation, LoRA or full weights, one GPU to many nodes -------------


def _automodel_references(spec: AutomodelJobSpec) -> list[Reference]:
    refs = [
        Reference("spec.model", c.KIND_MODEL, spec.model, "model"),
        Reference("spec.dataset.training", c.KIND_FILESET, spec.dataset.training, "training_data"),
    ]
    if spec.dataset.validation:
        refs.append(Reference("spec.dataset.validation", c.KIND_FILESET, spec.dataset.validation, "validation_data"))
    if spec.training.teacher_model:
        refs.append(
            Reference("spec.training.teacher_model", c.KIND_MODEL, spec.training.teacher_model, "teacher_model")
        )
    return refs


def _automodel_output_format(spec: AutomodelJobSpec) -> OutputFormat:
    return "adapter" if spec.training.finetuning_type == "lora" else "full"


def _automodel_memory_method(spec: AutomodelJobSpec) -> MemoryMethod:
    return "full" if spec.training.finetuning_type == "all_weights" else "lora"


AUTOMODEL_BACKEND: Backend[AutomodelJobSpec] = Backend(
    name="automodel",
    spec_model=AutomodelJobSpec,
    trainer_module="kubetune_trainer.automodel",
    default_image="ghcr.io/kubetune/trainer-automodel:0.1.0",
    distributed=True,
    references=_automodel_references,
    nodes=lambda spec: spec.parallelism.num_nodes,
    gpus_per_pod=lambda spec: spec.parallelism.num_gpus_per_node,
    pod_env=lambda spec: [],
    output_format=_automodel_output_format,
    base_model=lambda spec: spec.model,
    memory_method=_automodel_memory_method,
    out_of_memory_hint="to use less memory, lower batch.micro_batch_size or training.max_seq_length, use "
    "finetuning_type lora, or spread the model over more GPUs (parallelism)",
    checkpoint_prefix="step-",  # kubetune_trainer/automodel/checkpoint.py
    checkpoint_width=7,
    local_imports=("torch", "transformers", "peft", "pydantic"),
    local_python_env="KUBETUNE_TRAINER_PYTHON",
    local_venv="test",
    requirements="trainer-images/automodel/requirements.txt",
)


# --- Unsloth: SFT on one pod ---------------------------------------------------------------------


def _unsloth_references(spec: UnslothJobSpec) -> list[Reference]:
    refs = [
        Reference("spec.model.name", c.KIND_MODEL, spec.model.name, "model"),
        Reference("spec.dataset.path", c.KIND_FILESET, spec.dataset.path, "training_data"),
    ]
    if spec.dataset.validation_path:
        refs.append(
            Reference("spec.dataset.validation_path", c.KIND_FILESET, spec.dataset.validation_path, "validation_data")
        )
    return refs


# Unsloth trains on one GPU, and hardware.gpus selects devices (the seed: "selection, not
# reservation"): requesting one GPU per listed index would hold GPUs the trainer never uses.
UNSLOTH_GPUS_PER_POD = 1


def _unsloth_pod_env(spec: UnslothJobSpec) -> list[dict[str, Any]]:
    # The device plugin numbers the pod's GPU 0, and the trainer keeps a CUDA_VISIBLE_DEVICES
    # it finds set: without this the spec's host indices ("2,3") would point at no device.
    return [{"name": "CUDA_VISIBLE_DEVICES", "value": "0"}]


def _unsloth_output_format(spec: UnslothJobSpec) -> OutputFormat:
    if spec.training.finetuning_type == "lora" and spec.output.save_method == "lora":
        return "adapter"
    return "full"


def _unsloth_memory_method(spec: UnslothJobSpec) -> MemoryMethod:
    # The seed's guideline is for 16-bit weights: 4-bit or 8-bit loading needs far less,
    # by an amount the table does not give, so a quantized job is not checked.
    if spec.model.load_in_4bit or spec.model.load_in_8bit:
        return None
    return "full" if spec.training.finetuning_type == "all_weights" else "lora"


UNSLOTH_BACKEND: Backend[UnslothJobSpec] = Backend(
    name="unsloth",
    spec_model=UnslothJobSpec,
    trainer_module="kubetune_trainer.unsloth",
    default_image="ghcr.io/kubetune/trainer-unsloth:0.1.0",
    distributed=False,
    references=_unsloth_references,
    nodes=lambda spec: 1,
    gpus_per_pod=lambda spec: UNSLOTH_GPUS_PER_POD,
    pod_env=_unsloth_pod_env,
    output_format=_unsloth_output_format,
    base_model=lambda spec: spec.model.name,
    memory_method=_unsloth_memory_method,
    out_of_memory_hint="to use less memory, lower batch.per_device_train_batch_size or model.max_seq_length, "
    "load in 4-bit (model.load_in_4bit), or use finetuning_type lora",
    checkpoint_prefix="checkpoint-",  # the transformers Trainer's name
    checkpoint_width=0,
    local_imports=("unsloth", "trl", "pydantic"),
    local_python_env="KUBETUNE_UNSLOTH_PYTHON",
    local_venv="unsloth",
    requirements="trainer-images/unsloth/requirements.txt",
)
