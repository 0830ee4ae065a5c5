"""The kubetune kinds: their spec models, plurals, short names and printer columns.
Everything that is generated (CRDs, JSON schemas, RBAC rules) reads this table."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from kubetune_api import constants as c
from kubetune_api.automodel import AutomodelJobSpec
from kubetune_api.entities import EntityStatus, FilesetSpec, ModelSpec
from kubetune_api.status import JobStatus
from kubetune_api.unsloth import UnslothJobSpec


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: str = "string"
    description: str = ""
    priority: int = 0


@dataclass(frozen=True)
class Resource:
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    spec_model: type[BaseModel]
    status_model: type[BaseModel]
    description: str
    columns: tuple[PrinterColumn, ...]
    is_job: bool


_AGE = PrinterColumn("Age", ".metadata.creationTimestamp", "date")
_JOB_STATUS_COLUMNS = (
    PrinterColumn("Phase", ".status.phase", description="Pending, Running, Restarting, Suspended, Succeeded, Failed"),
)

AUTOMODEL = Resource(
    kind=c.KIND_AUTOMODEL,
    plural="automodeljobs",
    singular="automodeljob",
    short_names=("amj",),
    spec_model=AutomodelJobSpec,
    status_model=JobStatus,
    description="An Automodel fine-tuning job (SFT or distillation; LoRA, merged LoRA or full weights).",
    columns=(
        *_JOB_STATUS_COLUMNS,
        PrinterColumn("Model", ".spec.model"),
        PrinterColumn("Method", ".spec.training.finetuning_type"),
        PrinterColumn("GPUs", ".status.gpus", "integer"),
        PrinterColumn("Progress", ".status.progress.summary"),
        PrinterColumn("Loss", ".status.progress.trainLoss", "number", priority=1),
        PrinterColumn("Child", ".status.child.name", priority=1),
        _AGE,
    ),
    is_job=True,
)

UNSLOTH = Resource(
    kind=c.KIND_UNSLOTH,
    plural="unslothjobs",
    singular="unslothjob",
    short_names=("usj",),
    spec_model=UnslothJobSpec,
    status_model=JobStatus,
    description="An Unsloth fine-tuning job (single-GPU LoRA or full weights, 4-bit / 8-bit loading).",
    columns=(
        *_JOB_STATUS_COLUMNS,
        PrinterColumn("Model", ".spec.model.name"),
        PrinterColumn("Method", ".spec.training.finetuning_type"),
        PrinterColumn("GPUs", ".status.gpus", "integer"),
        PrinterColumn("Progress", ".status.progress.summary"),
        PrinterColumn("Loss", ".status.progress.trainLoss", "number", priority=1),
        PrinterColumn("Child", ".status.child.name", priority=1),
        _AGE,
    ),
    is_job=True,
)

MODEL = Resource(
    kind=c.KIND_MODEL,
    plural="models",
    singular="model",
    short_names=("ktm",),
    spec_model=ModelSpec,
    status_model=EntityStatus,
    description="A model entity: full weights, or a LoRA adapter of a base model.",
    columns=(
        PrinterColumn("Format", ".spec.format"),
        PrinterColumn("Base", ".spec.baseModel"),
        PrinterColumn("Ready", ".status.ready", "boolean"),
        _AGE,
    ),
    is_job=False,
)

FILESET = Resource(
    kind=c.KIND_FILESET,
    plural="filesets",
    singular="fileset",
    short_names=("ktfs",),
    spec_model=FilesetSpec,
    status_model=EntityStatus,
    description="A fileset entity: training or validation data.",
    columns=(
        PrinterColumn("Claim", ".spec.storage.pvc.claimName"),
        PrinterColumn("Ready", ".status.ready", "boolean"),
        _AGE,
    ),
    is_job=False,
)

RESOURCES: tuple[Resource, ...] = (AUTOMODEL, UNSLOTH, MODEL, FILESET)
BY_KIND: dict[str, Resource] = {r.kind: r for r in RESOURCES}
JOB_RESOURCES: tuple[Resource, ...] = tuple(r for r in RESOURCES if r.is_job)
