"""Status as pure functions: the condition helper, and the mapping from the child
workload (batch Job or PyTorchJob) and its pods to the job's phase and conditions.

What is read (a child's status, the job's current status) is untrusted JSON; what
is written is built as `kubetune_api.status` models and dumped by alias
(`status_patch`), so a misspelt status key or phase is a type error."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, Literal

from kubetune_api.entities import EntityStatus
from kubetune_api.status import Condition, ConditionType, JobStatus, Phase

PENDING: Final = "Pending"
RUNNING: Final = "Running"
RESTARTING: Final = "Restarting"
SUSPENDED: Final = "Suspended"
SUCCEEDED: Final = "Succeeded"
FAILED: Final = "Failed"
TERMINAL: frozenset[Phase] = frozenset({SUCCEEDED, FAILED})

# Condition types a job carries (typed: kubetune_api.status.ConditionType).
COND_REFERENCES: Final = ConditionType.REFERENCES_RESOLVED
COND_CREATED: Final = ConditionType.CREATED
COND_RUNNING: Final = ConditionType.RUNNING
COND_SUSPENDED: Final = ConditionType.SUSPENDED
COND_SUCCEEDED: Final = ConditionType.SUCCEEDED
COND_FAILED: Final = ConditionType.FAILED
COND_MEMORY_RISK: Final = ConditionType.MEMORY_RISK


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(value: bool) -> Literal["True", "False"]:
    return "True" if value else "False"


def _condition(
    before: Mapping[str, Any] | None,
    type_: ConditionType,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> Condition:
    """Condition `type_` as decided now; lastTransitionTime stays `before`'s while its
    status does not change."""
    value = _status(status)
    kept = before.get("lastTransitionTime") if before is not None and before.get("status") == value else None
    return Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=str(kept) if kept else now,
        observed_generation=generation,
    )


def set_condition(
    conditions: Sequence[Mapping[str, Any]] | None,
    type_: ConditionType,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> list[Condition]:
    """A new list with `type_` set; lastTransitionTime moves only when status changes.
    Conditions of other types are kept (when they are well-formed)."""
    new = partial(
        _condition, type_=type_, status=status, reason=reason, message=message, generation=generation, now=now
    )
    out = [new(cond) if cond.get("type") == type_ else _parsed_condition(cond) for cond in conditions or []]
    if not any(cond.get("type") == type_ for cond in conditions or []):
        out.append(new(None))
    return [cond for cond in out if cond is not None]


def _parsed_condition(cond: Mapping[str, Any]) -> Condition | None:
    try:
        return Condition.model_validate(cond)
    except ValueError:
        return None


def status_patch(status: JobStatus | EntityStatus) -> dict[str, Any]:
    """The body of a merge patch: the fields that were set, in camelCase; a field set to
    None is sent as null, which clears it."""
    return status.model_dump(mode="json", by_alias=True, exclude_unset=True)


def find_condition(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    return next((cond for cond in conditions or [] if cond.get("type") == type_), None)


@dataclass(frozen=True)
class ChildState:
    phase: Phase
    reason: str
    message: str
    start_time: str | None = None
    completion_time: str | None = None


def _true(conditions: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    cond = find_condition(conditions, type_)
    return cond if cond is not None and cond.get("status") == "True" else None


def batch_job_state(job: Mapping[str, Any]) -> ChildState:
    status = job.get("status") or {}
    conditions = status.get("conditions") or []
    start, done = status.get("startTime"), status.get("completionTime")
    # SuccessCriteriaMet comes before Complete (which waits for pod finalizers): the
    # outcome is decided there, and reading it as "not running" would flap the phase.
    if cond := (_true(conditions, "Complete") or _true(conditions, "SuccessCriteriaMet")):
        return ChildState(
            SUCCEEDED,
            "Completed",
            cond.get("message") or "the trainer finished",
            start,
            done or cond.get("lastTransitionTime"),
        )
    if cond := (_true(conditions, "Failed") or _true(conditions, "FailureTarget")):
        reason = cond.get("reason") or "Failed"
        return ChildState(
            FAILED, reason, cond.get("message") or "the trainer failed", start, done or cond.get("lastTransitionTime")
        )
    if _true(conditions, "Suspended") or (job.get("spec") or {}).get("suspend"):
        return ChildState(SUSPENDED, "Suspended", "the Job is suspended", start)
    if (status.get("ready") or 0) > 0:
        return ChildState(RUNNING, "Running", "the trainer pod is running", start)
    if (status.get("failed") or 0) > 0 and (status.get("active") or 0) > 0:
        return ChildState(RESTARTING, "Restarting", f"retry after {status['failed']} failed pod(s)", start)
    return ChildState(PENDING, "Created", "waiting for the trainer pod to start", start)


def pytorchjob_state(job: Mapping[str, Any]) -> ChildState:
    status = job.get("status") or {}
    conditions = status.get("conditions") or []
    start, done = status.get("startTime"), status.get("completionTime")
    phases: tuple[tuple[str, Phase], ...] = (
        ("Succeeded", SUCCEEDED),
        ("Failed", FAILED),
        ("Suspended", SUSPENDED),
        ("Restarting", RESTARTING),
        ("Running", RUNNING),
    )
    for type_, phase in phases:
        if cond := _true(conditions, type_):
            completion = (done or cond.get("lastTransitionTime")) if phase in TERMINAL else None
            return ChildState(phase, cond.get("reason") or type_, cond.get("message") or "", start, completion)
    if (job.get("spec") or {}).get("runPolicy", {}).get("suspend"):
        return ChildState(SUSPENDED, "Suspended", "the PyTorchJob is suspended", start)
    return ChildState(PENDING, "Created", "waiting for the PyTorchJob's pods to start", start)


def child_state(child: Mapping[str, Any]) -> ChildState:
    """The state of either child kind (its `kind` says which)."""
    return pytorchjob_state(child) if child.get("kind") == "PyTorchJob" else batch_job_state(child)


_WAITING_REASONS = frozenset(
    {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError"}
)


def pod_blocker(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """Why a pod of the job cannot start, in words a user can act on; None if it can."""
    status = pod.get("status") or {}
    scheduled = find_condition(status.get("conditions"), "PodScheduled")
    if scheduled is not None and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        name = (pod.get("metadata") or {}).get("name", "")
        return "Unschedulable", f"pod {name}: {scheduled.get('message') or 'no node fits'}"
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _WAITING_REASONS:
            return waiting[
                "reason"
            ], f"container {container.get('name')}: {waiting.get('message') or waiting['reason']}"
    return None


def trainer_exit(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """(finishedAt, reason) of a pod whose container ended with a non-zero exit code and a
    termination message: the trainer's one-line reason (its /dev/termination-log; the
    kubelet falls back to the log's tail), which says more than the child's own words
    ("failed with exit code 1 matching FailJob rule")."""
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        done = (container.get("state") or {}).get("terminated") or {}
        lines = [line.strip() for line in str(done.get("message") or "").splitlines() if line.strip()]
        if done.get("exitCode") and lines:
            return str(done.get("finishedAt") or ""), f"{lines[-1]} (exit code {done['exitCode']})"
    return None


def child_has_pods(child: Mapping[str, Any]) -> bool:
    """Whether the child's controller has made any pod yet (running, done or failed)."""
    status = child.get("status") or {}
    if child.get("kind") == "PyTorchJob":
        counts = [v for rs in (status.get("replicaStatuses") or {}).values() for k, v in rs.items() if k != "selector"]
    else:
        counts = [status.get(k) for k in ("active", "ready", "succeeded", "failed", "terminating")]
    return any(isinstance(n, int) and n > 0 for n in counts)


def creation_refusal(child: Mapping[str, Any], events: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    """Why the child's controller could not make a pod (a quota, Pod Security, an
    admission webhook), from its newest FailedCreate event, in the API's words; None if
    it has no such event."""
    refused = [e for e in events if e.get("reason") == "FailedCreate"]
    if not refused:
        return None

    def when(event: Mapping[str, Any]) -> str:
        return str(event.get("lastTimestamp") or event.get("eventTime") or "")

    newest = max(refused, key=when)
    name = (child.get("metadata") or {}).get("name", "")
    what = f"{child.get('kind', 'the child')} {name}"
    return "PodCreationRefused", f"{what} cannot create its pods: {newest.get('message')}"


def owned_conditions(
    current: Sequence[Mapping[str, Any]] | None,
    wanted: Sequence[tuple[ConditionType, bool, str, str]],
    generation: int | None,
    now: str,
) -> list[Condition]:
    """Exactly the conditions the operator decides, in a fixed order: status is written
    by others too (the trainer's identity may patch it), so anything not in `wanted`
    is dropped rather than carried on. lastTransitionTime stays where status did not move."""
    previous = {cond.get("type"): cond for cond in current or []}
    return [
        _condition(previous.get(type_), type_, status, reason, message, generation, now)
        for type_, status, reason, message in wanted
    ]


def status_from_child(
    current: Mapping[str, Any],
    state: ChildState,
    generation: int | None,
    now: str,
    blocker: tuple[str, str] | None = None,
    created: str = "created the workload",
    trainer_reason: str | None = None,
    memory_risk: str | None = None,
) -> JobStatus:
    """The job's phase, conditions and times, computed whole from its child's state
    (and a pod's blocker, the trainer's reason for failing, or why the job is below its
    GPU memory guideline): nothing of `current` but condition timestamps survives."""
    phase, reason, message = state.phase, state.reason, state.message
    if phase == PENDING and blocker is not None:
        reason, message = blocker
    if phase == FAILED and trainer_reason is not None:
        message = f"{trainer_reason}; {message}"
    wanted = [
        (COND_REFERENCES, True, "Resolved", "every reference resolved"),
        (COND_CREATED, True, "Created", created),
        (COND_RUNNING, phase == RUNNING, reason, message),
        (
            COND_SUSPENDED,
            phase == SUSPENDED,
            reason if phase == SUSPENDED else "NotSuspended",
            message if phase == SUSPENDED else "",
        ),
    ]
    if memory_risk is not None:
        # Only while it holds: a condition on every job saying "no risk" would be noise.
        wanted.append((COND_MEMORY_RISK, True, "BelowMemoryGuideline", memory_risk))
    if phase == SUCCEEDED:
        wanted.append((COND_SUCCEEDED, True, reason, message))
    if phase == FAILED:
        wanted.append((COND_FAILED, True, reason, message))
    return JobStatus(
        phase=phase,
        conditions=owned_conditions(current.get("conditions"), wanted, generation, now),
        start_time=state.start_time,
        completion_time=(state.completion_time or now) if phase in TERMINAL else None,
    )


def changed(current: Mapping[str, Any], update: Mapping[str, Any]) -> bool:
    return any(current.get(key) != value for key, value in update.items())
