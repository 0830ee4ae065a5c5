"""spec.resume_from: which checkpoint of another job a job starts from, how its pod mounts
it, and the same choice under `kubetune run`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_builders import example_inputs
from test_localrun import AUTOMODEL, UNSLOTH, write_manifests

from kubetune.api.backends import AUTOMODEL_BACKEND, UNSLOTH_BACKEND
from kubetune.controller.builders import build_all
from kubetune.controller.references import ReferenceProblem
from kubetune.controller.resume import ResumePoint, resolve_resume
from kubetune.localrun import RunError, plan_local_run
from kubetune_api import constants as c
from kubetune_api.common import ResumeFrom

UID = "0a0a0a0a-1111-2222-3333-444444444444"


def source_job(steps: list[Any], phase: str = "Running") -> dict[str, Any]:
    checkpoints = [{"step": s, "time": "2026-12-02T06:00:00Z", "path": f"evil/../../{s}"} for s in steps]
    return {
        "metadata": {"name": "first", "uid": UID},
        "status": {"phase": phase, "progress": {"checkpoints": checkpoints}},
    }


def test_the_newest_listed_checkpoint_by_default_and_the_path_is_built_not_read() -> None:
    """The status's path is the trainer identity's to write: the directory comes from the
    source's name, uid and the backend's naming, never from the listed path."""
    point = resolve_resume(
        ResumeFrom(job="first"), "AutomodelJob", "second", source_job([10, 30, 20]), AUTOMODEL_BACKEND
    )
    assert point == ResumePoint("first", 30, f"first/{UID}/checkpoints/step-0000030")
    point = resolve_resume(
        ResumeFrom(job="first", step=20), "UnslothJob", "second", source_job([10, 20]), UNSLOTH_BACKEND
    )
    assert point == ResumePoint("first", 20, f"first/{UID}/checkpoints/checkpoint-20")


@pytest.mark.parametrize(
    ("wanted", "source", "reason", "waiting", "words"),
    [
        (ResumeFrom(job="first"), None, "ResumeSourceNotFound", True, "AutomodelJob first not found"),
        (ResumeFrom(job="second"), source_job([1]), "ResumeFromItself", False, "names this job"),
        (ResumeFrom(job="first"), source_job([]), "CheckpointNotFound", True, "checkpoints: none"),
        (ResumeFrom(job="first", step=5), source_job([10]), "CheckpointNotFound", True, "at step 5 (status"),
        (ResumeFrom(job="first"), source_job([], "Succeeded"), "CheckpointNotFound", True, "name its output Model"),
        # A step the status does not list as an integer is not a checkpoint.
        (ResumeFrom(job="first", step=3), source_job(["3"]), "CheckpointNotFound", True, "checkpoints: none"),
    ],
)
def test_why_a_job_cannot_start_from_the_checkpoint_yet(
    wanted: ResumeFrom, source: dict[str, Any] | None, reason: str, waiting: bool, words: str
) -> None:
    problem = resolve_resume(wanted, "AutomodelJob", "second", source, AUTOMODEL_BACKEND)
    assert isinstance(problem, ReferenceProblem)
    assert (problem.reason, problem.waiting) == (reason, waiting)
    assert words in problem.message and problem.field.startswith("spec.resume_from")


def test_the_pod_mounts_the_checkpoint_read_only_and_the_config_names_it() -> None:
    inputs = example_inputs("automodel-lora.yaml")
    point = ResumePoint("first", 30, f"first/{UID}/checkpoints/step-0000030")
    config_map, *_, child = build_all(replace(inputs, resume=point))
    pod = child["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == c.RESUME_MOUNT)
    output = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == c.OUTPUT_MOUNT)
    assert mount == {"name": output["name"], "mountPath": c.RESUME_MOUNT, "subPath": point.subpath, "readOnly": True}
    assert json.loads(config_map["data"][c.CONFIG_FILE_NAME])["paths"]["resume_from"] == c.RESUME_MOUNT
    assert child["metadata"]["annotations"][c.ANNOTATION_RESUMED_FROM] == "first@30"

    config_map, *_, child = build_all(inputs)
    assert json.loads(config_map["data"][c.CONFIG_FILE_NAME])["paths"]["resume_from"] is None
    mounts = child["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert c.RESUME_MOUNT not in {m["mountPath"] for m in mounts}


def _checkpoint(root: Path, name: str, complete: bool = True) -> Path:
    path = root / name
    path.mkdir(parents=True)
    if complete:
        (path / c.CHECKPOINT_STATE_FILE).write_text("{}")
    return path


@pytest.mark.parametrize(
    ("job", "names"),
    [(AUTOMODEL, ["step-0000002", "step-0000004"]), (UNSLOTH, ["checkpoint-2", "checkpoint-4"])],
    ids=["automodel", "unsloth"],
)
def test_kubetune_run_starts_from_the_other_runs_directory_beside_its_own(
    job: dict[str, Any], names: list[str], tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    for name in names:
        _checkpoint(runs / "first" / "checkpoints", name)
    _checkpoint(runs / "first" / "checkpoints", names[-1].replace("4", "6"), complete=False)  # being written
    manifest = write_manifests(tmp_path, {**job, "spec": {**job["spec"], "resume_from": {"job": "first"}}})
    plan = plan_local_run([str(manifest)], output=str(runs / "second"), check_environment=False)
    assert plan.config["paths"]["resume_from"] == str(runs / "first" / "checkpoints" / names[-1])

    manifest.write_text(manifest.read_text().replace("job: first", "job: first\n    step: 3"))
    with pytest.raises(RunError, match=r"spec\.resume_from: no complete checkpoint at step 3 .*steps there: 2, 4"):
        plan_local_run([str(manifest)], output=str(runs / "second"), check_environment=False)
