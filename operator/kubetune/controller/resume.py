"""`spec.resume_from`: which checkpoint of another job a new job starts from. Pure, over
the source job's body as the operator's watch last saw it.

Trust: the source job's status.progress is written by its trainer's identity, so nothing
in it is used as a path. Only the step numbers it lists are read (to say whether the
checkpoint was committed); the directory is built here from the source job's name, its
uid and the backend's own naming, inside that job's directory on the output claim.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.api.backends import Backend
from kubetune.controller.references import ReferenceProblem
from kubetune_api.common import ResumeFrom
from kubetune_api.trainer_config import job_output_subpath

FIELD = "spec.resume_from"


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a job starts from: the source job and step, and its directory on the
    output claim (what the pod mounts read only)."""

    job: str
    step: int
    subpath: str


def listed_steps(source: Mapping[str, Any]) -> list[int]:
    """The steps of the checkpoints the source job's status lists, ascending."""
    progress = (source.get("status") or {}).get("progress") or {}
    entries = progress.get("checkpoints") or []
    return sorted({e["step"] for e in entries if isinstance(e, Mapping) and type(e.get("step")) is int})


def resolve_resume(
    wanted: ResumeFrom, kind: str, job_name: str, source: Mapping[str, Any] | None, backend: Backend[Any]
) -> ResumePoint | ReferenceProblem:
    """The checkpoint `wanted` names, or why the job cannot start from it yet (waiting: the
    source job may appear or commit that checkpoint) or at all."""
    if wanted.job == job_name:
        return ReferenceProblem(
            FIELD, "ResumeFromItself", f"{FIELD}.job names this job; a restarted pod resumes by itself", waiting=False
        )
    if source is None:
        return ReferenceProblem(
            f"{FIELD}.job",
            "ResumeSourceNotFound",
            f"{FIELD}.job: {kind} {wanted.job} not found in this namespace (it must be a {kind}: the checkpoint "
            "formats of the backends differ)",
            waiting=True,
        )
    steps = listed_steps(source)
    step = wanted.step if wanted.step is not None else (steps[-1] if steps else None)
    if step is None or step not in steps:
        have = ", ".join(map(str, steps)) if steps else "none"
        what = f"step {wanted.step}" if wanted.step is not None else "any step"
        if not steps and (source.get("status") or {}).get("phase") == "Succeeded":
            # A finished trainer removes its checkpoints: its result is the output Model.
            why = "it succeeded and its checkpoints are removed; name its output Model as this job's model instead"
        else:
            why = "the job starts when it lists one (a trainer keeps only its newest checkpoints)"
        return ReferenceProblem(
            f"{FIELD}.step",
            "CheckpointNotFound",
            f"{FIELD}: {kind} {wanted.job} lists no checkpoint at {what} (status.progress.checkpoints: {have}); {why}",
            waiting=True,
        )
    uid = source["metadata"]["uid"]
    subpath = f"{job_output_subpath(wanted.job, uid)}/checkpoints/{backend.checkpoint_dir(step)}"
    return ResumePoint(wanted.job, step, subpath)
