"""Model and Fileset: the entities that jobs reference by name or workspace/name."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

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
        description="Directory inside the claim (a relative path, no `..`); empty = the claim's root. With "
        "spec.source, the directory the downloads go under: the files are in `<path>/<revision>-<digest>/`.",
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


# --- where the files come from (issue 17) ------------------------------------------------

# A Hub repository id: `name` or `owner/name` (the Hub's own rule: letters, digits, `-`, `_`, `.`).
HF_REPO_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$"
# A git revision: a branch, tag or commit sha (git's ref rules, loosely: no spaces, no `..`).
REVISION_PATTERN = r"^[A-Za-z0-9._/-]+$"

Patterns = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=256)]],
    Field(min_length=1, max_length=64),
]


class TokenSecret(StrictModel):
    """A key of a Secret in the entity's namespace that holds an access token."""

    name: str = Field(min_length=1, max_length=253, description="Secret name, in the entity's namespace.")
    key: str = Field(
        default="token", min_length=1, max_length=253, description="Key inside the Secret; default: token."
    )


class CredentialsSecret(StrictModel):
    """A Secret in the entity's namespace with S3 credentials, under the AWS variable names."""

    name: str = Field(
        min_length=1,
        max_length=253,
        description="Secret name, in the entity's namespace. Its keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "(and AWS_SESSION_TOKEN when the keys are temporary) are the credentials.",
    )


class HuggingFaceSource(StrictModel):
    """A repository on the Hugging Face Hub, or on a Hub-compatible endpoint (a private hub or a mirror,
    named by HF_ENDPOINT where the download runs)."""

    repo: str = Field(
        pattern=HF_REPO_PATTERN,
        max_length=200,
        description="Repository id, `owner/name` (e.g. HuggingFaceTB/SmolLM2-135M-Instruct).",
    )
    repoType: Literal["model", "dataset"] = Field(
        default="model", description="model or dataset repository (they live under different URLs); default: model."
    )
    revision: str = Field(
        default="main",
        min_length=1,
        max_length=255,
        pattern=REVISION_PATTERN,
        description="Branch, tag or commit sha; default: main. A branch is resolved to its commit once, when the "
        "files are first downloaded, and kept; a new value downloads again into a new directory (jobs started on the "
        "old one keep it).",
    )
    allowPatterns: Patterns | None = Field(
        default=None,
        description="Glob patterns of the files to download (e.g. `*.safetensors`, `*.json`); default: every file "
        "of the repository.",
    )
    tokenSecret: TokenSecret | None = Field(
        default=None,
        description="Secret key holding a Hub access token, for private or gated repositories; default: none "
        "(anonymous; `kubetune run` uses HF_TOKEN or the token of `hf auth login`).",
    )


class DatasetHuggingFaceSource(HuggingFaceSource):
    """A repository on the Hugging Face Hub, or on a Hub-compatible endpoint (a private hub or a mirror,
    named by HF_ENDPOINT where the download runs)."""

    repoType: Literal["model", "dataset"] = Field(
        default="dataset",
        description="dataset or model repository (they live under different URLs); default: dataset.",
    )


class S3Source(StrictModel):
    """Objects in an S3 bucket: AWS S3 or any S3-compatible store (MinIO, Ceph, R2, ...)."""

    bucket: str = Field(
        min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Bucket name."
    )
    prefix: str = Field(
        default="",
        max_length=1024,
        description="Key prefix of the objects to download (e.g. `models/smollm2/`); each object lands at its key "
        "less the prefix; default: empty (the whole bucket).",
    )
    endpoint: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://[^\s/]+(/.*)?$",
        description="Endpoint URL of an S3-compatible store (e.g. http://minio.storage:9000); default: AWS S3 "
        "(or AWS_ENDPOINT_URL where the download runs).",
    )
    region: str | None = Field(
        default=None,
        max_length=64,
        pattern=r"^[a-z0-9-]+$",
        description="Region of the bucket; default: AWS_REGION where the download runs, else us-east-1.",
    )
    credentialsSecret: CredentialsSecret | None = Field(
        default=None,
        description="Secret with the access keys; default: none (the environment's credentials, e.g. a pod "
        "identity or ~/.aws for `kubetune run`, else anonymous access to a public bucket).",
    )


class ModelSource(StrictModel):
    """Where the operator downloads the files from, once, into storage.pvc; every job then reuses them.
    Exactly one of huggingface and s3."""

    huggingface: HuggingFaceSource | None = Field(default=None, description="A Hugging Face Hub repository.")
    s3: S3Source | None = Field(default=None, description="Objects under a prefix of an S3 bucket.")


class FilesetSource(StrictModel):
    """Where the operator downloads the files from, once, into storage.pvc; every job then reuses them.
    Exactly one of huggingface and s3."""

    huggingface: DatasetHuggingFaceSource | None = Field(
        default=None, description="A Hugging Face Hub repository (a dataset repository unless repoType says model)."
    )
    s3: S3Source | None = Field(default=None, description="Objects under a prefix of an S3 bucket.")


Source = ModelSource | FilesetSource


def source_field() -> Any:
    return Field(
        default=None,
        description="Where the files come from (Hugging Face Hub or S3). In a cluster the operator downloads them "
        "once into storage.pvc, under `<path>/<revision>-<digest>/`, with one initializer Job per entity, reports "
        "progress in status.download and sets Ready when the download is complete; jobs naming the entity wait "
        "until then. `kubetune run` without localPath downloads into a local cache. Without source, the files "
        "are put on storage by hand.",
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
    CrossFieldRule(
        name="source-is-one-of",
        scope=("source",),
        cel="has(self.huggingface) != has(self.s3)",
        check=lambda s: ("huggingface" in s) != ("s3" in s),
        message="give exactly one of source.huggingface and source.s3",
        field=".huggingface",
    ),
)

Namespaces = list[Annotated[str, Field(pattern=r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$", max_length=63)]]


class FilesetSpec(RuleCheckedSpec):
    """A set of files: training or validation data (*.jsonl, *.parquet)."""

    RULES: ClassVar[tuple[CrossFieldRule, ...]] = ENTITY_RULES

    storage: Storage = Field(description="Where the files are.")
    source: FilesetSource | None = source_field()
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
    source: ModelSource | None = source_field()
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


DownloadPhase = Literal["Downloading", "Complete", "Failed"]


class DownloadStatus(StatusModel):
    """The download of spec.source into storage.pvc, as the entity's initializer reports it
    (`python -m kubetune_fetch`, run by the operator's initializer Job)."""

    version: str = Field(
        max_length=128,
        description="The version of the source these numbers are for: its directory under storage.pvc.path "
        "(`<revision>-<digest>`, or `s3-<digest>`); jobs mount that directory.",
    )
    phase: DownloadPhase = Field(description="Downloading, Complete or Failed (retried with backoff).")
    files_done: int = Field(default=0, ge=0, description="Files complete.")
    files_total: int = Field(default=0, ge=0, description="Files to download.")
    bytes_done: int = Field(default=0, ge=0, description="Bytes on the volume, partial files included.")
    bytes_total: int = Field(default=0, ge=0, description="Bytes of all files.")
    bytes_per_second: float = Field(default=0, ge=0, description="Transfer rate of this attempt.")
    summary: str = Field(default="", max_length=256, description="`3/10 files, 1.2 GB of 5.0 GB, 40.0 MB/s`.")
    resolved: str | None = Field(
        default=None,
        max_length=256,
        description="What the completion marker records: the commit a Hugging Face revision resolved to, or the "
        "number of S3 objects and a digest of their ETags.",
    )
    parameters: int | None = Field(
        default=None,
        ge=0,
        description="A Model's parameter count, read from the downloaded safetensors headers: the memory "
        "pre-flight check uses it when spec.parameters is not set.",
    )
    reason: str | None = Field(
        default=None,
        max_length=64,
        description="Why the last attempt failed: NotFound, Unauthorized, Unavailable, Invalid or Storage.",
    )
    message: str | None = Field(default=None, max_length=4096, description="What failed, and what to do.")
    updated_at: str = Field(max_length=64, description="When the initializer last reported (RFC 3339).")


class EntityStatus(StatusModel):
    """Whether the entity's files can be used, and the download of spec.source."""

    ready: bool | None = Field(default=None, description="True when the files can be mounted.")
    conditions: list[Condition] | None = Field(
        default=None, description="Latest observations, by type.", json_schema_extra=CONDITIONS_BY_TYPE
    )
    observed_generation: int | None = Field(default=None, description="The spec generation last acted on.")
    download: DownloadStatus | None = Field(
        default=None,
        description="The download of spec.source, written by the entity's initializer; the operator sets Ready "
        "when it is Complete for the source's current version.",
    )
