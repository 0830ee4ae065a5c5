"""Model and Fileset: the entities that jobs reference by name or workspace/name."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from kubetune_api.common import CrossFieldRule, Reference, RuleCheckedSpec, StrictModel
from kubetune_api.status import CONDITIONS_BY_TYPE, Condition, StatusModel


class PvcLocation(StrictModel):
    """Files on a PersistentVolumeClaim in the entity's namespace."""

    claimName: str = Field(
        min_length=1, max_length=253, description="PersistentVolumeClaim name, in the entity's namespace."
    )
    path: str = Field(
        default="",
        pattern=r"^([^/.][^/]*)?(/[^/]+)*$",
        max_length=1024,
        description="Directory inside the claim (a relative path, no `..`); empty = the claim's root.",
    )


class Storage(StrictModel):
    """Where the entity's files are."""

    pvc: PvcLocation | None = Field(default=None, description="Files on a PersistentVolumeClaim (used in a cluster).")
    localPath: str | None = Field(
        max_length=4096,
        default=None,
        min_length=1,
        description="A directory on the machine running `kubetune run` (used by local runs; relative paths are "
        "relative to the manifest's folder).",
    )


ENTITY_RULES: tuple[CrossFieldRule, ...] = (
    CrossFieldRule(
        name="storage-has-a-location",
        scope=("storage",),
        cel="has(self.pvc) || has(self.localPath)",
        check=lambda s: "pvc" in s or "localPath" in s,
        message="needs pvc (for a cluster) or localPath (for kubetune run), or both",
        field=".pvc",
    ),
)

Namespaces = list[Annotated[str, Field(pattern=r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$", max_length=63)]]


class FilesetSpec(RuleCheckedSpec):
    """A set of files: training or validation data (*.jsonl, *.parquet)."""

    RULES: ClassVar[tuple[CrossFieldRule, ...]] = ENTITY_RULES

    storage: Storage = Field(description="Where the files are.")
    description: str | None = Field(default=None, max_length=1024, description="What the data is.")
    sharedWith: Namespaces | None = Field(
        default=None, description='Namespaces allowed to reference this entity as `workspace/name` ("*" = all).'
    )


MODEL_RULES: tuple[CrossFieldRule, ...] = (
    *ENTITY_RULES,
    CrossFieldRule(
        name="adapter-needs-base",
        scope=(),
        cel="self.format != 'adapter' || has(self.baseModel)",
        check=lambda s: s["format"] != "adapter" or "baseModel" in s,
        message="is required when format is adapter",
        field=".baseModel",
    ),
)


class ModelSpec(RuleCheckedSpec):
    """A model in Hugging Face format: full weights, or a LoRA adapter of a base model."""

    RULES: ClassVar[tuple[CrossFieldRule, ...]] = MODEL_RULES

    storage: Storage = Field(description="Where the model directory is.")
    format: Literal["full", "adapter"] = Field(
        default="full", description="full weights, or a LoRA adapter of baseModel."
    )
    baseModel: Reference | None = Field(default=None, description="The base Model of an adapter.")
    tokenizer: str | None = Field(
        max_length=256,
        default=None,
        description="Tokenizer identity (e.g. HuggingFaceTB/SmolLM2); a teacher and its student must match.",
    )
    vocabSize: int | None = Field(
        default=None, gt=0, description="Vocabulary size; a teacher and its student must match."
    )
    description: str | None = Field(default=None, max_length=1024, description="What the model is.")
    parameters: int | None = Field(
        default=None,
        gt=0,
        description="Parameter count (e.g. 8030261248 for an 8B model). When given, jobs on this model are checked "
        "against the seed's GPU memory guidelines: a job asking for fewer or smaller GPUs gets condition "
        'MemoryRisk, a warning, never a refusal (docs/OPERATOR.md, "Memory pre-flight check").',
    )
    sharedWith: Namespaces | None = Field(
        default=None, description='Namespaces allowed to reference this entity as `workspace/name` ("*" = all).'
    )


class EntityStatus(StatusModel):
    """Whether the entity's files can be used."""

    ready: bool | None = Field(default=None, description="True when the files can be mounted.")
    conditions: list[Condition] | None = Field(
        default=None, description="Latest observations, by type.", json_schema_extra=CONDITIONS_BY_TYPE
    )
    observed_generation: int | None = Field(default=None, description="The spec generation last acted on.")
