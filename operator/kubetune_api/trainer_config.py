"""The trainer config file (docs/CONTRACT.md, section 1), as one typed envelope.

The operator renders it into the job's ConfigMap and `kubetune run` writes it
beside the run; the trainer parses it back into the same models before anything
runs. The envelope is a union discriminated by `kind`: an AutomodelJob config
carries an `AutomodelJobSpec`, an UnslothJob config an `UnslothJobSpec`, each
with every default filled and every cross-field rule checked by the model
itself. A trainer therefore reads `cfg.spec.training.lora.rank`, which mypy
checks, instead of a dotted string that turns a typo into a silent default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from kubetune_api import constants as c
from kubetune_api.automodel import AutomodelJobSpec
from kubetune_api.unsloth import UnslothJobSpec


class EnvelopeModel(BaseModel):
    """Unknown keys are errors here too: a stale or hand-written file fails naming the key."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TrainerPaths(EnvelopeModel):
    """Where the trainer finds its inputs and writes its outputs (mount paths in a pod,
    local directories under `kubetune run`)."""

    model: Path = Field(description="Base model directory (Hugging Face format).")
    training_data: Path = Field(description="Training data: a directory of *.jsonl / *.parquet, or one file.")
    output: Path = Field(description="Where results, metrics.jsonl and checkpoints/ go.")
    teacher_model: Path | None = Field(default=None, description="Teacher model directory (distillation only).")
    validation_data: Path | None = Field(default=None, description="Validation data, like training_data.")
    resume_from: Path | None = Field(
        default=None,
        description="Another job's checkpoint directory to start from (spec.resume_from), read only; used when "
        "output/checkpoints holds none of this job's own.",
    )

    @property
    def checkpoints(self) -> Path:
        return self.output / "checkpoints"


class KubernetesProgress(EnvelopeModel):
    """Progress goes to the job's status subresource (docs/CONTRACT.md, section 3)."""

    type: Literal["kubernetes"] = "kubernetes"
    group: str = Field(min_length=1)
    version: str = Field(min_length=1)
    plural: str = Field(min_length=1)
    namespace: str = Field(min_length=1)
    name: str = Field(min_length=1)

    @property
    def status_path(self) -> str:
        """The API path the trainer's merge patch goes to."""
        return f"/apis/{self.group}/{self.version}/namespaces/{self.namespace}/{self.plural}/{self.name}/status"


class NoProgress(EnvelopeModel):
    """Progress is not reported (local runs, tests)."""

    type: Literal["none"] = "none"


ProgressTarget = Annotated[KubernetesProgress | NoProgress, Field(discriminator="type")]


def job_output_subpath(name: str, uid: str) -> str:
    """The job's directory on the output claim, `<name>/<uid>`, which its pods mount at
    `paths.output`. Keyed by uid, so an AutomodelJob and an UnslothJob of one name, or a job
    deleted and made again, never share outputs or resume from each other's checkpoints.
    Here, not in the operator, because the trainer names paths on the claim in its status."""
    return f"{name}/{uid}"


class JobIdentity(EnvelopeModel):
    """The job the config was rendered for."""

    name: str = Field(min_length=1)
    namespace: str = Field(min_length=1)
    uid: str = Field(min_length=1)

    @property
    def output_subpath(self) -> str:
        """Where `paths.output` is on the output claim (`job_output_subpath`)."""
        return job_output_subpath(self.name, self.uid)


class _Envelope(EnvelopeModel):
    api_version: Literal["kubetune.io/v1alpha1"] = Field(default="kubetune.io/v1alpha1", alias="apiVersion")
    metadata: JobIdentity
    paths: TrainerPaths
    progress: ProgressTarget = Field(default_factory=NoProgress)

    @property
    def name(self) -> str:
        return self.metadata.name


class AutomodelTrainerConfig(_Envelope):
    """The config of an AutomodelJob's pods."""

    kind: Literal["AutomodelJob"]
    spec: AutomodelJobSpec

    @model_validator(mode="after")
    def _paths_match_spec(self) -> AutomodelTrainerConfig:
        # The spec's references and the paths they resolved to must agree, or the trainer would
        # silently train without the teacher or validation data the job names.
        if self.spec.training.training_type == "distillation" and self.paths.teacher_model is None:
            raise ValueError("paths.teacher_model is required: spec.training.training_type is distillation")
        if self.spec.dataset.validation is not None and self.paths.validation_data is None:
            raise ValueError("paths.validation_data is required: spec.dataset.validation names a Fileset")
        return self


class UnslothTrainerConfig(_Envelope):
    """The config of an UnslothJob's pod."""

    kind: Literal["UnslothJob"]
    spec: UnslothJobSpec

    @model_validator(mode="after")
    def _paths_match_spec(self) -> UnslothTrainerConfig:
        if self.spec.dataset.validation_path is not None and self.paths.validation_data is None:
            raise ValueError("paths.validation_data is required: spec.dataset.validation_path names a Fileset")
        return self


TrainerConfig = Annotated[AutomodelTrainerConfig | UnslothTrainerConfig, Field(discriminator="kind")]
TRAINER_CONFIG: TypeAdapter[AutomodelTrainerConfig | UnslothTrainerConfig] = TypeAdapter(TrainerConfig)
# The envelope model of each job kind (the renderer picks by the job's kind).
CONFIG_MODELS: dict[str, type[AutomodelTrainerConfig] | type[UnslothTrainerConfig]] = {
    c.KIND_AUTOMODEL: AutomodelTrainerConfig,
    c.KIND_UNSLOTH: UnslothTrainerConfig,
}


def parse_trainer_config(document: object) -> AutomodelTrainerConfig | UnslothTrainerConfig:
    """A parsed JSON document -> the typed config; raises pydantic's ValidationError."""
    return TRAINER_CONFIG.validate_python(document)


def dump_trainer_config(config: AutomodelTrainerConfig | UnslothTrainerConfig) -> dict[str, object]:
    """The JSON document: spec in the user-facing snake_case, nulls kept (every field present)."""
    return config.model_dump(mode="json", by_alias=True)
