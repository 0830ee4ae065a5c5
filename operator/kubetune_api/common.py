"""Pieces shared by both job kinds: the strict base model, entity references,
integrations and cross-field rules (one definition, two evaluators: Python here and
CEL in the API server). The status shape is in `kubetune_api.status`."""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
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


# Fields every job kind has, in the place each spec puts them (a shared base class would
# move them first, and with them the CRDs' property order). Each call is a new field.


def output_name_field() -> Any:
    """`spec.output.name`: the output Model's name, a DNS-1123 subdomain."""
    return Field(
        default=None,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        max_length=253,
        description="Name of the output Model entity; default: `<job name>-output`.",
    )


def output_description_field() -> Any:
    return Field(default=None, max_length=1024, description="Description stored on the output Model entity.")


def integrations_field() -> Any:
    return Field(default=None, description="Experiment trackers (optional).")


def suspend_field() -> Any:
    return Field(
        default=False,
        description="kubetune extension: create the workload suspended (Kueue admits it by clearing this).",
    )


def image_field(backend: str) -> Any:
    """`spec.image`; `backend` names the operator's default image in the description."""
    return Field(
        max_length=1024,
        default=None,
        min_length=1,
        description=f"kubetune extension: trainer image for this job; default: the operator's {backend} image.",
    )


class Retries(StrictModel):
    """kubetune extension: how many trainer pods may stop before the job fails, by failure
    class (docs/FAILURES.md). Each stopped pod is made again and resumes from the last
    checkpoint; the trainer's own error (TrainerError, exit code 1) fails the job at once."""

    disruptions: int = Field(
        default=10,
        ge=0,
        le=1000,
        description="Pods that may be Preempted (preemption, eviction, drain, a signal) or lose their node "
        "(NodeFailure) before the job fails.",
    )
    failures: int = Field(
        default=2,
        ge=0,
        le=100,
        description="Pods that may stop for another reason (OutOfMemory, an unexpected exit code) before the job "
        "fails.",
    )


def retries_field() -> Any:
    return Field(
        default_factory=Retries,
        description="kubetune extension: retry budgets by failure class; disruptions and other failures are "
        "counted apart (docs/FAILURES.md).",
    )


def stall_timeout_field() -> Any:
    return Field(
        default=None,
        ge=60,
        le=7 * 24 * 3600,
        description="kubetune extension: seconds without a progress report (one per finished step) after which a "
        "running job gets condition Stalled=True; default: 10 × the trainer's seconds per step, at least 300 "
        "(docs/FAILURES.md).",
    )


class ResumeFrom(StrictModel):
    """kubetune extension: start from a checkpoint of another job (docs/FAILURES.md, "Start
    from another job's checkpoint"): its weights, optimizer, scheduler and step."""

    job: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="A job of the same kind in this namespace whose status.progress.checkpoints lists the checkpoint.",
    )
    step: int | None = Field(
        default=None,
        ge=0,
        description="The checkpoint's step, one that job's status.progress.checkpoints lists; default: its newest.",
    )


def resume_from_field() -> Any:
    return Field(
        default=None,
        description="kubetune extension: start from another job's checkpoint (weights, optimizer, scheduler, step) "
        "and train on to this job's own schedule; the job waits until that checkpoint is listed. A restarted pod "
        "of this job resumes from its own checkpoints instead.",
    )


def restart_stalled_field() -> Any:
    return Field(
        default=False,
        description="kubetune extension: when the job is Stalled, evict its trainer pods that were running at the "
        "last progress report, so that new ones resume from the last checkpoint (counted as Preempted against "
        "retries.disruptions; docs/FAILURES.md).",
    )


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
