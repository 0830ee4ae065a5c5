"""Entities that download themselves (issue 17), on the real control plane.

kwok plays the kubelet, so the initializer Job's pod does not run the download. The test
runs the very command the operator put in that Job as a process here instead: the Job's
arguments, its env with the Secret keys resolved, the token of the initializer's own
ServiceAccount, and a temporary directory in place of the mounted claim. The Hub is the
Hub-compatible test server (tests/support/hfhub.py) on loopback, named to the operator by
--hf-endpoint, as a private hub would be.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from localcluster import free_port

from kubetune_api import constants as c
from support.hfhub import HubServer, tiny_model_files
from support.kube import OperatorProcess, get, grant_operator, install_crds, wait_condition_reason, wait_phase

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TOKEN = "hf-good-token"


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    with HubServer(tokens={TOKEN}) as server:
        server.commit("org/tiny", tiny_model_files())
        yield server


@pytest.fixture(scope="module")
def operator(cluster: Any, hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    install_crds(cluster)
    kubeconfig = grant_operator(cluster)
    args = ["--all-namespaces", "--resync-seconds", "20", "--hf-endpoint", hub.url]
    proc = OperatorProcess(kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log", args)
    proc.start()
    yield proc
    proc.stop()


def apply(cluster: Any, namespace: str, text: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=text)


def model(name: str, repo: str, revision: str = "main", token_secret: str | None = None) -> str:
    hf: dict[str, Any] = {"repo": repo, "revision": revision}
    if token_secret:
        hf["tokenSecret"] = {"name": token_secret}
    spec = {"storage": {"pvc": {"claimName": "models", "path": name}}, "source": {"huggingface": hf}}
    body = {"apiVersion": "kubetune.io/v1alpha1", "kind": "Model", "metadata": {"name": name}, "spec": spec}
    return yaml.safe_dump(body)


def lora_job(name: str, model_name: str) -> str:
    spec = {"model": model_name, "dataset": {"training": "chat-train"}}
    return yaml.safe_dump(
        {"apiVersion": "kubetune.io/v1alpha1", "kind": "AutomodelJob", "metadata": {"name": name}, "spec": spec}
    )


def prepare(cluster: Any, namespace: str) -> None:
    for path in (EXAMPLES / "storage.yaml", EXAMPLES / "entities.yaml"):
        cluster.kubectl("apply", "-n", namespace, "-f", str(path))


def initializer_jobs(cluster: Any, namespace: str, entity: str, kind: str = "Model") -> list[dict[str, Any]]:
    selector = f"kubetune.io/entity-kind={kind},kubetune.io/entity-name={entity}"
    listed = cluster.kubectl("get", "jobs", "-n", namespace, "-l", selector, "-o", "json")
    return list(json.loads(listed.stdout)["items"])


def wait_initializer(
    cluster: Any, namespace: str, entity: str, not_these: frozenset[str] | set[str] = frozenset(), kind: str = "Model"
) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        listed = initializer_jobs(cluster, namespace, entity, kind)
        jobs = [j for j in listed if j["metadata"]["name"] not in not_these]
        if jobs:
            assert len(jobs) == 1, [j["metadata"]["name"] for j in jobs]
            return jobs[0]
        assert time.monotonic() < deadline, f"no initializer Job for {kind} {entity}"
        time.sleep(0.3)


def run_initializer(
    cluster: Any, namespace: str, job: dict[str, Any], claim_root: Path, python: Sequence[str] = (sys.executable,)
) -> subprocess.CompletedProcess[str]:
    """The Job's container as a process here: its command, its env (Secret keys read from
    the Secrets), the token of its ServiceAccount, and `claim_root` for the mounted claim.
    `python`: the interpreter (the image's stand-in: an environment with the source's client)."""
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    command = [f"--root={claim_root}" if a.startswith("--root=") else a for a in container["command"]]
    assert f"--root={c.FETCH_MOUNT}" in container["command"]
    assert command[:3] == ["python", "-m", "kubetune_fetch"]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT / "operator")}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"].replace("/tmp", str(claim_root.parent / "tmp"))
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        secret = json.loads(
            cluster.kubectl("get", "secret", ref["name"], "-n", namespace, "-o", "json", check=False).stdout or "{}"
        )
        value = (secret.get("data") or {}).get(ref["key"])
        if value is None:
            assert ref.get("optional"), f"Secret {ref['name']} has no key {ref['key']}"
            continue
        env[item["name"]] = base64.b64decode(value).decode()
    account = claim_root.parent / "serviceaccount"
    account.mkdir(parents=True, exist_ok=True)
    token = cluster.kubectl("create", "token", pod["serviceAccountName"], "-n", namespace).stdout.strip()
    (account / "token").write_text(token)
    (account / "ca.crt").write_bytes(cluster.pki.ca_crt.read_bytes())
    return subprocess.run(
        [*python, *command[1:], f"--api-server={cluster.server}", f"--service-account-dir={account}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(cond for cond in body["status"]["conditions"] if cond["type"] == type_)


def test_download_makes_the_entity_ready_and_the_waiting_jobs_start(
    cluster: Any, operator: OperatorProcess, hub: HubServer, namespace: str, tmp_path: Path
) -> None:
    # The API server's Pod Security admission refuses any pod of this namespace that is not "restricted".
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    prepare(cluster, namespace)
    apply(cluster, namespace, model("tiny", "org/tiny"))
    apply(cluster, namespace, lora_job("first", "tiny"))
    apply(cluster, namespace, lora_job("second", "tiny"))
    for name in ("first", "second"):
        waiting = wait_condition_reason(
            cluster, operator, "automodeljob", name, namespace, "ReferencesResolved", "Downloading"
        )
        assert waiting["status"]["phase"] == "Pending"
        assert "org/tiny@main" in condition(waiting, "ReferencesResolved")["message"]
    entity = wait_condition_reason(cluster, operator, "model", "tiny", namespace, "Ready", "Downloading")
    assert entity["status"]["ready"] is False
    # Two jobs, one download.
    job = wait_initializer(cluster, namespace, "tiny")
    time.sleep(1)
    assert len(initializer_jobs(cluster, namespace, "tiny")) == 1
    # Its pod was admitted under "restricted" (kwok then plays it; the download runs below).
    deadline = time.monotonic() + 30
    selector = f"job-name={job['metadata']['name']}"
    while not json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout)["items"]:
        assert time.monotonic() < deadline, cluster.kubectl("get", "events", "-n", namespace).stdout
        time.sleep(0.3)

    claim = tmp_path / "claim" / "tiny"
    done = run_initializer(cluster, namespace, job, claim)
    assert done.returncode == 0, done.stderr + done.stdout
    entity = wait_condition_reason(cluster, operator, "model", "tiny", namespace, "Ready", "Ready")
    download = entity["status"]["download"]
    files = tiny_model_files()
    assert download["phase"] == "Complete" and download["filesDone"] == download["filesTotal"] == len(files)
    assert download["bytesDone"] == download["bytesTotal"] == sum(len(b) for b in files.values())
    assert download["resolved"].startswith("commit ") and "reason" not in download  # null cleared it
    assert download["parameters"] == 2 * 4096 * 64 + 64, "embeddings, head and norm of tiny_model_files()"
    version = download["version"]
    assert (claim / version / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert (claim / f"{version}.complete.json").is_file()

    for name in ("first", "second"):
        started = wait_phase(cluster, operator, "automodeljob", name, namespace, {"Running", "Succeeded"})
        assert condition(started, "ReferencesResolved")["status"] == "True"
        child = get(cluster, "job", f"{name}-automodel", namespace)
        mounts = child["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        model_mount = next(m for m in mounts if m["mountPath"] == "/kubetune/model")
        assert model_mount["subPath"] == f"tiny/{version}"  # the version, pinned in the child
    assert len(initializer_jobs(cluster, namespace, "tiny")) == 1

    # A re-created entity: a new initializer Job, which finds the marker and downloads nothing.
    weights_fetched = len(hub.downloads("model.safetensors"))
    cluster.kubectl("delete", "model", "tiny", "-n", namespace)
    apply(cluster, namespace, model("tiny", "org/tiny"))
    again = wait_initializer(cluster, namespace, "tiny", not_these={job["metadata"]["name"]})
    rerun = run_initializer(cluster, namespace, again, claim)
    assert rerun.returncode == 0, rerun.stderr + rerun.stdout
    assert "nothing downloaded" in rerun.stdout
    assert len(hub.downloads("model.safetensors")) == weights_fetched
    wait_condition_reason(cluster, operator, "model", "tiny", namespace, "Ready", "Ready")


def test_a_new_revision_downloads_again_and_started_jobs_keep_theirs(
    cluster: Any, operator: OperatorProcess, hub: HubServer, namespace: str, tmp_path: Path
) -> None:
    prepare(cluster, namespace)
    hub.commit("org/moving", {"config.json": b'{"v": 1}', "weights.bin": b"one" * 1000})
    hub.tag("org/moving", "v1", hub.repos[("model", "org/moving")].refs["main"])
    apply(cluster, namespace, model("moving", "org/moving", revision="v1"))
    claim = tmp_path / "claim" / "moving"
    first = run_initializer(cluster, namespace, wait_initializer(cluster, namespace, "moving"), claim)
    assert first.returncode == 0, first.stderr
    old = wait_condition_reason(cluster, operator, "model", "moving", namespace, "Ready", "Ready")
    apply(cluster, namespace, lora_job("early", "moving"))
    wait_phase(cluster, operator, "automodeljob", "early", namespace, {"Running", "Succeeded"})

    v2 = hub.commit("org/moving", {"config.json": b'{"v": 2}', "weights.bin": b"two" * 1000})
    hub.tag("org/moving", "v2", v2)
    old_job = initializer_jobs(cluster, namespace, "moving")[0]["metadata"]["name"]
    apply(cluster, namespace, model("moving", "org/moving", revision="v2"))
    wait_condition_reason(cluster, operator, "model", "moving", namespace, "Ready", "Downloading")
    apply(cluster, namespace, lora_job("late", "moving"))
    wait_condition_reason(cluster, operator, "automodeljob", "late", namespace, "ReferencesResolved", "Downloading")
    second = run_initializer(cluster, namespace, wait_initializer(cluster, namespace, "moving", {old_job}), claim)
    assert second.returncode == 0, second.stderr
    new = wait_condition_reason(cluster, operator, "model", "moving", namespace, "Ready", "Ready")
    old_version, new_version = old["status"]["download"]["version"], new["status"]["download"]["version"]
    assert old_version != new_version and old_version.startswith("v1-") and new_version.startswith("v2-")
    assert (claim / old_version / "config.json").read_bytes() == b'{"v": 1}'  # left for the jobs on it
    assert (claim / new_version / "config.json").read_bytes() == b'{"v": 2}'
    wait_phase(cluster, operator, "automodeljob", "late", namespace, {"Running", "Succeeded"})

    def model_subpath(job: str) -> str:
        child = get(cluster, "job", f"{job}-automodel", namespace)
        mounts = child["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        return str(next(m for m in mounts if m["mountPath"] == "/kubetune/model")["subPath"])

    assert model_subpath("early") == f"moving/{old_version}"
    assert model_subpath("late") == f"moving/{new_version}"


def test_a_failed_download_shows_its_cause_on_the_entity_and_the_waiting_job(
    cluster: Any, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    prepare(cluster, namespace)
    apply(cluster, namespace, model("ghost", "org/missing"))
    apply(cluster, namespace, lora_job("haunted", "ghost"))
    failed = run_initializer(cluster, namespace, wait_initializer(cluster, namespace, "ghost"), tmp_path / "ghost")
    assert failed.returncode == 1, failed.stderr
    entity = wait_condition_reason(cluster, operator, "model", "ghost", namespace, "Ready", "DownloadNotFound")
    assert "org/missing" in condition(entity, "Ready")["message"]
    assert entity["status"]["download"]["phase"] == "Failed" and entity["status"]["download"]["reason"] == "NotFound"
    waiting = wait_condition_reason(
        cluster, operator, "automodeljob", "haunted", namespace, "ReferencesResolved", "DownloadNotFound"
    )
    message = condition(waiting, "ReferencesResolved")["message"]
    assert "org/missing" in message and "was not found" in message and waiting["status"]["phase"] == "Pending"

    # Deleted by hand (to try again at once after its retries ran out): made again.
    first = wait_initializer(cluster, namespace, "ghost")
    cluster.kubectl("delete", "job", first["metadata"]["name"], "-n", namespace, "--wait=false")
    deadline = time.monotonic() + 30
    while True:
        again = initializer_jobs(cluster, namespace, "ghost")
        if again and again[0]["metadata"]["uid"] != first["metadata"]["uid"]:
            break
        assert time.monotonic() < deadline, "the deleted initializer Job was not made again"
        time.sleep(0.3)
    assert [j["metadata"]["name"] for j in again] == [first["metadata"]["name"]]

    # A wrong token, from the entity's Secret: the Hub's refusal, named.
    cluster.kubectl("create", "secret", "generic", "hub-token", "-n", namespace, "--from-literal=token=wrong")
    apply(cluster, namespace, model("locked", "org/tiny", token_secret="hub-token"))
    job = wait_initializer(cluster, namespace, "locked")
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hub-token", "key": "token"}
    refused = run_initializer(cluster, namespace, job, tmp_path / "locked")
    assert refused.returncode == 1, refused.stderr
    locked = wait_condition_reason(cluster, operator, "model", "locked", namespace, "Ready", "DownloadUnauthorized")
    assert "tokenSecret" in condition(locked, "Ready")["message"]

    # The initializer's identity may write its own entity's status only.
    other = cluster.kubectl(
        "patch", "model", "smollm2-135m", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", '{"status": {"ready": true}}',
        kubeconfig=cluster.service_account_kubeconfig(namespace, "ghost-model-fetch"), check=False,
    )  # fmt: skip
    assert other.returncode != 0 and "forbidden" in other.stderr.lower()


def test_an_entity_made_before_its_claim_starts_downloading_when_the_claim_comes(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, model("early", "org/tiny").replace("claimName: models", "claimName: later"))
    wait_condition_reason(cluster, operator, "model", "early", namespace, "Ready", "ClaimNotFound")
    assert initializer_jobs(cluster, namespace, "early") == []
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "later"},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    apply(cluster, namespace, yaml.safe_dump(claim))
    job = wait_initializer(cluster, namespace, "early")
    assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "later"}
    wait_condition_reason(cluster, operator, "model", "early", namespace, "Ready", "Downloading")


# The S3 side runs in the dev environment (hack/run-in-venv.sh dev), which has boto3 and moto:
# the cluster tier's own environment carries the trainer's packages instead.
DEV = ["bash", str(ROOT / "hack" / "run-in-venv.sh"), "dev"]


@pytest.fixture(scope="module")
def dev_python() -> str:
    """The dev environment's interpreter (built once by hack/venv.sh, cached afterwards)."""
    found = subprocess.run(
        [*DEV, "python", "-c", "import sys; print(sys.executable)"], capture_output=True, text=True, timeout=600
    )
    assert found.returncode == 0, found.stderr
    return found.stdout.strip()


@pytest.fixture
def s3_server(tmp_path: Path) -> Iterator[str]:
    """moto's S3 server on loopback, a real S3 HTTP endpoint (SigV4, ranges, ETags)."""
    port = free_port()
    log = (tmp_path / "moto.log").open("wb")
    proc = subprocess.Popen(
        [*DEV, "moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, f"moto did not start: {tmp_path}/moto.log"
                time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=15)


def s3_put(endpoint: str, path: str, body: bytes = b"") -> None:
    # moto takes unsigned writes; octet-stream, or the body would be read as a form.
    request = urllib.request.Request(f"{endpoint}/{path}", data=body, method="PUT")
    request.add_header("Content-Type", "application/octet-stream")
    urllib.request.urlopen(request, timeout=10).close()


def test_the_sources_example_reaches_succeeded_with_no_file_copied_by_hand(
    cluster: Any,
    operator: OperatorProcess,
    hub: HubServer,
    s3_server: str,
    dev_python: str,
    namespace: str,
    tmp_path: Path,
) -> None:
    """examples/sources/lora-from-sources.yaml as written, but for the S3 endpoint (the test's
    server): its Model from the (test) Hub, its Fileset from S3, its job Succeeded."""
    files = tiny_model_files(seed=3)
    hub.commit("HuggingFaceTB/SmolLM2-135M-Instruct", {**files, "notes.md": b"not in allowPatterns"})
    rows = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    s3_put(s3_server, "datasets")
    s3_put(s3_server, "datasets/chat/train/part-0.jsonl", rows * 50)
    s3_put(s3_server, "datasets/chat/train/part-1.jsonl", rows * 30)
    s3_put(s3_server, "datasets/chat/validation/other.jsonl", rows)  # outside the prefix
    cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES / "storage.yaml"))
    cluster.kubectl(
        "create", "secret", "generic", "s3-keys", "-n", namespace,
        "--from-literal=AWS_ACCESS_KEY_ID=testing", "--from-literal=AWS_SECRET_ACCESS_KEY=testing",
    )  # fmt: skip
    example = (EXAMPLES / "sources" / "lora-from-sources.yaml").read_text()
    assert "http://minio.storage:9000" in example
    apply(cluster, namespace, example.replace("http://minio.storage:9000", s3_server))
    job_name = "smollm2-lora-from-sources"
    wait_condition_reason(cluster, operator, "automodeljob", job_name, namespace, "ReferencesResolved", "Downloading")

    model_dir, data_dir = tmp_path / "models" / "hub", tmp_path / "datasets" / "s3"
    hf = run_initializer(cluster, namespace, wait_initializer(cluster, namespace, "smollm2-135m-hub"), model_dir)
    assert hf.returncode == 0, hf.stderr + hf.stdout
    s3_job = wait_initializer(cluster, namespace, "chat-train-s3", kind="Fileset")
    s3 = run_initializer(cluster, namespace, s3_job, data_dir, python=[dev_python])
    assert s3.returncode == 0, s3.stderr + s3.stdout

    done = wait_phase(cluster, operator, "automodeljob", job_name, namespace, {"Succeeded", "Failed"}, timeout=120)
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"], indent=1)
    model_version = get(cluster, "model", "smollm2-135m-hub", namespace)["status"]["download"]["version"]
    data = get(cluster, "fileset", "chat-train-s3", namespace)["status"]["download"]
    assert data["filesTotal"] == 2 and data["resolved"].startswith("2 objects")
    assert sorted(p.name for p in (data_dir / data["version"]).iterdir()) == ["part-0.jsonl", "part-1.jsonl"]
    assert sorted(p.name for p in (model_dir / model_version).iterdir()) == sorted(
        n for n in files if n.endswith((".json", ".safetensors", ".txt"))
    )
    child = get(cluster, "job", f"{job_name}-automodel", namespace)
    mounts = {m["mountPath"]: m for m in child["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["/kubetune/model"]["subPath"] == f"hub/smollm2-135m-instruct/{model_version}"
    assert mounts["/kubetune/data/training"]["subPath"] == f"s3/chat-train/{data['version']}"
