"""Pieces shared by both job kinds: the strict base model, entity references,
integrations, cross-field rules (one definition, two evaluators: Python here and
CEL in the API server) and the status shape."""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

# name or workspace/name; a workspace is a namespace, a name a DNS-1123 subdomain.
REFERENCE_PATTERN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"

Reference = Annotated[
    str,
    Field(
        pattern=REFERENCE_PATTERN,
        max_length=317,
        description="An entity reference: `name` (same namespace) or `workspace/name` (the namespace "
        "`workspace`, which must share the entity with this job's namespace).",
    ),
]


class StrictModel(BaseModel):
    """Every spec section: unknown keys are errors and a string is never an integer."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class SecretKeyRef(StrictModel):
    """A key of a Secret in the job's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Secret name, in the job's namespace.")
    key: str = Field(min_length=1, max_length=253, description="Key inside the Secret.")


class MLflowIntegration(StrictModel):
    """Log parameters and metrics to an MLflow tracking server."""

    tracking_uri: str = Field(
        min_length=1, max_length=2048, description="MLflow tracking URI, e.g. http://mlflow.mlops:5000."
    )
    experiment_name: str | None = Field(
        default=None, max_length=256, description="Experiment name; default: the job's name."
    )
    token_secret: SecretKeyRef | None = Field(
        default=None, description="Secret key holding an MLflow token, passed as MLFLOW_TRACKING_TOKEN."
    )


class WandbIntegration(StrictModel):
    """Log metrics to Weights & Biases."""

    project: str = Field(min_length=1, max_length=256, description="W&B project.")
    entity: str | None = Field(default=None, max_length=256, description="W&B entity (team or user).")
    api_key_secret: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the W&B API key, passed as WANDB_API_KEY."
    )


class Integrations(StrictModel):
    """Optional experiment trackers. Credentials come from Secrets, never from the spec."""

    mlflow: MLflowIntegration | None = Field(default=None, description="MLflow tracking.")
    wandb: WandbIntegration | None = Field(default=None, description="Weights & Biases tracking.")


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `Section | None` or `list[Section]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = nested_model(arg)
        if found is not None:
            return found
    return None


# --- cross-field rules ----------------------------------------------------------------


@dataclass(frozen=True)
class CrossFieldRule:
    """A rule over several fields, written once for each evaluator.

    `cel` is evaluated by the API server with `self` bound to the object at `scope`
    (a path below `spec`); `check` is the same rule in Python over the same JSON
    object (defaults applied, absent fields missing). Tests assert both agree.
    """

    name: str
    scope: tuple[str, ...]
    cel: str
    check: Callable[[Mapping[str, Any]], bool]
    message: str
    field: str  # the field the message is about, relative to `scope`, as ".a.b"

    @property
    def spec_path(self) -> str:
        return ".".join(("spec", *self.scope)) + self.field


def _at(obj: Mapping[str, Any], scope: tuple[str, ...]) -> Mapping[str, Any] | None:
    cur: Any = obj
    for key in scope:
        if not isinstance(cur, Mapping) or key not in cur:
            return None
        cur = cur[key]
    return cur if isinstance(cur, Mapping) else None


def drop_none(value: Any) -> Any:
    """The JSON object the API server stores: absent optionals are missing, not null."""
    if isinstance(value, Mapping):
        return {k: drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_none(v) for v in value]
    return value


def broken_rules(rules: tuple[CrossFieldRule, ...], spec: Mapping[str, Any]) -> list[CrossFieldRule]:
    broken = []
    for rule in rules:
        target = _at(spec, rule.scope)
        if target is not None and not rule.check(target):
            broken.append(rule)
    return broken


class RuleCheckedSpec(StrictModel):
    """A job spec whose cross-field rules run after its fields validate."""

    RULES: ClassVar[tuple[CrossFieldRule, ...]] = ()

    @model_validator(mode="after")
    def _cross_field_rules(self) -> RuleCheckedSpec:
        broken = broken_rules(type(self).RULES, drop_none(self.model_dump(mode="json")))
        if broken:
            raise PydanticCustomError(
                "cross_field",
                "; ".join(f"{r.spec_path}: {r.message}" for r in broken),
                {"problems": [(r.spec_path, r.message) for r in broken]},
            )
        return self


# --- status -----------------------------------------------------------------------------


class StatusModel(BaseModel):
    """Status is written by the operator and trainer, in Kubernetes' camelCase."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class Condition(StatusModel):
    """metav1.Condition."""

    type: str = Field(max_length=316, description="Condition type: Ready, Running, Succeeded, Failed, Suspended, ...")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=1024, description="One CamelCase word saying why.")
    message: str = Field(default="", max_length=32768, description="Human-readable detail.")
    last_transition_time: str = Field(max_length=64, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, description="The spec generation this reflects.")


class ChildRef(StatusModel):
    """The workload that runs the job. Shown to users; the operator never reads it back
    (status is writable by the trainer's identity too), so it can steer nothing."""

    api_version: Literal["batch/v1", "kubeflow.org/v1"] = Field(description="apiVersion of the child.")
    kind: Literal["Job", "PyTorchJob"] = Field(description="Job (one GPU) or PyTorchJob.")
    name: str = Field(
        max_length=63,
        pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$",
        description="Name of the child, in the job's namespace (a DNS-1035 label).",
    )


class ProgressPoint(StatusModel):
    """One point of the loss history."""

    step: int = Field(description="Optimizer step.")
    train_loss: float | None = Field(default=None, description="Training loss at this step.")
    validation_loss: float | None = Field(default=None, description="Validation loss at this step.")


class Progress(StatusModel):
    """Training progress as the trainer reports it (rank 0 patches it)."""

    step: int | None = Field(default=None, description="Optimizer steps done.")
    max_steps: int | None = Field(default=None, description="Optimizer steps planned.")
    epoch: float | None = Field(default=None, description="Epochs done (fractional).")
    train_loss: float | None = Field(default=None, description="Last training loss.")
    validation_loss: float | None = Field(default=None, description="Last validation loss.")
    summary: str | None = Field(default=None, max_length=256, description="`step/maxSteps`, for `kubectl get`.")
    updated_at: str | None = Field(
        default=None, max_length=64, description="When the trainer last reported (RFC 3339)."
    )
    history: list[ProgressPoint] | None = Field(
        default=None, max_length=50, description="The last 50 reported points, oldest first."
    )


class OutputRef(StatusModel):
    """The Model entity the job produced."""

    model: str = Field(max_length=253, description="Name of the output Model entity, in the job's namespace.")
    format: Literal["full", "adapter"] = Field(description="full weights or a LoRA adapter.")


class JobStatus(StatusModel):
    """What kubetune reports about a job."""

    phase: Literal["Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed"] | None = Field(
        default=None, description="Pending, Running, Restarting, Suspended, Succeeded or Failed."
    )
    conditions: list[Condition] | None = Field(default=None, description="Latest observations, by type.")
    observed_generation: int | None = Field(default=None, description="The spec generation last acted on.")
    start_time: str | None = Field(
        default=None, max_length=64, description="When the child started running (RFC 3339)."
    )
    completion_time: str | None = Field(default=None, max_length=64, description="When the job finished (RFC 3339).")
    gpus: int | None = Field(default=None, description="GPUs the job uses in all.")
    child: ChildRef | None = Field(default=None, description="The workload that runs the job.")
    progress: Progress | None = Field(default=None, description="Training progress.")
    output: OutputRef | None = Field(default=None, description="The produced Model entity.")
