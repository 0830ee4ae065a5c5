"""Resolving a job's references (`name` or `workspace/name`) to Model and Fileset
entities: pure functions over a lookup, shared by the operator (entities from its
watch index) and `kubetune run` (entities from the manifests given)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune.api.backends import JobSpec, Reference
from kubetune.api.resources import spec_backend
from kubetune_api import constants as c

__all__ = [
    "EntityRecord",
    "JobSpec",
    "Lookup",
    "Reference",
    "ReferenceProblem",
    "Resolution",
    "job_references",
    "resolve_references",
    "split_reference",
]


@dataclass(frozen=True)
class EntityRecord:
    """What a job needs to know about an entity."""

    kind: str
    namespace: str
    name: str
    spec: Mapping[str, Any]
    ready: bool
    not_ready_reason: str = ""
    not_ready_message: str = ""
    # For an entity with spec.source: the directory of the downloaded version under
    # storage.pvc.path (kubetune_fetch's version name); "" for files put there by hand.
    version: str = ""

    @classmethod
    def judged(
        cls,
        kind: str,
        namespace: str,
        name: str,
        spec: Mapping[str, Any],
        problem: tuple[str, str] | None,
        version: str = "",
    ) -> EntityRecord:
        """Ready when there is no problem; otherwise not ready with its (reason, message)."""
        if problem is None:
            return cls(kind, namespace, name, spec, True, version=version)
        return cls(kind, namespace, name, spec, False, *problem, version=version)

    @property
    def claim_path(self) -> str:
        """The files' directory inside the claim: storage.pvc.path, and for a downloaded
        source the version's directory under it."""
        base = str(((self.spec.get("storage") or {}).get("pvc") or {}).get("path") or "")
        return "/".join(p for p in (base, self.version) if p)

    @property
    def shared_with(self) -> list[str]:
        return list(self.spec.get("sharedWith") or [])


@dataclass(frozen=True)
class ReferenceProblem:
    field: str
    reason: str
    message: str
    waiting: bool  # True when the job should start by itself once the world changes


@dataclass
class Resolution:
    entities: dict[str, EntityRecord] = field(default_factory=dict)  # by role
    problems: list[ReferenceProblem] = field(default_factory=list)


def job_references(spec: JobSpec) -> list[Reference]:
    """The job's reference fields, as its backend declares them."""
    return spec_backend(spec).references(spec)


def split_reference(value: str, job_namespace: str) -> tuple[str, str]:
    """`name` → (job namespace, name); `workspace/name` → (workspace, name)."""
    if "/" in value:
        workspace, name = value.split("/", 1)
        return workspace, name
    return job_namespace, value


Lookup = Callable[[str, str, str], EntityRecord | None]  # (kind, namespace, name)


def resolve_references(spec: JobSpec, job_namespace: str, lookup: Lookup) -> Resolution:
    result = Resolution()
    for ref in job_references(spec):
        namespace, name = split_reference(ref.value, job_namespace)
        record = lookup(ref.kind, namespace, name)
        where = f"{ref.kind} {namespace}/{name}"
        if record is None:
            result.problems.append(
                ReferenceProblem(ref.field, "ReferenceNotFound", f"{ref.field}: {where} not found", waiting=True)
            )
            continue
        if namespace != job_namespace and not ({job_namespace, "*"} & set(record.shared_with)):
            result.problems.append(
                ReferenceProblem(
                    ref.field,
                    "ReferenceForbidden",
                    f"{ref.field}: {where} is not shared with namespace {job_namespace} "
                    f"(its owner can add {job_namespace!r} to its spec.sharedWith)",
                    waiting=True,
                )
            )
            continue
        if ref.kind == c.KIND_MODEL and record.spec.get("format", "full") != "full":
            what = "a teacher" if ref.role == "teacher_model" else "a base model"
            result.problems.append(
                ReferenceProblem(
                    ref.field,
                    "TeacherNotFullWeight" if ref.role == "teacher_model" else "ModelNotFullWeight",
                    f"{ref.field}: {where} is an adapter; {what} must be a full-weight Model",
                    waiting=False,
                )
            )
            continue
        if not record.ready:
            result.problems.append(
                ReferenceProblem(
                    ref.field,
                    record.not_ready_reason or "EntityNotReady",
                    f"{ref.field}: {where} is not ready: {record.not_ready_message or 'waiting for its files'}",
                    waiting=True,
                )
            )
            continue
        result.entities[ref.role] = record
    result.problems.extend(_teacher_student_mismatch(result.entities))
    return result


def _teacher_student_mismatch(entities: Mapping[str, EntityRecord]) -> list[ReferenceProblem]:
    student, teacher = entities.get("model"), entities.get("teacher_model")
    if student is None or teacher is None:
        return []
    problems = []
    for key, reason in (("tokenizer", "TokenizerMismatch"), ("vocabSize", "VocabularyMismatch")):
        s, t = student.spec.get(key), teacher.spec.get(key)
        if s is not None and t is not None and s != t:
            problems.append(
                ReferenceProblem(
                    "spec.training.teacher_model",
                    reason,
                    f"spec.training.teacher_model: teacher {teacher.namespace}/{teacher.name} has {key} {t!r} but "
                    f"the student {student.namespace}/{student.name} has {s!r}; distillation needs the same "
                    "tokenizer and vocabulary",
                    waiting=False,
                )
            )
    return problems
