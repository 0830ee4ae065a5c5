"""`kubetune run` planning: the dry run renders exactly the document the operator
mounts (one function), and what cannot run here is refused with the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from kubetune.api.resources import BY_KIND
from kubetune.controller.builders import JobInputs, build_config_map
from kubetune.controller.references import JobSpec, resolve_references
from kubetune.controller.world import World
from kubetune.localrun import RunError, plan_local_run
from kubetune.validation import validate_paths

ROOT = Path(__file__).resolve().parents[2]


def write_manifests(tmp: Path, job: dict[str, Any]) -> Path:
    (tmp / "model").mkdir()
    (tmp / "data").mkdir()
    entities = [
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "Model",
            "metadata": {"name": "base"},
            "spec": {
                "format": "full",
                "storage": {"pvc": {"claimName": "models", "path": "base"}, "localPath": "model"},
            },
        },
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "Fileset",
            "metadata": {"name": "train"},
            "spec": {"storage": {"pvc": {"claimName": "data", "path": "train"}, "localPath": "data"}},
        },
    ]
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump_all([job, *entities]))
    return path


AUTOMODEL: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "AutomodelJob",
    "metadata": {"name": "tiny"},
    "spec": {"model": "base", "dataset": {"training": "train"}, "schedule": {"max_steps": 3}},
}
UNSLOTH: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "UnslothJob",
    "metadata": {"name": "tiny-u"},
    "spec": {"model": {"name": "base", "load_in_4bit": False}, "dataset": {"path": "train"}},
}


def operator_config(path: Path) -> dict[str, Any]:
    """What the operator would mount for the same manifests."""
    parsed, problems, _ = validate_paths([str(path)])
    assert not problems
    world = World()
    for res in parsed:
        if not res.resource.is_job:
            world.entities[(res.kind, "default", res.name)] = res.spec.model_dump(mode="json", exclude_none=True)
    world.claims[("default", "models")] = world.claims[("default", "data")] = "Bound"
    job = next(r for r in parsed if r.resource.is_job)
    spec = cast(JobSpec, job.spec)
    entities = resolve_references(spec, "default", world.lookup).entities
    inputs = JobInputs(
        resource=BY_KIND[job.kind], name=job.name, namespace="default", uid="uid-1", spec=spec, entities=entities
    )
    return dict(json.loads(build_config_map(inputs)["data"]["config.json"]))


@pytest.mark.parametrize("job", [AUTOMODEL, UNSLOTH], ids=["automodel", "unsloth"])
def test_dry_run_renders_what_the_operator_mounts(job: dict[str, Any], tmp_path: Path) -> None:
    path = write_manifests(tmp_path, job)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "operator")}
    result = subprocess.run(
        [sys.executable, "-m", "kubetune", "run", "-f", str(path), "--dry-run", "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    text, _, command = result.stdout.rpartition("command: ")
    local = json.loads(text)
    mounted = operator_config(path)
    assert local["spec"] == mounted["spec"]
    assert (local["apiVersion"], local["kind"], local["metadata"]["name"]) == (
        mounted["apiVersion"],
        mounted["kind"],
        mounted["metadata"]["name"],
    )
    assert local["paths"].keys() == mounted["paths"].keys()
    assert local["paths"]["model"] == str(tmp_path / "model")
    assert local["paths"]["training_data"] == str(tmp_path / "data")
    assert local["paths"]["output"] == str(tmp_path / "out")
    assert local["progress"] == {"type": "none"} and mounted["progress"]["type"] == "kubernetes"
    module = "kubetune_trainer.unsloth" if job["kind"] == "UnslothJob" else "kubetune_trainer.automodel"
    assert f"-m {module} --config {tmp_path / 'out' / 'config.json'}" in command


def test_missing_local_path_names_the_entity_and_fix(tmp_path: Path) -> None:
    path = write_manifests(tmp_path, AUTOMODEL)
    (tmp_path / "data").rmdir()
    with pytest.raises(
        RunError,
        match=r"spec.dataset.training: Fileset default/train is not ready: spec.storage"
        r".localPath .*data does not exist",
    ):
        plan_local_run([str(path)], check_environment=False)


def test_entities_must_be_given(tmp_path: Path) -> None:
    job = tmp_path / "only-job.yaml"
    job.write_text(yaml.safe_dump(AUTOMODEL))
    with pytest.raises(RunError, match=r"(?s)spec.model: Model default/base not found.*give the manifests"):
        plan_local_run([str(job)], check_environment=False)


def test_more_gpus_than_this_machine_points_at_cpu_processes(tmp_path: Path) -> None:
    job = {**AUTOMODEL, "spec": {**AUTOMODEL["spec"], "parallelism": {"num_gpus_per_node": 4}}}
    path = write_manifests(tmp_path, job)
    with pytest.raises(RunError, match=r"asks for 4 GPUs .* --cpu-processes 4"):
        plan_local_run([str(path)], check_environment=False)
    plan = plan_local_run([str(path)], check_environment=False, cpu_processes=4)
    assert "--nproc-per-node=4" in plan.command and "torch.distributed.run" in plan.command


def test_trainer_environment_is_checked(tmp_path: Path) -> None:
    path = write_manifests(tmp_path, UNSLOTH)
    with pytest.raises(RunError, match=r"cannot import unsloth, trl.*KUBETUNE_UNSLOTH_PYTHON"):
        plan_local_run([str(path)], python=sys.executable)


# --- entities with spec.source (issue 17) -----------------------------------------------------


def write_source_manifests(tmp: Path, repo: str = "org/tiny") -> Path:
    """The job's Model comes from the Hub (a claim for the cluster, no localPath); its data is local."""
    (tmp / "data").mkdir()
    entities = [
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "Model",
            "metadata": {"name": "base"},
            "spec": {
                "storage": {"pvc": {"claimName": "models", "path": "base"}},
                "source": {"huggingface": {"repo": repo}},
            },
        },
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "Fileset",
            "metadata": {"name": "train"},
            "spec": {"storage": {"localPath": "data"}},
        },
    ]
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump_all([AUTOMODEL, *entities]))
    return path


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    from support.hfhub import HubServer, tiny_model_files, without_hub_credentials

    without_hub_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path / "cache"))
    with HubServer() as server:
        server.commit("org/tiny", tiny_model_files(hidden=8, vocab=64))
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def test_source_is_fetched_into_the_cache_once_and_the_dry_run_fetches_nothing(hub: Any, tmp_path: Path) -> None:
    import io

    from kubetune.localrun import describe, fetch_sources

    path = write_source_manifests(tmp_path)
    plan = plan_local_run([str(path)], check_environment=False)
    (fetch,) = plan.fetches
    assert fetch.entity == "Model/default/base"
    assert fetch.path.parent == tmp_path / "cache" / "sources" / "huggingface" / "models" / "org" / "tiny"
    assert plan.config["paths"]["model"] == str(fetch.path)
    assert f"fetch: Model/default/base: Hugging Face model org/tiny@main → {fetch.path}" in describe(plan)
    assert hub.requests == []  # planning (and so --dry-run) touches no network

    out = io.StringIO()
    fetch_sources(plan, out)
    assert sorted(p.name for p in fetch.path.iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    asked = len(hub.requests)
    out = io.StringIO()
    fetch_sources(plan_local_run([str(path)], check_environment=False), out)
    assert "already here" in out.getvalue() and len(hub.requests) == asked


def test_source_that_cannot_be_fetched_names_the_entity(hub: Any, tmp_path: Path) -> None:
    from kubetune.localrun import fetch_sources

    plan = plan_local_run([str(write_source_manifests(tmp_path, repo="org/missing"))], check_environment=False)
    with pytest.raises(RunError, match=r"Model/default/base: cannot fetch spec.source: .*'org/missing' was not found"):
        fetch_sources(plan)


def test_entity_without_files_or_source_says_both_fixes(tmp_path: Path) -> None:
    path = write_manifests(tmp_path, AUTOMODEL)
    docs = list(yaml.safe_load_all(path.read_text()))
    del docs[1]["spec"]["storage"]["localPath"]
    path.write_text(yaml.safe_dump_all(docs))
    with pytest.raises(RunError, match=r"no spec.storage.localPath and no spec.source"):
        plan_local_run([str(path)], check_environment=False)
