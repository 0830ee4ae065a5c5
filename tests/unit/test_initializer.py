"""The initializer (issue 17): its pure builders, the readiness judgement of an entity with
spec.source, the mount a job pins, and the entry point's status reports."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.resources import AUTOMODEL
from kubetune.controller.builders import (
    RESTRICTED_CONTAINER_SECURITY,
    InitializerSettings,
    JobInputs,
    build_batch_job,
)
from kubetune.controller.entities import entity_message
from kubetune.controller.initializer import (
    INITIALIZER_BACKOFF_LIMIT,
    EntityRef,
    build_initializer,
    build_initializer_identity,
    build_initializer_job,
    initializer_name,
)
from kubetune.controller.references import resolve_references
from kubetune.controller.world import World, entity_record, source_version
from kubetune_api import constants as c
from kubetune_api.automodel import AutomodelJobSpec
from kubetune_api.entities import DownloadStatus, EntityStatus
from kubetune_fetch.__main__ import Reporter, download_status, resolved_summary
from kubetune_fetch.layout import Marker, parse_source, version_name
from kubetune_fetch.transfer import Progress

HF_SOURCE = {"huggingface": {"repo": "org/tiny", "revision": "main", "tokenSecret": {"name": "hub", "key": "tok"}}}
S3_SOURCE = {"s3": {"bucket": "data", "prefix": "chat/", "credentialsSecret": {"name": "s3-keys"}}}


def model(source: dict[str, Any] = HF_SOURCE, path: str = "models/tiny", name: str = "tiny") -> EntityRef:
    spec = {"storage": {"pvc": {"claimName": "models", "path": path}}, "source": source}
    return EntityRef(kind=c.KIND_MODEL, namespace="team", name=name, uid="u-1", spec=spec)


def env_of(job: dict[str, Any]) -> dict[str, Any]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_initializer_job_is_restricted_and_mounts_the_claim_path() -> None:
    settings = InitializerSettings(image="reg.example/kubetune-operator:1", hf_endpoint="http://hub.local")
    job = build_initializer_job(model(), settings)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["securityContext"] == RESTRICTED_CONTAINER_SECURITY
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == c.TRAINER_UID
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "GPU" not in str(container["resources"]) and c.GPU_RESOURCE not in container["resources"]["requests"]
    assert container["image"] == "reg.example/kubetune-operator:1"
    assert container["command"][:3] == ["python", "-m", "kubetune_fetch"]
    assert f"--root={c.FETCH_MOUNT}" in container["command"] and "--uid=u-1" in container["command"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[c.FETCH_MOUNT]["subPath"] == "models/tiny" and not mounts[c.FETCH_MOUNT].get("readOnly")
    assert "/tmp" in mounts  # the only other writable place: the root filesystem is read-only
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["files"]["persistentVolumeClaim"] == {"claimName": "models"}
    assert pod["restartPolicy"] == "OnFailure" and job["spec"]["backoffLimit"] == INITIALIZER_BACKOFF_LIMIT
    assert pod["serviceAccountName"] == "tiny-model-fetch"
    owner = job["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "Model" and owner["uid"] == "u-1" and owner["controller"] is True
    # Not a job's child: no job label, so the job passes never take it for one.
    assert c.LABEL_JOB_NAME not in job["metadata"]["labels"]
    assert job["metadata"]["labels"][c.LABEL_ENTITY_KIND] == "Model"


def test_initializer_env_carries_the_endpoint_and_the_secrets() -> None:
    env = env_of(build_initializer_job(model(), InitializerSettings(hf_endpoint="http://hub.local")))
    assert env["HF_ENDPOINT"] == "http://hub.local"
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hub", "key": "tok"}}
    assert env["HF_HOME"].startswith("/tmp")
    assert not any(k.startswith("AWS_") for k in env)
    s3 = env_of(build_initializer_job(model(S3_SOURCE), InitializerSettings(hf_endpoint="http://hub.local")))
    assert "HF_ENDPOINT" not in s3 and "HF_TOKEN" not in s3
    assert s3["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-keys", "key": "AWS_ACCESS_KEY_ID"}}
    assert s3["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3-keys", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert s3["AWS_SESSION_TOKEN"]["secretKeyRef"]["optional"] is True
    anonymous = env_of(build_initializer_job(model({"huggingface": {"repo": "org/tiny"}}), InitializerSettings()))
    assert "HF_TOKEN" not in anonymous and "HF_ENDPOINT" not in anonymous


def test_initializer_identity_may_only_patch_its_entitys_status() -> None:
    account, role, binding = build_initializer_identity(model())
    assert account["kind"] == "ServiceAccount" and account["metadata"]["name"] == "tiny-model-fetch"
    assert role["rules"] == [
        {"apiGroups": [c.GROUP], "resources": ["models/status"], "resourceNames": ["tiny"], "verbs": ["get", "patch"]}
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tiny-model-fetch", "namespace": "team"}]
    fileset = EntityRef(kind=c.KIND_FILESET, namespace="team", name="tiny", uid="u", spec=model().spec)
    assert build_initializer_identity(fileset)[1]["rules"][0]["resources"] == ["filesets/status"]
    assert [o["kind"] for o in build_initializer(model(), InitializerSettings())] == [
        "ServiceAccount", "Role", "RoleBinding", "Job"
    ]  # fmt: skip


def test_initializer_name_is_stable_and_new_for_a_new_source_or_entity() -> None:
    name = initializer_name(model())
    assert name == initializer_name(model()) and len(name) <= 63
    other_revision = copy.deepcopy(HF_SOURCE)
    other_revision["huggingface"]["revision"] = "v2"
    assert initializer_name(model(other_revision)) != name
    recreated = EntityRef(kind=c.KIND_MODEL, namespace="team", name="tiny", uid="u-2", spec=model().spec)
    assert initializer_name(recreated) != name
    long = initializer_name(model(name="a." * 100 + "b"))
    assert len(long) <= 63 and long.replace("-", "").isalnum()


def _record(download: dict[str, Any] | None, phase: str | None = "Bound", source: dict[str, Any] = HF_SOURCE) -> Any:
    spec = model(source).spec
    return entity_record(c.KIND_MODEL, "team", "tiny", spec, phase, source_version(c.KIND_MODEL, spec), download)


def test_a_sourced_entity_is_ready_only_when_its_version_is_downloaded() -> None:
    version = source_version(c.KIND_MODEL, model().spec)
    assert version == version_name(parse_source("Model", HF_SOURCE)) and version.startswith("main-")
    waiting = _record(None, phase="Pending")  # a claim that binds on first use waits for the initializer
    assert not waiting.ready and waiting.not_ready_reason == "Downloading"
    assert "waiting for its initializer Job" in waiting.not_ready_message
    going = _record({"version": version, "phase": "Downloading", "summary": "1/3 files, 1.0 KB of 3.0 KB, 1.0 KB/s"})
    assert going.not_ready_reason == "Downloading" and going.not_ready_message.endswith("1.0 KB/s")
    assert entity_message(going).endswith("progress in status.download")  # no per-report rewrite
    failed = _record({"version": version, "phase": "Failed", "reason": "NotFound", "message": "org/tiny not found"})
    assert failed.not_ready_reason == "DownloadNotFound" and "org/tiny not found" in failed.not_ready_message
    older = _record({"version": "v1-abc", "phase": "Complete"})  # an earlier revision's report
    assert not older.ready and older.not_ready_reason == "Downloading"
    done = _record({"version": version, "phase": "Complete"})
    assert done.ready and done.claim_path == f"models/tiny/{version}"
    assert _record({"version": version, "phase": "Complete"}, phase=None).not_ready_reason == "ClaimNotFound"
    by_hand = entity_record(c.KIND_MODEL, "team", "tiny", {"storage": model().spec["storage"]}, "Bound")
    assert by_hand.ready and by_hand.claim_path == "models/tiny"


def test_waiting_jobs_see_the_download_and_a_started_job_pins_the_version() -> None:
    world = World()
    key = (c.KIND_MODEL, "team", "smol")
    spec = {**model().spec, "storage": {"pvc": {"claimName": "models"}}}
    world.entities[key] = spec
    world.entities[(c.KIND_FILESET, "team", "chat")] = {"storage": {"pvc": {"claimName": "data"}}}
    world.claims[("team", "models")] = world.claims[("team", "data")] = "Bound"
    world.versions[key] = version = source_version(c.KIND_MODEL, spec)
    job = AutomodelJobSpec.model_validate({"model": "smol", "dataset": {"training": "chat"}})
    world.downloads[key] = {"version": version, "phase": "Downloading", "summary": "2/5 files"}
    waiting = resolve_references(job, "team", world.lookup)
    assert [p.reason for p in waiting.problems] == ["Downloading"] and waiting.problems[0].waiting
    assert "2/5 files" in waiting.problems[0].message
    world.downloads[key] = {"version": version, "phase": "Failed", "reason": "Unauthorized", "message": "bad token"}
    failed = resolve_references(job, "team", world.lookup)
    assert failed.problems[0].reason == "DownloadUnauthorized" and failed.problems[0].waiting
    assert "bad token" in failed.problems[0].message
    world.downloads[key] = {"version": version, "phase": "Complete"}
    ready = resolve_references(job, "team", world.lookup)
    assert not ready.problems
    inputs = JobInputs(resource=AUTOMODEL, name="j", namespace="team", uid="u", spec=job, entities=ready.entities)
    mounts = build_batch_job(inputs)["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "claim-0", "mountPath": c.MODEL_MOUNT, "readOnly": True, "subPath": version} in mounts
    data = next(m for m in mounts if m["mountPath"] == c.TRAINING_DATA_MOUNT)
    assert "subPath" not in data  # a hand-filled claim's root, as before


def test_entry_point_reports_are_the_typed_download_status() -> None:
    progress = Progress(files_done=1, files_total=3, bytes_done=10, bytes_total=30, bytes_per_second=5.0)
    status = download_status("main-abc", "Downloading", progress)
    dumped = status.model_dump(mode="json", by_alias=True, exclude_unset=True)
    assert dumped["filesDone"] == 1 and dumped["bytesTotal"] == 30 and dumped["bytesPerSecond"] == 5.0
    assert dumped["reason"] is None  # sent as null: a later attempt clears an earlier failure
    assert EntityStatus.model_validate({"download": dumped}).download == status
    failed = download_status("main-abc", "Failed", None, reason="NotFound", message="gone")
    assert failed.phase == "Failed" and failed.reason == "NotFound" and failed.files_total == 0
    marker = Marker(identity={}, resolved={"revision": "abc123"}, files=1, bytes=1, completed_at="t")
    assert resolved_summary(marker) == "commit abc123"
    etags = Marker(identity={}, resolved={"etags": {"a": "1", "b": "2"}}, files=2, bytes=2, completed_at="t")
    assert resolved_summary(etags).startswith("2 objects, ETags ")


def test_reporter_sends_the_first_report_then_at_most_one_per_interval() -> None:
    sent: list[DownloadStatus] = []
    reporter = Reporter(sent.append, "main-abc", every=3600)
    for done in range(5):
        reporter(Progress(done, 5, done, 5, 1.0))
    assert [s.files_done for s in sent] == [0]  # the rest within the interval
    assert reporter.last is not None and reporter.last.files_done == 4


@pytest.mark.parametrize("kind", [c.KIND_MODEL, c.KIND_FILESET])
def test_parse_source_reads_the_kinds_default_repo_type(kind: str) -> None:
    source = parse_source(kind, {"huggingface": {"repo": "org/x"}})
    assert source.huggingface is not None
    assert source.huggingface.repoType == ("dataset" if kind == c.KIND_FILESET else "model")


def test_an_initializer_that_gave_up_says_so_and_how_to_try_again() -> None:
    spec = model().spec
    version = source_version(c.KIND_MODEL, spec)
    stopped = "BackoffLimitExceeded: Job has reached the specified backoff limit"
    failed = {"version": version, "phase": "Failed", "reason": "Unauthorized", "message": "bad token"}
    record = entity_record(c.KIND_MODEL, "team", "tiny", spec, "Bound", version, failed, stopped)
    assert record.not_ready_reason == "DownloadUnauthorized"
    assert "bad token" in record.not_ready_message and "delete that Job to try again" in record.not_ready_message
    assert "tries again with backoff" not in record.not_ready_message
    silent = entity_record(c.KIND_MODEL, "team", "tiny", spec, "Bound", version, None, stopped)
    assert silent.not_ready_reason == "InitializerFailed" and "BackoffLimitExceeded" in silent.not_ready_message
    # A Job of this entity that gave up counts only while it is the current version's.
    world = World()
    key = (c.KIND_MODEL, "team", "tiny")
    world.entities[key], world.claims[("team", "models")], world.versions[key] = spec, "Bound", version
    world.initializer_names[key] = "tiny-model-fetch-new"
    world.initializers_stopped[("team", "tiny-model-fetch-old")] = stopped
    looked_up = world.lookup(*key)
    assert looked_up is not None and looked_up.not_ready_reason == "Downloading"
    world.initializers_stopped[("team", "tiny-model-fetch-new")] = stopped
    looked_up = world.lookup(*key)
    assert looked_up is not None and looked_up.not_ready_reason == "InitializerFailed"


def test_the_parameter_count_comes_from_the_safetensors_headers(tmp_path: Path) -> None:
    """What the initializer reports for a Model (status.download.parameters), and the memory
    check's use of it: only for the source's current version, and never over spec.parameters."""
    from kubetune_fetch.weights import safetensors_parameters
    from support.hfhub import safetensors_bytes

    shard = tmp_path / "model"
    shard.mkdir()
    (shard / "model-00001-of-00002.safetensors").write_bytes(safetensors_bytes({"a": ([3, 4], bytes(48))}))
    (shard / "model-00002-of-00002.safetensors").write_bytes(safetensors_bytes({"b": ([5], bytes(20))}))
    assert safetensors_parameters(shard) == 3 * 4 + 5
    assert safetensors_parameters(tmp_path / "nothing-here") is None
    (shard / "broken.safetensors").write_bytes(b"\xff" * 8)
    assert safetensors_parameters(shard) is None, "a header that cannot be read gives no count, not a wrong one"

    world = World()
    key = (c.KIND_MODEL, "team-a", "tiny")
    world.versions[key] = "main-abc"
    world.downloads[key] = {"version": "main-abc", "phase": "Complete", "parameters": 17}
    assert world.downloaded_parameters(key) == 17
    world.versions[key] = "v2-def"  # a new revision is downloading: the old count is not its
    assert world.downloaded_parameters(key) is None
