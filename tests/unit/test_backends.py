"""The backend descriptors: every job kind has one, its lookups refuse what is not a job,
and no code outside the descriptors branches on a job's kind or spec class."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest
import yaml
from pydantic import BaseModel

from kubetune.api.backends import UnknownBackend
from kubetune.api.resources import BACKENDS, JOB_RESOURCES, MODEL, RESOURCES, job_backend, spec_backend
from kubetune.controller.builders import JobInputs, backend, build_all, total_gpus
from kubetune.controller.references import JobSpec, job_references
from kubetune_api.trainer_config import CONFIG_MODELS

ROOT = Path(__file__).resolve().parents[2]


def test_every_job_kind_has_its_own_backend() -> None:
    assert [r.is_job for r in RESOURCES] == [r.backend is not None for r in RESOURCES]
    assert len({b.name for b in BACKENDS}) == len(BACKENDS) == len(JOB_RESOURCES)
    for resource in JOB_RESOURCES:
        descriptor = job_backend(resource)
        assert descriptor.spec_model is resource.spec_model
        assert CONFIG_MODELS[resource.kind].model_fields["spec"].annotation is descriptor.spec_model
        assert descriptor.trainer_module == f"kubetune_trainer.{descriptor.name}"
        assert (ROOT / "trainer-images" / "kubetune_trainer" / descriptor.name).is_dir()
        assert (ROOT / descriptor.requirements).is_file()


def test_an_entity_kind_has_no_backend() -> None:
    with pytest.raises(UnknownBackend, match="Model is not a job kind"):
        job_backend(MODEL)
    with pytest.raises(UnknownBackend):
        backend(MODEL)


class ThirdJobSpec(BaseModel):
    """A spec model no descriptor knows: it must never pass for Unsloth's (or Automodel's)."""

    image: str | None = None


def test_an_unknown_spec_is_an_error_not_the_other_backend() -> None:
    spec = cast(JobSpec, ThirdJobSpec())
    with pytest.raises(UnknownBackend, match="ThirdJobSpec is the spec model of no backend"):
        spec_backend(spec)
    with pytest.raises(UnknownBackend):
        total_gpus(spec)
    with pytest.raises(UnknownBackend):
        job_references(spec)


def test_a_job_resource_without_a_backend_builds_nothing() -> None:
    resource = replace(JOB_RESOURCES[0], kind="ThirdJob", backend=None)
    body = yaml.safe_load((ROOT / "examples" / "automodel-lora.yaml").read_text())
    spec = cast(JobSpec, JOB_RESOURCES[0].spec_model.model_validate(body["spec"]))
    with pytest.raises(UnknownBackend, match="ThirdJob is not a job kind"):
        build_all(JobInputs(resource=resource, name="j", namespace="ns", uid="uid", spec=spec, entities={}))


# A kind branch: `isinstance(x, <Backend>JobSpec)`, or a comparison with a job kind's name.
_BRANCH = re.compile(
    r"isinstance\([^)]*(Automodel|Unsloth)|KIND_AUTOMODEL|KIND_UNSLOTH|==\s*[\"'](AutomodelJob|UnslothJob)"
)
# Where a job kind is declared, not branched on: its descriptor, its Resource, its constants and envelope.
_DECLARATIONS = {
    "operator/kubetune/api/backends.py",
    "operator/kubetune/api/resources.py",
    "operator/kubetune_api/constants.py",
    "operator/kubetune_api/trainer_config.py",
}


def test_no_kind_branches_outside_the_descriptors() -> None:
    """A third backend must not need an edit in the reconciler, builders, references,
    `kubetune run` or the CLI; a branch there would also quietly treat it as one of these."""
    found = []
    for path in sorted((ROOT / "operator").rglob("*.py")):
        relative = str(path.relative_to(ROOT))
        if relative in _DECLARATIONS:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _BRANCH.search(line):
                found.append(f"{relative}:{number}: {line.strip()}")
    assert not found, "look the job's backend up (kubetune.api.resources.job_backend / spec_backend):\n" + "\n".join(
        found
    )
