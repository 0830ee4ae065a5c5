"""The kind end-to-end kit (e2e/) checked without Docker: its manifests are valid and agree
with each other, the chart and the examples; its scripts parse; its seed Job meets Pod Security
"restricted". (Its CPU mode runs tests/e2e, which `make test` runs on the real node.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
E2E = ROOT / "e2e"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _job_refs(job: dict[str, Any]) -> list[tuple[str, str]]:
    """The (kind, name) of every entity a job manifest names."""
    spec = job["spec"]
    model = spec["model"] if job["kind"] == "AutomodelJob" else spec["model"]["name"]
    data = spec["dataset"]
    keys = ("training", "validation", "path", "validation_path")
    return [("Model", model)] + [("Fileset", data[k]) for k in keys if k in data]


@pytest.mark.parametrize(
    "script", ["e2e/run.sh", "e2e/down.sh", "e2e/seed-local.sh", "hack/images.sh", "hack/standin-base.sh"]
)
def test_scripts_parse(script: str) -> None:
    result = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"KUBETUNE_IMAGE_BUILDER": "kaniko"}, [], "KUBETUNE_IMAGE_BUILDER is 'kaniko'; use docker or buildah"),
        ({"KUBETUNE_IMAGE_BUILDER": "docker", "DOCKER": "/nonexistent/docker"}, [], "'/nonexistent/docker info' fails"),
        ({}, ["--bogus"], "unknown option '--bogus'"),
    ],
)  # fmt: skip
def test_images_sh_refuses_a_bad_builder_choice(env: dict[str, str], args: list[str], message: str) -> None:
    """Bad input to the image build names the setting and what to use instead, before any build."""
    result = subprocess.run(
        ["bash", "hack/images.sh", *args, "kubetune-operator"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_e2e_manifests_validate_offline() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kubetune", "validate", "-f", "e2e/manifests/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "operator")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 kubetune resource(s) valid" in result.stderr


def test_local_e2e_jobs_use_the_examples_entities() -> None:
    """The real-node tier's jobs (README blocks e2e:seed/e2e:watch) name the Model and
    Filesets of examples/entities.yaml, which e2e/seed-local.sh fills."""
    docs = _docs(E2E / "manifests" / "smollm2-jobs.yaml") + _docs(E2E / "manifests" / "smollm2-tier-jobs.yaml")
    entities = {(d["kind"], d["metadata"]["name"]) for d in _docs(ROOT / "examples" / "entities.yaml")}
    entities |= {(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] in ("Model", "Fileset")}
    jobs = [d for d in docs if d["kind"].endswith("Job")]
    assert len(jobs) == 5
    for job in jobs:
        for ref in _job_refs(job):
            assert ref in entities, f"{job['metadata']['name']} refers to {ref}, not in examples/entities.yaml"


def test_e2e_storage_matches_the_examples_claims() -> None:
    """e2e/manifests/storage.yaml (what the tier applies on kind) has the claims of
    examples/storage.yaml, the chart's default output claim among them, and the tier's claims pod
    mounts exactly those."""
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    from e2ecluster import CLAIMS

    storage = {d["metadata"]["name"] for d in _docs(E2E / "manifests" / "storage.yaml")}
    assert storage == {d["metadata"]["name"] for d in _docs(ROOT / "examples" / "storage.yaml")}
    assert storage == set(CLAIMS)
    chart_values = yaml.safe_load((ROOT / "helm" / "kubetune" / "values.yaml").read_text())
    assert chart_values["trainer"]["outputClaim"] in storage


def test_seed_job_in_run_sh_meets_pod_security_restricted() -> None:
    from test_helm import restricted_violations

    text = (E2E / "run.sh").read_text()
    manifest = text.split("<<EOF\n", 1)[1].split("\nEOF\n", 1)[0]
    manifest = manifest.replace("${automodel_image}", "image:tag").replace("${seed_args}", ', "--job", "a"')
    assert "${" not in manifest, "run.sh's seed Job uses a variable this test does not substitute"
    job = yaml.safe_load(manifest)
    assert restricted_violations(job["spec"]["template"]["spec"]) == []
    # The seed writes what the trainers later write next to: it must be their uid.
    from kubetune_api.constants import TRAINER_UID

    context = job["spec"]["template"]["spec"]["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (TRAINER_UID, TRAINER_UID)
