"""Status as pure functions: the condition helper, and the mapping from the child
workload (batch Job or PyTorchJob) and its pods to the job's phase and conditions.

What is read (a child's status, the job's current status) is untrusted JSON; what
is written is built as `kubetune_api.status` models and dumped by alias
(`status_patch`), so a misspelt status key or phase is a type error."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, Literal

from pydantic import ValidationError

from kubetune_api import constants as c
from kubetune_api.entities import EntityStatus
from kubetune_api.status import MAX_RESTARTS, Condition, ConditionType, FailureClass, JobStatus, Phase, Restart

PENDING: Final = "Pending"
RUNNING: Final = "Running"
RESTARTING: Final = "Restarting"
RETRIES_EXHAUSTED: Final = "RetriesExhausted"  # the child's reason once the operator stopped it
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
COND_STALLED: Final = ConditionType.STALLED


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
    """The state of either child kind (its `kind` says which). A child the operator stopped
    (its job out of retries: builders.stop_patch) has failed from that moment, before
    its controller has removed the pods."""
    state = pytorchjob_state(child) if child.get("kind") == "PyTorchJob" else batch_job_state(child)
    annotations = (child.get("metadata") or {}).get("annotations") or {}
    if c.ANNOTATION_STOPPED in annotations and state.phase != SUCCEEDED:
        stopped_at = str(annotations.get(c.ANNOTATION_STOPPED_AT) or "")
        return ChildState(FAILED, RETRIES_EXHAUSTED, annotations[c.ANNOTATION_STOPPED], state.start_time, stopped_at)
    return state


def stopped_at(child: Mapping[str, Any]) -> str | None:
    """When the operator stopped the child (out of retries), or None."""
    return ((child.get("metadata") or {}).get("annotations") or {}).get(c.ANNOTATION_STOPPED_AT)


# What counts against which budget of spec.retries.
DISRUPTIONS: Final = frozenset({FailureClass.PREEMPTED, FailureClass.NODE_FAILURE})


def out_of_retries(failures: Sequence[PodFailure], disruptions: int, others: int) -> str | None:
    """Why the job has used up a budget of spec.retries (more stopped pods of a kind than
    it allows), or None. The trainer's own error (exit code 1) has already failed the job
    (the child's own policy), so what counts as `other` here is an OOMKilled pod or an
    unexpected exit code."""
    disrupted = sum(f.failure_class in DISRUPTIONS for f in failures)
    other = len(failures) - disrupted
    if disrupted > disruptions:
        return f"{disrupted} pods were preempted or lost their node, more than spec.retries.disruptions ({disruptions})"
    if other > others:
        return f"{other} pods stopped (out of memory, an unexpected exit), more than spec.retries.failures ({others})"
    return None


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


@dataclass(frozen=True)
class PodFailure:
    """A trainer pod that stopped before the job was done, classified (FailureClass)."""

    failure_class: FailureClass
    time: str
    pod: str
    message: str
    step: int | None = None  # the trainer's last reported step when the failure was seen

    def restart(self) -> Restart:
        return Restart(
            failure_class=self.failure_class, time=self.time, pod=self.pod, message=self.message, step=self.step
        )


# DisruptionTarget reasons that say the node took the pod away, not a scheduler or an
# administrator: the taint manager evicting from a NotReady or unreachable node, and the
# pod garbage collector removing the pods of a deleted node.
_NODE_DISRUPTIONS = frozenset({"DeletionByTaintManager", "DeletionByPodGC"})
# Pod status reasons of a node that went away under the pod (the node lifecycle
# controller, graceful node shutdown).
_NODE_POD_REASONS = frozenset({"NodeLost", "NodeShutdown", "Terminated"})
# Exit codes of a trainer stopped by a signal: SIGTERM (the trainer saved a checkpoint,
# docs/CONTRACT.md section 2) or SIGKILL after the grace period (not OOMKilled).
_SIGNAL_EXITS = frozenset({c.EXIT_PREEMPTED, 137})


def _one_line(text: str, limit: int = 900) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def pod_failure(pod: Mapping[str, Any]) -> PodFailure | None:
    """Why a trainer pod stopped before its work was done, classified; None while it runs,
    after it succeeded, or if it is only waiting (a blocker, pod_blocker)."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    name = str(meta.get("name") or "")
    terminated = next(
        (
            done
            for container in status.get("containerStatuses") or []
            if (done := (container.get("state") or {}).get("terminated") or {}).get("exitCode")
        ),
        None,
    )
    finished = str((terminated or {}).get("finishedAt") or "")
    disrupted = _true(status.get("conditions") or [], "DisruptionTarget")
    if disrupted is not None:
        reason = str(disrupted.get("reason") or "DisruptionTarget")
        kind = FailureClass.NODE_FAILURE if reason in _NODE_DISRUPTIONS else FailureClass.PREEMPTED
        said = disrupted.get("message") or "the pod was disrupted"
        return PodFailure(
            kind, str(disrupted.get("lastTransitionTime") or finished), name, _one_line(f"{reason}: {said}")
        )
    if status.get("phase") == "Failed" and status.get("reason") in (_NODE_POD_REASONS | {"Evicted"}):
        kind = FailureClass.PREEMPTED if status["reason"] == "Evicted" else FailureClass.NODE_FAILURE
        said = status.get("message") or status["reason"]
        return PodFailure(kind, finished, name, _one_line(f"{status['reason']}: {said}"))
    if terminated is None:
        return None
    code = terminated["exitCode"]
    lines = [line.strip() for line in str(terminated.get("message") or "").splitlines() if line.strip()]
    # The trainer's one-line reason (its /dev/termination-log; the kubelet falls back to the
    # log's tail) says more than the child's own words ("exit code 1 matching FailJob rule").
    said = lines[-1] if lines else ""
    if terminated.get("reason") == "OOMKilled":
        return PodFailure(
            FailureClass.OUT_OF_MEMORY, finished, name, f"the container ran out of memory (OOMKilled, exit code {code})"
        )
    if code in _SIGNAL_EXITS:
        told = f": {said}" if said else ""
        return PodFailure(
            FailureClass.PREEMPTED, finished, name, _one_line(f"stopped by a signal (exit code {code}){told}")
        )
    return PodFailure(
        FailureClass.TRAINER_ERROR,
        finished,
        name,
        _one_line(f"{said} (exit code {code})" if said else f"exited with code {code}"),
    )


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


def with_listed_restarts(seen: Sequence[PodFailure], listed: Sequence[Mapping[str, Any]] | None) -> list[PodFailure]:
    """The failures this process saw, plus those status already lists for pods it can no
    longer see (deleted before an operator restart), each seen one with its listed step
    (the step when it was first seen). Read back for display only: no decision reads it."""
    entries: dict[tuple[str, str], Restart] = {}
    for entry in listed or []:
        try:
            restart = Restart.model_validate(entry)
        except ValidationError:
            continue  # not ours to carry
        entries[(restart.pod, restart.time)] = restart
    failures = []
    for failure in seen:
        listed_entry = entries.pop((failure.pod, failure.time), None)
        if listed_entry is not None and listed_entry.step is not None:
            # Listed when it was first seen: a process that sees it later (after an operator
            # restart) knows only the step the trainer has reached since.
            failure = replace(failure, step=listed_entry.step)
        failures.append(failure)
    failures += [PodFailure(r.failure_class, r.time, r.pod, r.message, r.step) for r in entries.values()]
    return failures


STALL_MIN_S = 300.0  # the least quiet time that counts as stalled: loading, a long validation
STALL_STEPS = 10  # ... or this many steps at the trainer's own pace, whichever is longer


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{int(seconds % 60):02d}s"


def stall(
    progress: Mapping[str, Any] | None, timeout_s: float | None, now: datetime
) -> tuple[str | None, float | None]:
    """(why a running trainer counts as stalled, or None; seconds until it would, or None).
    Measured from its last progress report (`updatedAt`, sent when a step finishes); a
    trainer that has not reported yet (still loading) is not judged."""
    updated_at = (progress or {}).get("updatedAt")
    if not isinstance(updated_at, str):
        return None, None
    try:
        updated = datetime.strptime(updated_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None, None
    per_step = (progress or {}).get("secondsPerStep")
    pace = STALL_STEPS * per_step if isinstance(per_step, int | float) else 0.0
    limit = float(timeout_s) if timeout_s else max(STALL_MIN_S, pace)
    quiet = (now - updated).total_seconds()
    if quiet < limit:
        return None, limit - quiet
    step = (progress or {}).get("step")
    return (
        f"no progress report since step {step}, {_duration(quiet)} ago (stalled after {_duration(limit)}): "
        "the trainer may hang (a collective waiting on a lost peer, I/O); its logs say where",
        None,
    )


def stalled_pods(pods: Sequence[Mapping[str, Any]], last_report: str) -> list[str]:
    """The names of the job's pods that were there at its trainer's last progress report
    (started before it, not yet going away): the ones a stall restart evicts. A pod made
    after that report (the one replacing an evicted pod, still loading) is left alone."""
    names = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        started = status.get("startTime") or meta.get("creationTimestamp")
        going = meta.get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed")
        if isinstance(started, str) and started < last_report and not going:  # RFC 3339, UTC: ordered as text
            names.append(str(meta.get("name")))
    return sorted(names)


# The child's Failed reasons that mean "its pods failed" (the batch Job's pod failure
# policy or backoff limit, the PyTorchJob's failure): the pods' own failure says more.
# Others (DeadlineExceeded: the Job controller stopped the pods itself) are kept.
_POD_FAILURE_REASONS = frozenset(
    {
        "PodFailurePolicy",
        "BackoffLimitExceeded",
        "FailedIndexes",
        "MaxFailedIndexesExceeded",
        "PyTorchJobFailed",
        RETRIES_EXHAUSTED,
    }
)


def status_from_child(
    current: Mapping[str, Any],
    state: ChildState,
    generation: int | None,
    now: str,
    blocker: tuple[str, str] | None = None,
    created: str = "created the workload",
    failures: Sequence[PodFailure] = (),
    memory_risk: str | None = None,
    out_of_memory_hint: str = "",
    stalled: str | None = None,
) -> JobStatus:
    """The job's phase, conditions, times and restarts, computed whole from its child's
    state (and a pod's blocker, its pods' failures, or why the job is below its GPU
    memory guideline): nothing of `current` but condition timestamps survives."""
    phase, reason, message = state.phase, state.reason, state.message
    if phase == PENDING and blocker is not None:
        reason, message = blocker
    failures = sorted(failures, key=lambda f: f.time)
    ended_by = None
    if phase == FAILED and failures and reason in _POD_FAILURE_REASONS:
        # The child says only that pods failed; the newest failure says why, in its class.
        ended_by = failures[-1]
        reason, message = ended_by.failure_class.value, f"{ended_by.message}; {message}"
        if ended_by.failure_class == FailureClass.OUT_OF_MEMORY and out_of_memory_hint:
            message = f"{message}; {out_of_memory_hint}"
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
    if stalled is not None and phase == RUNNING:
        wanted.append((COND_STALLED, True, "NoProgress", stalled))
    if memory_risk is not None:
        # Only while it holds: a condition on every job saying "no risk" would be noise.
        wanted.append((COND_MEMORY_RISK, True, "BelowMemoryGuideline", memory_risk))
    if phase == SUCCEEDED:
        wanted.append((COND_SUCCEEDED, True, reason, message))
    if phase == FAILED:
        wanted.append((COND_FAILED, True, reason, message))
    restarts = [f.restart() for f in failures if f is not ended_by][-MAX_RESTARTS:]
    return JobStatus(
        phase=phase,
        conditions=owned_conditions(current.get("conditions"), wanted, generation, now),
        start_time=state.start_time,
        completion_time=(state.completion_time or now) if phase in TERMINAL else None,
        restarts=restarts or None,
    )


def changed(current: Mapping[str, Any], update: Mapping[str, Any]) -> bool:
    return any(current.get(key) != value for key, value in update.items())
