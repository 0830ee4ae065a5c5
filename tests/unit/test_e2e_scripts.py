"""The kind end-to-end kit (e2e/) checked without Docker: its manifests are valid and agree
with each other, the chart and the examples; its scripts parse; and its CPU job runs for real
with the Automodel trainer on what the seed script writes, as the pod would (no Kubernetes:
the config file is rendered by the operator's own function with local paths)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.resources import AUTOMODEL, UNSLOTH
from kubetune.render import NO_PROGRESS, TrainerPaths, dumps_config, render_trainer_config

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
    assert "11 kubetune resource(s) valid" in result.stderr


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


def test_e2e_manifests_refer_to_each_other() -> None:
    storage = {d["metadata"]["name"] for d in _docs(E2E / "manifests" / "storage.yaml")}
    entities = {(d["kind"], d["metadata"]["name"]): d for d in _docs(E2E / "manifests" / "cpu-entities.yaml")}
    jobs = _docs(E2E / "manifests" / "cpu-jobs.yaml")
    # Same claim names as the examples, and the chart's default output claim among them.
    assert storage == {d["metadata"]["name"] for d in _docs(ROOT / "examples" / "storage.yaml")}
    chart_values = yaml.safe_load((ROOT / "helm" / "kubetune" / "values.yaml").read_text())
    assert chart_values["trainer"]["outputClaim"] in storage
    for (_, name), entity in entities.items():
        assert entity["spec"]["storage"]["pvc"]["claimName"] in storage, name
    assert {j["kind"] for j in jobs} == {"AutomodelJob", "UnslothJob"}
    for job in jobs:
        spec = job["spec"]
        refs = _job_refs(job)
        for ref in refs:
            assert ref in entities, f"{job['metadata']['name']} refers to {ref}, not in cpu-entities.yaml"
        assert "image" not in spec, "the e2e jobs must use the chart's trainer images"
        assert spec["output"]["name"], "run.sh checks the output Model by this name"


def test_seed_job_in_run_sh_meets_pod_security_restricted() -> None:
    from test_helm import restricted_violations

    text = (E2E / "run.sh").read_text()
    manifest = text.split("<<EOF\n", 1)[1].split("\nEOF\n", 1)[0]
    manifest = manifest.replace("${automodel_image}", "image:tag").replace("${seed_args}", '"--model", "tiny"')
    manifest = manifest.replace("${offline}", "1")
    assert "${" not in manifest, "run.sh's seed Job uses a variable this test does not substitute"
    job = yaml.safe_load(manifest)
    assert restricted_violations(job["spec"]["template"]["spec"]) == []
    # The seed writes what the trainers later write next to: it must be their uid.
    from kubetune_api.constants import TRAINER_UID

    context = job["spec"]["template"]["spec"]["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (TRAINER_UID, TRAINER_UID)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "venv"),
    [("AutomodelJob", "test"), ("UnslothJob", "unsloth")],
    ids=["automodel", "unsloth"],
)
def test_cpu_job_trains_on_the_seeded_claims(tmp_path: Path, kind: str, venv: str) -> None:
    """What the kind run does for each CPU job, minus Kubernetes: seed, render, train, in the
    trainer's own environment. Slow-ish (30 to 60 s each: torch imports, 10 steps of a tiny model)."""
    (job,) = [d for d in _docs(E2E / "manifests" / "cpu-jobs.yaml") if d["kind"] == kind]
    name = job["metadata"]["name"]
    resource = AUTOMODEL if kind == "AutomodelJob" else UNSLOTH
    claims = tmp_path / "claims"
    seed = subprocess.run(
        ["bash", "hack/run-in-venv.sh", "test", "python", "e2e/seed/seed.py", "--model", "tiny", "--job", name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "KUBETUNE_SEED_ROOT": str(claims)},
    )
    assert seed.returncode == 0, seed.stderr[-3000:]

    entities = {
        d["metadata"]["name"]: d["spec"]["storage"]["pvc"] for d in _docs(E2E / "manifests" / "cpu-entities.yaml")
    }
    claim_dir = {"models": claims / "models", "datasets": claims / "datasets"}

    def local(ref: str) -> str:
        pvc = entities[ref]
        return str(claim_dir[pvc["claimName"]] / pvc["path"])

    spec, data = job["spec"], job["spec"]["dataset"]
    output = claims / "output" / name
    if kind == "AutomodelJob":
        model, training, validation = spec["model"], data["training"], data["validation"]
    else:
        model, training, validation = spec["model"]["name"], data["path"], data["validation_path"]
    config = render_trainer_config(
        resource,
        name=name,
        namespace="kubetune-e2e",
        uid="e2e-rehearsal",
        spec=resource.spec_model.model_validate(spec),
        paths=TrainerPaths(
            model=local(model), training_data=local(training), validation_data=local(validation), output=str(output)
        ),
        progress=NO_PROGRESS,
    )
    config_file = tmp_path / "config.json"
    config_file.write_text(dumps_config(config))
    module = "kubetune_trainer.automodel" if kind == "AutomodelJob" else "kubetune_trainer.unsloth"
    train = subprocess.run(
        ["bash", "hack/run-in-venv.sh", venv, "python", "-m", module, "--config", str(config_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log"), "HF_HUB_OFFLINE": "1"},
    )
    assert train.returncode == 0, train.stderr[-4000:]
    result = json.loads((output / "result.json").read_text())
    assert result["kind"] == "adapter"
    assert (output / "adapter" / "adapter_model.safetensors").is_file()
    steps = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert max(s["step"] for s in steps) == spec["schedule"]["max_steps"]
