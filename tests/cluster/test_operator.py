"""The operator on the real control plane: real API server, Job controller,
training-operator and scheduler; kwok plays the kubelet (no GPUs here), so the
trainer containers do not run: pods go Running → Succeeded (or Failed on the
`kubetune.io/fake-fail` annotation). The operator runs as a subprocess under its
own ServiceAccount with exactly the chart's RBAC rules."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.controller.rbac import OPERATOR_RULES
from support.kube import OperatorProcess, get, grant_operator, install_crds, wait_condition_reason, wait_phase

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
JOB_EXAMPLES = sorted(p for p in EXAMPLES.glob("*.yaml") if p.name not in ("entities.yaml", "storage.yaml"))


@pytest.fixture(scope="module")
def operator(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    install_crds(cluster)
    kubeconfig = grant_operator(cluster)
    proc = OperatorProcess(kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log", ["--all-namespaces"])
    proc.start()
    yield proc
    proc.stop()


def apply(cluster: Any, namespace: str, *paths: Path, text: str | None = None) -> None:
    if text is not None:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=text)
    for path in paths:
        cluster.kubectl("apply", "-n", namespace, "-f", str(path))


def prepare(cluster: Any, namespace: str) -> None:
    apply(cluster, namespace, EXAMPLES / "storage.yaml", EXAMPLES / "entities.yaml")


def job(kind: str, name: str, spec: dict[str, Any], annotations: dict[str, str] | None = None) -> str:
    meta: dict[str, Any] = {"name": name}
    if annotations:
        meta["annotations"] = annotations
    return yaml.safe_dump({"apiVersion": "kubetune.io/v1alpha1", "kind": kind, "metadata": meta, "spec": spec})


LORA = {"model": "smollm2-135m", "dataset": {"training": "chat-train"}}


def condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in body["status"]["conditions"] if c["type"] == type_)


def test_every_example_reaches_succeeded(cluster: Any, operator: OperatorProcess, namespace: str) -> None:
    prepare(cluster, namespace)
    apply(cluster, namespace, *JOB_EXAMPLES)
    names = [
        (yaml.safe_load(p.read_text())["kind"].lower(), yaml.safe_load(p.read_text())["metadata"]["name"])
        for p in JOB_EXAMPLES
    ]
    for kind, name in names:
        body = wait_phase(cluster, operator, kind, name, namespace, {"Succeeded", "Failed"}, timeout=180)
        assert body["status"]["phase"] == "Succeeded", json.dumps(body["status"], indent=1)
        result = cluster.kubectl(
            "wait", f"{kind}/{name}", "-n", namespace, "--for=condition=Succeeded", "--timeout=10s"
        )
        assert "condition met" in result.stdout
        status = body["status"]
        assert status["gpus"] >= 1 and status["child"]["name"] and status["startTime"] and status["completionTime"]
        assert status["observedGeneration"] == body["metadata"]["generation"]
        output = get(cluster, "models.kubetune.io", status["output"]["model"], namespace)
        assert output["spec"]["format"] == status["output"]["format"]
    multinode = get(cluster, "pytorchjob", "smollm2-full-multinode-automodel", namespace)
    assert multinode["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    table = cluster.kubectl("get", "automodeljobs,unslothjobs", "-n", namespace).stdout
    assert table.count("Succeeded") == len(JOB_EXAMPLES), table
    assert "smollm2-135m" in table and "all_weights" in table
    events = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=smollm2-lora", "-o", "json"
    )
    reasons = {e["reason"] for e in json.loads(events.stdout)["items"]}
    assert "Completed" in reasons, reasons


def test_pod_failure_fails_the_job_with_the_child_reason(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    prepare(cluster, namespace)
    fail = {"kubetune.io/fake-fail": "true"}
    apply(cluster, namespace, text=job("AutomodelJob", "single-fails", LORA, fail))
    multi = {**LORA, "parallelism": {"num_gpus_per_node": 2}}
    apply(cluster, namespace, text=job("AutomodelJob", "multi-fails", multi, fail))
    single = wait_phase(cluster, operator, "automodeljob", "single-fails", namespace, {"Failed", "Succeeded"})
    assert single["status"]["phase"] == "Failed"
    assert condition(single, "Failed")["reason"] == "PodFailurePolicy"
    multi_body = wait_phase(cluster, operator, "automodeljob", "multi-fails", namespace, {"Failed", "Succeeded"})
    assert multi_body["status"]["phase"] == "Failed"
    assert condition(multi_body, "Failed")["reason"] == "PyTorchJobFailed"


def test_unschedulable_job_stays_pending_and_says_why(cluster: Any, operator: OperatorProcess, namespace: str) -> None:
    prepare(cluster, namespace)
    spec = {
        "model": {"name": "smollm2-135m"},
        "dataset": {"path": "chat-train"},
        "hardware": {"gpus": "0,1,2,3,4,5,6,7,8"},
    }
    apply(cluster, namespace, text=job("UnslothJob", "too-big", spec))
    body = wait_condition_reason(cluster, operator, "unslothjob", "too-big", namespace, "Running", "Unschedulable")
    assert body["status"]["phase"] == "Pending"
    assert "nvidia.com/gpu" in condition(body, "Running")["message"]


def test_missing_reference_blocks_until_the_entity_appears(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, EXAMPLES / "storage.yaml")
    apply(cluster, namespace, text=job("AutomodelJob", "early", LORA))
    deadline = time.monotonic() + 30
    while True:
        body = get(cluster, "automodeljob", "early", namespace)
        if (body.get("status") or {}).get("conditions"):
            break
        assert time.monotonic() < deadline, f"no condition; log {operator.log_path}"
        time.sleep(0.3)
    refs = condition(body, "ReferencesResolved")
    assert refs["status"] == "False" and refs["reason"] == "ReferenceNotFound"
    assert "spec.model: Model" in refs["message"] and "smollm2-135m not found" in refs["message"]
    assert not body["status"].get("child")
    assert cluster.kubectl("get", "jobs", "-n", namespace, "-o", "name").stdout.strip() == ""
    apply(cluster, namespace, EXAMPLES / "entities.yaml")
    done = wait_phase(cluster, operator, "automodeljob", "early", namespace, {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Succeeded"


def test_cross_namespace_reference_needs_consent(cluster: Any, operator: OperatorProcess, namespace: str) -> None:
    shared = f"{namespace}-shared"
    cluster.create_namespace(shared)
    try:
        prepare(cluster, shared)
        prepare(cluster, namespace)
        spec = {**LORA, "model": f"{shared}/smollm2-135m"}
        apply(cluster, namespace, text=job("AutomodelJob", "borrow", spec))
        wait_condition_reason(
            cluster, operator, "automodeljob", "borrow", namespace, "ReferencesResolved", "ReferenceForbidden"
        )
        cluster.kubectl(
            "patch",
            "models.kubetune.io",
            "smollm2-135m",
            "-n",
            shared,
            "--type=merge",
            "-p",
            json.dumps({"spec": {"sharedWith": [namespace]}}),
        )
        done = wait_phase(cluster, operator, "automodeljob", "borrow", namespace, {"Succeeded", "Failed"})
        assert done["status"]["phase"] == "Succeeded"
    finally:
        cluster.kubectl("delete", "namespace", shared, "--wait=false", check=False)


def test_suspend_passes_through_and_resumes(cluster: Any, operator: OperatorProcess, namespace: str) -> None:
    prepare(cluster, namespace)
    apply(cluster, namespace, text=job("AutomodelJob", "queued", {**LORA, "suspend": True}))
    body = wait_phase(cluster, operator, "automodeljob", "queued", namespace, {"Suspended"})
    assert get(cluster, "job", body["status"]["child"]["name"], namespace)["spec"]["suspend"] is True
    cluster.kubectl(
        "patch", "automodeljob", "queued", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": false}}'
    )
    done = wait_phase(cluster, operator, "automodeljob", "queued", namespace, {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Succeeded"


def test_delete_cascades_to_the_workload(cluster: Any, operator: OperatorProcess, namespace: str) -> None:
    prepare(cluster, namespace)
    slow = {"kubetune.io/fake-duration": "600s"}
    apply(
        cluster, namespace, text=job("AutomodelJob", "doomed", {**LORA, "parallelism": {"num_gpus_per_node": 2}}, slow)
    )
    body = wait_phase(cluster, operator, "automodeljob", "doomed", namespace, {"Running"})
    child = body["status"]["child"]["name"]
    cluster.kubectl("delete", "automodeljob", "doomed", "-n", namespace, "--wait=true", "--timeout=60s")
    deadline = time.monotonic() + 60
    while cluster.kubectl("get", "pytorchjob", child, "-n", namespace, check=False).returncode == 0:
        assert time.monotonic() < deadline, "the PyTorchJob outlived its AutomodelJob"
        time.sleep(0.5)
    while cluster.kubectl("get", "configmap", "doomed-automodel-config", "-n", namespace, check=False).returncode == 0:
        assert time.monotonic() < deadline, "the ConfigMap outlived its AutomodelJob"
        time.sleep(0.5)


def test_trainer_identity_patches_only_its_own_job(cluster: Any, operator: OperatorProcess, namespace: str) -> None:
    prepare(cluster, namespace)
    slow = {"kubetune.io/fake-duration": "600s"}
    apply(cluster, namespace, text=job("AutomodelJob", "mine", LORA, slow))
    apply(cluster, namespace, text=job("AutomodelJob", "other", LORA, slow))
    wait_phase(cluster, operator, "automodeljob", "mine", namespace, {"Running"})
    trainer = cluster.service_account_kubeconfig(namespace, "mine-automodel-trainer")
    progress = {"status": {"progress": {"step": 5, "maxSteps": 10, "summary": "5/10", "trainLoss": 1.25}}}

    def patch_status(name: str) -> Any:
        return cluster.kubectl(
            "patch", "automodeljob", name, "-n", namespace, "--subresource=status", "--type=merge",
            "-p", json.dumps(progress), kubeconfig=trainer, check=False,
        )  # fmt: skip

    ok = patch_status("mine")
    assert ok.returncode == 0, ok.stderr
    denied = patch_status("other")
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
    spec_patch = cluster.kubectl(
        "patch",
        "automodeljob",
        "mine",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"suspend": true}}',
        kubeconfig=trainer,
        check=False,
    )
    assert spec_patch.returncode != 0 and "forbidden" in spec_patch.stderr.lower()
    table = cluster.kubectl("get", "automodeljob", "mine", "-n", namespace).stdout
    assert "5/10" in table and "Running" in table
    time.sleep(1)  # the operator's next status write must keep the trainer's progress
    assert get(cluster, "automodeljob", "mine", namespace)["status"]["progress"]["step"] == 5


def test_trainer_reports_progress_through_the_mounted_config(
    cluster: Any, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    """Both ends of the progress contract: the trainer's own reporter, built from the
    config.json the operator mounted, with the per-job ServiceAccount's token, patches
    status.progress through the real API server and the CRD's status schema."""
    from kubetune_trainer.common.config import load_config
    from kubetune_trainer.common.progress import ProgressReporter

    prepare(cluster, namespace)
    apply(cluster, namespace, text=job("AutomodelJob", "reporting", LORA, {"kubetune.io/fake-duration": "600s"}))
    wait_phase(cluster, operator, "automodeljob", "reporting", namespace, {"Running"})
    config = get(cluster, "configmap", "reporting-automodel-config", namespace)["data"]["config.json"]
    (tmp_path / "config.json").write_text(config)
    account = tmp_path / "serviceaccount"
    account.mkdir()
    token = cluster.kubectl("create", "token", "reporting-automodel-trainer", "-n", namespace).stdout.strip()
    (account / "token").write_text(token)
    (account / "ca.crt").write_bytes(cluster.pki.ca_crt.read_bytes())
    reporter = ProgressReporter.from_config(
        load_config(tmp_path / "config.json"), rank=0, service_account_dir=account, api_server=cluster.server
    )
    reporter.report(step=3, max_steps=12, epoch=0.25, train_loss=2.5)
    reporter.report(step=6, max_steps=12, epoch=0.5, validation_loss=2.25)
    reporter.close()
    assert reporter.patches_failed == 0 and reporter.patches_sent >= 1
    progress = get(cluster, "automodeljob", "reporting", namespace)["status"]["progress"]
    assert progress["step"] == 6 and progress["maxSteps"] == 12 and progress["validationLoss"] == 2.25
    assert progress["trainLoss"] == 2.5 and progress["summary"].startswith("6/12")
    assert "6/12" in cluster.kubectl("get", "automodeljob", "reporting", "-n", namespace).stdout


def test_operator_killed_mid_reconcile_makes_exactly_one_child(
    cluster: Any, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    prepare(cluster, namespace)
    operator.stop()
    try:
        jobs = "\n---\n".join(job("AutomodelJob", f"k{i}", LORA) for i in range(20))
        apply(cluster, namespace, text=jobs)
        for attempt in range(3):
            operator.start()
            time.sleep(0.4 + 0.3 * attempt)
            operator.kill()
        operator.start()
        for i in range(20):
            wait_phase(cluster, operator, "automodeljob", f"k{i}", namespace, {"Succeeded"}, timeout=180)
        children = json.loads(cluster.kubectl("get", "jobs", "-n", namespace, "-o", "json").stdout)["items"]
        owners = [c["metadata"]["labels"]["kubetune.io/job-name"] for c in children]
        assert sorted(owners) == sorted(f"k{i}" for i in range(20))
    finally:
        if operator.proc is None or operator.proc.poll() is not None:
            operator.start()


def test_fifty_jobs_at_once(cluster: Any, operator: OperatorProcess, namespace: str) -> None:
    prepare(cluster, namespace)
    apply(cluster, namespace, text="\n---\n".join(job("AutomodelJob", f"j{i:02d}", LORA) for i in range(50)))
    deadline = time.monotonic() + 300
    while True:
        operator.check_alive()
        items = json.loads(cluster.kubectl("get", "automodeljobs", "-n", namespace, "-o", "json").stdout)["items"]
        phases = [(i.get("status") or {}).get("phase") for i in items]
        if phases.count("Succeeded") == 50:
            break
        assert time.monotonic() < deadline, f"phases: {sorted(map(str, phases))}; log {operator.log_path}"
        time.sleep(1)


def test_transient_api_errors_are_retried_not_lost(
    cluster: Any, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    """A watch event comes once: when the API refuses a request for a while (here RBAC
    denies creating ConfigMaps), the operator retries with backoff and the job starts
    once the request can succeed."""
    operator.stop()
    prepare(cluster, namespace)
    limited = [r for r in OPERATOR_RULES if "configmaps" not in r["resources"]]
    cluster.kubectl(
        "patch", "clusterrole", "kubetune-operator-test", "--type=merge", "-p", json.dumps({"rules": limited})
    )
    proc = OperatorProcess(operator.kubeconfig, tmp_path / "operator.log", ["--all-namespaces"]).start()
    try:
        apply(cluster, namespace, text=job("AutomodelJob", "patient", LORA))
        deadline = time.monotonic() + 60
        while "retrying in" not in proc.log_path.read_text():
            proc.check_alive()
            assert time.monotonic() < deadline, f"no retry logged; log {proc.log_path}"
            time.sleep(0.3)
        assert not (get(cluster, "automodeljob", "patient", namespace).get("status") or {}).get("child")
        grant_operator(cluster)  # the full rules again
        done = wait_phase(cluster, proc, "automodeljob", "patient", namespace, {"Succeeded", "Failed"}, timeout=120)
        assert done["status"]["phase"] == "Succeeded"
    finally:
        grant_operator(cluster)
        proc.stop()
        operator.start()


def test_namespaced_mode_needs_only_a_role(
    cluster: Any, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    operator.stop()  # only the namespaced operator may act here
    prepare(cluster, namespace)
    kubeconfig = grant_operator(cluster, namespace=namespace)
    proc = OperatorProcess(kubeconfig, tmp_path / "operator.log", ["--namespace", namespace]).start()
    try:
        apply(cluster, namespace, text=job("AutomodelJob", "scoped", LORA))
        done = wait_phase(cluster, proc, "automodeljob", "scoped", namespace, {"Succeeded", "Failed"})
        assert done["status"]["phase"] == "Succeeded"
    finally:
        proc.stop()
        operator.start()
