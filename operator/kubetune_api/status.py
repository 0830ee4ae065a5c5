"""Status, as the operator and the trainer write it: the models both sides build and dump
by alias (Kubernetes' camelCase), so a misspelt status key is a type error, not a silent
extra field."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

Phase = Literal["Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]


class ConditionType(StrEnum):
    """The condition types kubetune writes (`kubectl wait --for=condition=<type>`)."""

    # Jobs
    REFERENCES_RESOLVED = "ReferencesResolved"
    CREATED = "Created"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    STALLED = "Stalled"  # running, but no progress report for too long (kubetune.controller.status.stall)
    MEMORY_RISK = "MemoryRisk"  # below the seed's GPU memory guideline (a warning; kubetune.memory)
    # Model and Fileset
    READY = "Ready"


class FailureClass(StrEnum):
    """Why a trainer pod stopped before the job was done, as the operator tells it from the
    pod's conditions, its container's state and the trainer's termination message
    (docs/FAILURES.md says what each means and what to do)."""

    PREEMPTED = "Preempted"  # disrupted (preemption, eviction, node drain) or stopped by SIGTERM
    OUT_OF_MEMORY = "OutOfMemory"  # the container was OOMKilled
    TRAINER_ERROR = "TrainerError"  # the trainer's own error: bad data, bad config
    NODE_FAILURE = "NodeFailure"  # the node went away or became unreachable under the pod


# `status.conditions` is a map keyed by type (as metav1.Condition lists are): the API
# server refuses two conditions of one type, and server-side apply merges them by type.
CONDITIONS_BY_TYPE: dict[str, Any] = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


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


MAX_CHECKPOINTS = 10  # progress.checkpoints lists at most this many, the newest


class Checkpoint(StatusModel):
    """A complete checkpoint on the output claim: one a restarted pod would resume from."""

    step: int = Field(ge=0, description="The optimizer step it holds.")
    epoch: float | None = Field(default=None, description="Epochs done at that step (fractional).")
    time: str = Field(max_length=64, description="When the trainer committed it (RFC 3339).")
    validation_loss: float | None = Field(
        default=None, description="Validation loss at that step, where a validation ran at that step."
    )
    path: str = Field(
        max_length=1024,
        description="Its directory on the output claim (the claim of the job's output Model), from the claim's root: "
        "`<job>/<uid>/checkpoints/...`.",
    )


class Progress(StatusModel):
    """Training progress as the trainer reports it (rank 0 patches it)."""

    step: int | None = Field(default=None, description="Optimizer steps done.")
    max_steps: int | None = Field(default=None, description="Optimizer steps planned.")
    epoch: float | None = Field(default=None, description="Epochs done (fractional).")
    train_loss: float | None = Field(default=None, description="Last training loss.")
    validation_loss: float | None = Field(default=None, description="Last validation loss.")
    percent: int | None = Field(default=None, ge=0, le=100, description="Steps done of maxSteps, in percent.")
    seconds_per_step: float | None = Field(
        default=None, ge=0, description="Wall-clock seconds per optimizer step, last steps (validation included)."
    )
    tokens_per_second: float | None = Field(
        default=None, ge=0, description="Training tokens per second over the same steps, where the trainer counts them."
    )
    eta_seconds: int | None = Field(
        default=None, ge=0, description="Seconds left at secondsPerStep: (maxSteps - step) x secondsPerStep."
    )
    summary: str | None = Field(
        default=None,
        max_length=256,
        description="What `kubectl get` shows: `37% · ETA 12m` once the step time is known, else `step/maxSteps (N%)`.",
    )
    updated_at: str | None = Field(
        default=None, max_length=64, description="When the trainer last reported (RFC 3339)."
    )
    history: list[ProgressPoint] | None = Field(
        default=None, max_length=50, description="The last 50 reported points, oldest first."
    )
    checkpoints: list[Checkpoint] | None = Field(
        default=None,
        max_length=MAX_CHECKPOINTS,
        description=f"The checkpoints on the output claim now, oldest first (the newest {MAX_CHECKPOINTS}); the "
        "trainer removes older ones as it saves new ones, and the list follows.",
        # One entry per step: the API server refuses a list that names a step twice.
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["step"]},
    )


MAX_RESTARTS = 20  # status.restarts keeps the newest this many


class Restart(StatusModel):
    """One trainer pod that stopped before the job was done: by whom, when and why. The
    operator adds an entry (and a Warning Event) for each; a job that fails lists all but
    the failure that ended it, whose class is then the Failed condition's reason."""

    failure_class: FailureClass = Field(description="Preempted, OutOfMemory, TrainerError or NodeFailure.")
    time: str = Field(max_length=64, description="When the pod stopped (RFC 3339).")
    pod: str = Field(max_length=253, description="The pod that stopped.")
    message: str = Field(default="", max_length=1024, description="What the pod, its node or the trainer said.")
    step: int | None = Field(
        default=None,
        description="The last step the trainer had reported then: the next pod resumes from the last checkpoint at "
        "or before it.",
    )


class OutputRef(StatusModel):
    """The Model entity the job produced."""

    model: str = Field(max_length=253, description="Name of the output Model entity, in the job's namespace.")
    format: Literal["full", "adapter"] = Field(description="full weights or a LoRA adapter.")


class JobStatus(StatusModel):
    """What kubetune reports about a job."""

    phase: Phase | None = Field(
        default=None, description="Pending, Running, Restarting, Suspended, Succeeded or Failed."
    )
    conditions: list[Condition] | None = Field(
        default=None, description="Latest observations, by type.", json_schema_extra=CONDITIONS_BY_TYPE
    )
    observed_generation: int | None = Field(default=None, description="The spec generation last acted on.")
    start_time: str | None = Field(
        default=None, max_length=64, description="When the child started running (RFC 3339)."
    )
    completion_time: str | None = Field(default=None, max_length=64, description="When the job finished (RFC 3339).")
    gpus: int | None = Field(default=None, description="GPUs the job uses in all.")
    child: ChildRef | None = Field(default=None, description="The workload that runs the job.")
    progress: Progress | None = Field(default=None, description="Training progress.")
    output: OutputRef | None = Field(default=None, description="The produced Model entity.")
    restarts: list[Restart] | None = Field(
        default=None,
        max_length=MAX_RESTARTS,
        description=f"Trainer pods that stopped before the job was done, oldest first (the newest {MAX_RESTARTS}).",
    )
