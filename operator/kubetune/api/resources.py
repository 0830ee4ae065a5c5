"""The kubetune kinds: their spec models, plurals, short names, printer columns and, for
a job kind, its backend descriptor (api/backends.py). Everything that is generated (CRDs,
JSON schemas, RBAC rules, the chart's list of job kinds) reads this table, and the
operator, `kubetune run` and the CLI find a job's backend through it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from kubetune.api.backends import AUTOMODEL_BACKEND, UNSLOTH_BACKEND, Backend, UnknownBackend
from kubetune_api import constants as c
from kubetune_api.entities import EntityStatus, FilesetSpec, ModelSpec
from kubetune_api.status import JobStatus


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
    backend: Backend[Any] | None = None  # a job kind's trainer; None for an entity

    @property
    def is_job(self) -> bool:
        return self.backend is not None


_AGE = PrinterColumn("Age", ".metadata.creationTimestamp", "date")
_JOB_STATUS_COLUMNS = (
    PrinterColumn("Phase", ".status.phase", description="Pending, Running, Restarting, Suspended, Succeeded, Failed"),
)

AUTOMODEL = Resource(
    kind=c.KIND_AUTOMODEL,
    plural="automodeljobs",
    singular="automodeljob",
    short_names=("amj",),
    spec_model=AUTOMODEL_BACKEND.spec_model,
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
    backend=AUTOMODEL_BACKEND,
)

UNSLOTH = Resource(
    kind=c.KIND_UNSLOTH,
    plural="unslothjobs",
    singular="unslothjob",
    short_names=("usj",),
    spec_model=UNSLOTH_BACKEND.spec_model,
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
    backend=UNSLOTH_BACKEND,
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
        # An entity with spec.source: what its initializer reported last (files, bytes, rate).
        PrinterColumn("Download", ".status.download.summary"),
        _AGE,
    ),
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
        # An entity with spec.source: what its initializer reported last (files, bytes, rate).
        PrinterColumn("Download", ".status.download.summary"),
        _AGE,
    ),
)

RESOURCES: tuple[Resource, ...] = (AUTOMODEL, UNSLOTH, MODEL, FILESET)
BY_KIND: dict[str, Resource] = {r.kind: r for r in RESOURCES}
JOB_RESOURCES: tuple[Resource, ...] = tuple(r for r in RESOURCES if r.is_job)
BACKENDS: tuple[Backend[Any], ...] = tuple(r.backend for r in JOB_RESOURCES if r.backend is not None)
_BACKEND_BY_SPEC: dict[type[BaseModel], Backend[Any]] = {b.spec_model: b for b in BACKENDS}


def job_backend(resource: Resource) -> Backend[Any]:
    """The backend of a job kind; an entity kind (or a kind outside the table) has none."""
    if resource.backend is None:
        raise UnknownBackend(
            f"{resource.kind} is not a job kind: it has no backend (operator/kubetune/api/backends.py)"
        )
    return resource.backend


def spec_backend(spec: BaseModel) -> Backend[Any]:
    """The backend whose spec model `spec` is (exactly: a subclass is another model)."""
    backend = _BACKEND_BY_SPEC.get(type(spec))
    if backend is None:
        raise UnknownBackend(
            f"{type(spec).__name__} is the spec model of no backend: add its Backend to "
            "operator/kubetune/api/backends.py and its Resource to operator/kubetune/api/resources.py"
        )
    return backend
