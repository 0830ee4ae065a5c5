"""The operator on the real control plane: real API server, Job controller,
training-operator and scheduler; kwok plays the kubelet (no GPUs here), so the
trainer containers do not run: pods go Running → Succeeded (or Failed on the
`kubetune.io/fake-fail` annotation). The operator runs as a subprocess under its
own ServiceAccount with exactly the chart's RBAC rules."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from localcluster import free_port

from kubetune.controller.rbac import OPERATOR_RULES
from kubetune.controller.reconciler import PER_JOB_TABLES
from support.helm import render
from support.kube import (
    EXAMPLES,
    LORA,
    OperatorProcess,
    apply,
    get,
    grant_operator,
    install_crds,
    job,
    prepare,
    scrape,
    wait_condition_reason,
    wait_phase,
)

ROOT = Path(__file__).resolve().parents[2]
JOB_EXAMPLES = sorted(p for p in EXAMPLES.glob("*.yaml") if p.name not in ("entities.yaml", "storage.yaml"))


@pytest.fixture(scope="module")
def operator(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    install_crds(cluster)
    kubeconfig = grant_operator(cluster)
    # A short resync period, so that every test here also runs beside level-based passes.
    args = ["--all-namespaces", "--resync-seconds", "20"]
    proc = OperatorProcess(kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log", args)
    proc.start()
    yield proc
    proc.stop()


# A Model that states its size (spec.parameters), for the memory pre-flight check.
LLAMA_8B = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "Model",
    "metadata": {"name": "llama-8b"},
    "spec": {"parameters": 8_030_261_248, "storage": {"pvc": {"claimName": "models", "path": "llama-8b"}}},
}
FOREVER = {"kubetune.io/fake-duration": "600s"}  # a kwok pod that runs while the test looks
UNSLOTH = {"model": {"name": "smollm2-135m"}, "dataset": {"path": "chat-train"}}


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
    # Workers only (no Master: its init container would break "restricted"), one per node.
    assert list(multinode["spec"]["pytorchReplicaSpecs"]) == ["Worker"]
    assert multinode["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    assert multinode["spec"]["elasticPolicy"]["rdzvBackend"] == "c10d"
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
    # The trainer's own error (exit code 1): failed at once, no restart, the class as the reason.
    failed = condition(single, "Failed")
    assert failed["reason"] == "TrainerError" and "failed on request" in failed["message"], failed
    assert "PodFailurePolicy" not in failed["message"] or "FailJob" in failed["message"]
    assert not single["status"].get("restarts")
    multi_body = wait_phase(cluster, operator, "automodeljob", "multi-fails", namespace, {"Failed", "Succeeded"})
    assert multi_body["status"]["phase"] == "Failed"
    assert condition(multi_body, "Failed")["reason"] == "TrainerError"


def test_out_of_memory_restarts_then_fails_with_the_fields_to_lower(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    """A trainer OOMKilled (kwok plays the kernel: exit 137, reason OOMKilled) is retried
    by the Job's backoff (2 retries), each listed in status.restarts with an Event; the
    last one fails the job with reason OutOfMemory and the fields that lower its memory."""
    prepare(cluster, namespace)
    oom = {"kubetune.io/fake-fail": "true", "kubetune.io/fake-exit-code": "137", "kubetune.io/fake-reason": "OOMKilled"}
    apply(cluster, namespace, text=job("AutomodelJob", "oom", LORA, oom))
    body = wait_phase(cluster, operator, "automodeljob", "oom", namespace, {"Failed", "Succeeded"}, timeout=150)
    assert body["status"]["phase"] == "Failed"
    failed = condition(body, "Failed")
    assert failed["reason"] == "OutOfMemory", failed
    assert "OOMKilled" in failed["message"] and "batch.micro_batch_size" in failed["message"], failed
    restarts = body["status"]["restarts"]
    assert [r["failureClass"] for r in restarts] == ["OutOfMemory", "OutOfMemory"], restarts
    assert len({r["pod"] for r in restarts}) == 2 and all(r["time"] for r in restarts)
    events = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=oom", "-o", "json"
    )
    told = [e for e in json.loads(events.stdout)["items"] if e["reason"] == "OutOfMemory"]
    assert {pod for e in told for pod in (r["pod"] for r in restarts) if pod in e["message"]} == {
        r["pod"] for r in restarts
    }


def test_evicted_pod_is_a_preemption_that_resumes(cluster: Any, operator: OperatorProcess, namespace: str) -> None:
    """An eviction through the Eviction API (what a node drain and Kueue's preemption use)
    marks the pod DisruptionTarget: the Job's pod failure policy ignores it (no retry
    spent), the operator lists a Preempted restart, and the job succeeds on a new pod."""
    prepare(cluster, namespace)
    apply(cluster, namespace, text=job("UnslothJob", "drained", UNSLOTH, {"kubetune.io/fake-duration": "8s"}))
    wait_phase(cluster, operator, "unslothjob", "drained", namespace, {"Running"})
    name = _evict_the_running_pod(cluster, namespace, "drained", set())
    done = wait_phase(cluster, operator, "unslothjob", "drained", namespace, {"Succeeded", "Failed"}, timeout=120)
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"], indent=1)
    restarts = done["status"]["restarts"]
    assert [(r["failureClass"], r["pod"]) for r in restarts] == [("Preempted", name)], restarts
    assert "EvictionByEvictionAPI" in restarts[0]["message"], restarts


def test_unschedulable_job_stays_pending_and_says_why(cluster: Any, operator: OperatorProcess, namespace: str) -> None:
    prepare(cluster, namespace)
    # 16 GPUs in one pod, on nodes of 8. (An UnslothJob cannot ask for this: it requests one GPU
    # whatever hardware.gpus lists.)
    spec = {**LORA, "parallelism": {"num_gpus_per_node": 16}, "batch": {"global_batch_size": 16}}
    apply(cluster, namespace, text=job("AutomodelJob", "too-big", spec))
    body = wait_condition_reason(cluster, operator, "automodeljob", "too-big", namespace, "Running", "Unschedulable")
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


def _claim_on_the_same_volume(cluster: Any, namespace: str, claim: str, source_namespace: str) -> None:
    """A claim `claim` in `namespace` statically bound to a PersistentVolume with the same
    backing (host path, for the local cluster's volumes) as `claim` in `source_namespace`."""
    source = get(cluster, "pvc", claim, source_namespace)
    volume = json.loads(cluster.kubectl("get", "pv", source["spec"]["volumeName"], "-o", "json").stdout)
    backing = volume["spec"]["hostPath"]
    pv_name = f"{namespace}-{claim}"
    objects = [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv_name},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "capacity": {"storage": "10Gi"},
                "storageClassName": "",
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": backing,
                "claimRef": {"namespace": namespace, "name": claim},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "10Gi"}},
                "storageClassName": "",
                "volumeName": pv_name,
            },
        },
    ]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))


def test_cross_namespace_reference_needs_consent_and_the_same_volume(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    """A shared entity is mounted through a claim of the job's namespace, and only if that
    claim is bound to the same backing volume as the entity's own claim. A claim that
    merely has the same name (here: another volume) used to be trained on silently."""
    shared = f"{namespace}-shared"
    cluster.create_namespace(shared)
    try:
        prepare(cluster, shared)
        apply(cluster, namespace, EXAMPLES / "storage.yaml")  # models, datasets: other volumes
        spec = {**LORA, "model": f"{shared}/smollm2-135m", "dataset": {"training": f"{shared}/chat-train"}}
        apply(cluster, namespace, text=job("AutomodelJob", "borrow", spec))
        wait_condition_reason(
            cluster, operator, "automodeljob", "borrow", namespace, "ReferencesResolved", "ReferenceForbidden"
        )
        for kind, name in (("models.kubetune.io", "smollm2-135m"), ("filesets.kubetune.io", "chat-train")):
            cluster.kubectl(
                "patch", kind, name, "-n", shared, "--type=merge",
                "-p", json.dumps({"spec": {"sharedWith": [namespace]}}),
            )  # fmt: skip
        body = wait_condition_reason(
            cluster, operator, "automodeljob", "borrow", namespace, "ReferencesResolved", "ClaimNotShared"
        )
        message = condition(body, "ReferencesResolved")["message"]
        assert f"PersistentVolumeClaim models in namespace {namespace} is bound to another volume: Model" in message
        assert not body["status"].get("child")
        for claim in ("models", "datasets"):
            cluster.kubectl("delete", "pvc", claim, "-n", namespace, "--wait=true", "--timeout=60s")
            _claim_on_the_same_volume(cluster, namespace, claim, shared)
        done = wait_phase(cluster, operator, "automodeljob", "borrow", namespace, {"Succeeded", "Failed"})
        assert done["status"]["phase"] == "Succeeded"
    finally:
        cluster.kubectl("delete", "namespace", shared, "--wait=false", check=False)
        for claim in ("models", "datasets"):
            cluster.kubectl("delete", "pv", f"{namespace}-{claim}", "--wait=false", check=False)


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
    assert progress["trainLoss"] == 2.5 and progress["percent"] == 50
    # Steps 3 and 6 came moments apart: a step time is measured, so the column shows an ETA.
    assert progress["summary"].startswith("50% · ETA") and progress["secondsPerStep"] >= 0
    assert "50% · ETA" in cluster.kubectl("get", "automodeljob", "reporting", "-n", namespace).stdout


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


def _trainer_patch(cluster: Any, namespace: str, name: str, trainer: str, status: dict[str, Any]) -> None:
    result = cluster.kubectl(
        "patch", "automodeljob", name, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}), kubeconfig=trainer, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def _wait_status(cluster: Any, namespace: str, name: str, check: Any, what: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = get(cluster, "automodeljob", name, namespace).get("status") or {}
        if check(status):
            return dict(status)
        assert time.monotonic() < deadline, f"{what}; status: {json.dumps(status, indent=1)}"
        time.sleep(0.3)


def test_a_trainer_without_progress_reports_is_stalled(cluster: Any, operator: OperatorProcess, namespace: str) -> None:
    """A running trainer's last progress report is older than stall_timeout_seconds: the job
    gets Stalled=True with the step and how long ago, and a Warning Event; a fresh report
    (the trainer patching progress through its own identity) clears it."""
    from datetime import UTC, datetime, timedelta

    prepare(cluster, namespace)
    spec = {**LORA, "stall_timeout_seconds": 60}
    apply(cluster, namespace, text=job("AutomodelJob", "hung", spec, {"kubetune.io/fake-duration": "90s"}))
    wait_phase(cluster, operator, "automodeljob", "hung", namespace, {"Running"})
    trainer = cluster.service_account_kubeconfig(namespace, "hung-automodel-trainer")

    def report(seconds_ago: int, step: int) -> None:
        at = (datetime.now(UTC) - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
        _trainer_patch(cluster, namespace, "hung", trainer, {"progress": {"step": step, "updatedAt": at}})

    report(seconds_ago=120, step=7)
    status = _wait_status(
        cluster, namespace, "hung", lambda s: any(c["type"] == "Stalled" for c in s.get("conditions") or []), "Stalled"
    )
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "NoProgress"
    assert stalled["message"].startswith("no progress report since step 7, 2m"), stalled
    events = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=hung", "-o", "json"
    )
    assert "Stalled" in {e["reason"] for e in json.loads(events.stdout)["items"]}
    report(seconds_ago=0, step=8)
    _wait_status(
        cluster,
        namespace,
        "hung",
        lambda s: all(c["type"] != "Stalled" for c in s.get("conditions") or []),
        "Stalled cleared by a fresh report",
    )


def test_restart_stalled_evicts_the_hung_pod_and_counts_a_preemption(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    """spec.restart_stalled: the pod that reported progress and then went quiet for
    stall_timeout_seconds is evicted (a Preempted restart, Event StalledRestart); its
    replacement, made after that report, is left to load."""
    from datetime import UTC, datetime

    prepare(cluster, namespace)
    spec = {**LORA, "stall_timeout_seconds": 60, "restart_stalled": True}
    apply(cluster, namespace, text=job("AutomodelJob", "hangs", spec, {"kubetune.io/fake-duration": "600s"}))
    wait_phase(cluster, operator, "automodeljob", "hangs", namespace, {"Running"})
    pods = json.loads(
        cluster.kubectl("get", "pods", "-n", namespace, "-l", "kubetune.io/job-name=hangs", "-o", "json").stdout
    )["items"]
    assert len(pods) == 1
    first = pods[0]["metadata"]["name"]
    # The trainer's one report, a second after its pod started; then nothing (the stall
    # timeout has a 60 s floor, so this test waits that long for a state change).
    time.sleep(1.5)
    trainer = cluster.service_account_kubeconfig(namespace, "hangs-automodel-trainer")
    at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    _trainer_patch(cluster, namespace, "hangs", trainer, {"progress": {"step": 3, "updatedAt": at}})
    status = _wait_status(
        cluster,
        namespace,
        "hangs",
        lambda s: [r.get("failureClass") for r in s.get("restarts") or []] == ["Preempted"],
        "the stalled pod evicted and counted",
        timeout=150,
    )
    assert status["restarts"][0]["pod"] == first
    events = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=hangs", "-o", "json"
    )
    assert "StalledRestart" in {e["reason"] for e in json.loads(events.stdout)["items"]}
    # The replacement runs; passes go on while the job stays Stalled, and do not evict it.
    deadline = time.monotonic() + 60
    while True:
        pods = json.loads(
            cluster.kubectl("get", "pods", "-n", namespace, "-l", "kubetune.io/job-name=hangs", "-o", "json").stdout
        )["items"]
        running = [p for p in pods if p["metadata"]["name"] != first and p["status"].get("phase") == "Running"]
        if running:
            break
        assert time.monotonic() < deadline, [p["metadata"]["name"] for p in pods]
        time.sleep(0.5)
    replacement = running[0]["metadata"]["name"]
    time.sleep(5)
    status = get(cluster, "automodeljob", "hangs", namespace)["status"]
    assert len(status["restarts"]) == 1, status["restarts"]
    pod = get(cluster, "pod", replacement, namespace)
    assert "deletionTimestamp" not in pod["metadata"], "the replacement was evicted too"


def test_a_job_waits_for_the_checkpoint_it_resumes_from_then_mounts_it(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    """spec.resume_from: the job waits (CheckpointNotFound, naming what is listed) until the
    source job's trainer lists the checkpoint, then starts with that checkpoint mounted read
    only from the source job's directory, whatever path the status claims."""
    prepare(cluster, namespace)
    apply(cluster, namespace, text=job("AutomodelJob", "first", LORA, {"kubetune.io/fake-duration": "300s"}))
    wait_phase(cluster, operator, "automodeljob", "first", namespace, {"Running"})
    uid = get(cluster, "automodeljob", "first", namespace)["metadata"]["uid"]
    apply(cluster, namespace, text=job("AutomodelJob", "second", {**LORA, "resume_from": {"job": "first", "step": 4}}))
    status = _wait_status(
        cluster,
        namespace,
        "second",
        lambda s: any(c["reason"] == "CheckpointNotFound" for c in s.get("conditions") or []),
        "waiting for first's checkpoint",
    )
    assert "status.progress.checkpoints: none" in condition({"status": status}, "ReferencesResolved")["message"]

    trainer = cluster.service_account_kubeconfig(namespace, "first-automodel-trainer")
    listed = [{"step": s, "time": "2026-12-02T06:00:00Z", "path": "../other/x"} for s in (2, 4)]
    _trainer_patch(cluster, namespace, "first", trainer, {"progress": {"step": 4, "checkpoints": listed}})
    wait_phase(cluster, operator, "automodeljob", "second", namespace, {"Running", "Succeeded"})
    child = get(cluster, "job", "second-automodel", namespace)
    assert child["metadata"]["annotations"]["kubetune.io/resumed-from"] == "first@4"
    mounts = child["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    resume = next(m for m in mounts if m["mountPath"] == "/kubetune/resume")
    assert resume["subPath"] == f"first/{uid}/checkpoints/step-0000004" and resume["readOnly"] is True
    events = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=second", "-o", "json"
    )
    assert "ResumingFrom" in {e["reason"] for e in json.loads(events.stdout)["items"]}


def test_forged_status_steers_nothing_and_is_overwritten(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    """Status is untrusted input: the trainer's identity may patch all of it. Pointing
    status.child at a Job the operator does not own, with a forged observedGeneration,
    must not make the operator patch that Job (it used to unsuspend it); a forged
    phase, condition or output is replaced by the operator's own view."""
    prepare(cluster, namespace)
    victim = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "victim"},
        "spec": {
            "suspend": True,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "c", "image": "busybox", "command": ["true"]}],
                }
            },
        },
    }
    apply(cluster, namespace, text=yaml.safe_dump(victim))
    apply(cluster, namespace, text=job("AutomodelJob", "mine", LORA, {"kubetune.io/fake-duration": "600s"}))
    wait_phase(cluster, operator, "automodeljob", "mine", namespace, {"Running"})
    trainer = cluster.service_account_kubeconfig(namespace, "mine-automodel-trainer")
    forged_condition = {
        "type": "Succeeded", "status": "True", "reason": "Forged", "message": "",
        "lastTransitionTime": "2020-01-01T00:00:00Z",
    }  # fmt: skip
    _trainer_patch(
        cluster, namespace, "mine", trainer,
        {
            "child": {"apiVersion": "batch/v1", "kind": "Job", "name": "victim"},
            "observedGeneration": 99,
            "conditions": [forged_condition],
            "output": {"model": "forged", "format": "full"},
            "progress": {"step": 2, "maxSteps": 8, "summary": "2/8"},
        },
    )  # fmt: skip
    status = _wait_status(
        cluster, namespace, "mine",
        lambda s: (s.get("child") or {}).get("name") == "mine-automodel" and s.get("observedGeneration") == 1
        and not s.get("output") and all(c["type"] != "Succeeded" for c in s.get("conditions") or []),
        "the operator did not put its own status back",
    )  # fmt: skip
    assert status["phase"] == "Running" and status["progress"]["step"] == 2  # the trainer's part stays
    assert get(cluster, "job", "victim", namespace)["spec"]["suspend"] is True, "the operator patched a foreign Job"
    _trainer_patch(cluster, namespace, "mine", trainer, {"phase": "Succeeded"})
    _wait_status(cluster, namespace, "mine", lambda s: s.get("phase") == "Running", "a forged phase stayed")
    # Suspend still passes through, from the generation recorded on the child.
    cluster.kubectl(
        "patch", "automodeljob", "mine", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": true}}'
    )
    wait_phase(cluster, operator, "automodeljob", "mine", namespace, {"Suspended"})
    child = get(cluster, "job", "mine-automodel", namespace)
    assert child["spec"]["suspend"] is True
    assert child["metadata"]["annotations"]["kubetune.io/spec-generation"] == "2"


def test_child_deleted_by_hand_is_made_again(cluster: Any, operator: OperatorProcess, namespace: str) -> None:
    """A running job whose workload is deleted (by hand, by a cleanup script) does not sit
    in Running forever: the operator makes the child again (the trainer resumes from its
    checkpoint on the output claim) and the job finishes."""
    prepare(cluster, namespace)
    apply(cluster, namespace, text=job("AutomodelJob", "again", LORA, {"kubetune.io/fake-duration": "15s"}))
    wait_phase(cluster, operator, "automodeljob", "again", namespace, {"Running"})
    first = get(cluster, "job", "again-automodel", namespace)["metadata"]["uid"]
    cluster.kubectl("delete", "job", "again-automodel", "-n", namespace, "--cascade=background", "--wait=true")
    done = wait_phase(cluster, operator, "automodeljob", "again", namespace, {"Succeeded", "Failed"}, timeout=120)
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"], indent=1)
    assert get(cluster, "job", "again-automodel", namespace)["metadata"]["uid"] != first
    assert get(cluster, "models.kubetune.io", done["status"]["output"]["model"], namespace)


def test_job_name_that_is_no_dns_label_still_runs_multi_gpu(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    """The training-operator refuses PyTorchJob names that are not DNS-1035 labels: a job
    called `7b-lora` with 2 GPUs used to fail with WorkloadRejected."""
    prepare(cluster, namespace)
    apply(cluster, namespace, text=job("AutomodelJob", "7b-lora", {**LORA, "parallelism": {"num_gpus_per_node": 2}}))
    done = wait_phase(cluster, operator, "automodeljob", "7b-lora", namespace, {"Succeeded", "Failed"}, timeout=120)
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"], indent=1)
    child = done["status"]["child"]
    assert child["kind"] == "PyTorchJob" and child["name"][0].isalpha()
    assert (
        get(cluster, "pytorchjob", child["name"], namespace)["metadata"]["labels"]["kubetune.io/job-name"] == "7b-lora"
    )


def test_trainer_status_policy_lets_a_trainer_write_progress_only(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    """The chart's ValidatingAdmissionPolicy, as `helm template` renders it, on the real API
    server: the trainer's identity may write status.progress, and the server refuses its
    write to any other status field, naming the field. The operator's writes still pass."""
    policy = [d for d in render() if d["kind"].startswith("ValidatingAdmissionPolicy")]
    assert len(policy) == 2
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(policy))
    try:
        prepare(cluster, namespace)
        apply(cluster, namespace, text=job("AutomodelJob", "guarded", LORA, {"kubetune.io/fake-duration": "600s"}))
        wait_phase(cluster, operator, "automodeljob", "guarded", namespace, {"Running"})
        trainer = cluster.service_account_kubeconfig(namespace, "guarded-automodel-trainer")

        def trainer_patch(status: dict[str, Any]) -> Any:
            return cluster.kubectl(
                "patch", "automodeljob", "guarded", "-n", namespace, "--subresource=status", "--type=merge",
                "-p", json.dumps({"status": status}), kubeconfig=trainer, check=False,
            )  # fmt: skip

        deadline = time.monotonic() + 30  # the API server picks a new policy up within a second or so
        while (refused := trainer_patch({"phase": "Succeeded"})).returncode == 0:
            assert time.monotonic() < deadline, "the policy never refused a trainer's write to status.phase"
            time.sleep(0.5)
        assert "status.phase belongs to the kubetune operator" in refused.stderr, refused.stderr
        for field in ({"child": {"apiVersion": "batch/v1", "kind": "Job", "name": "x"}}, {"observedGeneration": 7}):
            result = trainer_patch(field)
            assert result.returncode != 0 and "belongs to the kubetune operator" in result.stderr, field
        allowed = trainer_patch({"progress": {"step": 3, "maxSteps": 9, "summary": "3/9"}})
        assert allowed.returncode == 0, allowed.stderr
        cluster.kubectl(
            "patch", "automodeljob", "guarded", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": true}}'
        )
        body = wait_phase(cluster, operator, "automodeljob", "guarded", namespace, {"Suspended"})
        assert body["status"]["progress"]["step"] == 3
    finally:
        for doc in policy:
            cluster.kubectl("delete", doc["kind"], doc["metadata"]["name"], "--ignore-not-found", check=False)


def test_deleted_trainer_pod_is_replaced_and_the_job_succeeds(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    """A pod deleted mid-run (preemption, drain, `kubectl delete pod`) ends as a kubelet
    ends it: the trainer exits 143 after its SIGTERM checkpoint, which the Job's
    podFailurePolicy does not treat as the trainer's own error. The real Job controller
    replaces the pod and the job succeeds. (kwok's pod-terminate stage plays the kubelet;
    before it, the pod stayed Terminating forever.)"""
    prepare(cluster, namespace)
    apply(cluster, namespace, text=job("UnslothJob", "evicted", UNSLOTH, {"kubetune.io/fake-duration": "8s"}))
    wait_phase(cluster, operator, "unslothjob", "evicted", namespace, {"Running"})
    pods = json.loads(
        cluster.kubectl("get", "pods", "-n", namespace, "-l", "kubetune.io/job-name=evicted", "-o", "json").stdout
    )["items"]
    assert len(pods) == 1
    cluster.kubectl("delete", "pod", pods[0]["metadata"]["name"], "-n", namespace, "--wait=true", "--timeout=60s")
    done = wait_phase(cluster, operator, "unslothjob", "evicted", namespace, {"Succeeded", "Failed"}, timeout=120)
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"], indent=1)
    child = get(cluster, "job", done["status"]["child"]["name"], namespace)
    assert child["status"].get("failed") == 1 and child["status"].get("succeeded") == 1
    restarts = done["status"]["restarts"]
    assert [(r["failureClass"], r["pod"]) for r in restarts] == [("Preempted", pods[0]["metadata"]["name"])]
    assert "exit code 143" in restarts[0]["message"], restarts


def _evict_the_running_pod(cluster: Any, namespace: str, job_name: str, not_these: set[str]) -> str:
    """Evict the job's pod that runs now (not one of `not_these`), through the Eviction API."""
    deadline = time.monotonic() + 60
    while True:
        pods = json.loads(
            cluster.kubectl(
                "get", "pods", "-n", namespace, "-l", f"kubetune.io/job-name={job_name}", "-o", "json"
            ).stdout
        )["items"]
        running = [p["metadata"]["name"] for p in pods if p["status"].get("phase") == "Running"]
        fresh = [str(name) for name in running if name not in not_these]
        if fresh:
            break
        assert time.monotonic() < deadline, f"no new running pod of {job_name}: {[p['metadata']['name'] for p in pods]}"
        time.sleep(0.5)
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": fresh[0], "namespace": namespace}}
    cluster.kubectl(
        "create",
        "--raw",
        f"/api/v1/namespaces/{namespace}/pods/{fresh[0]}/eviction",
        "-f",
        "-",
        input=json.dumps(eviction),
    )
    return fresh[0]


def test_disruptions_have_their_own_budget(cluster: Any, operator: OperatorProcess, namespace: str) -> None:
    """spec.retries.disruptions: 1 allows one preemption; the second fails the job with reason
    Preempted, the budget named, though the Job's own policy would retry disruptions for ever.
    The operator stops the child with a deadline already past, so its pods stay for their logs."""
    prepare(cluster, namespace)
    spec = {**UNSLOTH, "retries": {"disruptions": 1}}
    apply(cluster, namespace, text=job("UnslothJob", "budget", spec, {"kubetune.io/fake-duration": "20s"}))
    wait_phase(cluster, operator, "unslothjob", "budget", namespace, {"Running"})
    first = _evict_the_running_pod(cluster, namespace, "budget", set())
    second = _evict_the_running_pod(cluster, namespace, "budget", {first})
    done = wait_phase(cluster, operator, "unslothjob", "budget", namespace, {"Succeeded", "Failed"}, timeout=90)
    assert done["status"]["phase"] == "Failed", json.dumps(done["status"], indent=1)
    failed = condition(done, "Failed")
    assert failed["reason"] == "Preempted", failed
    assert "2 pods were preempted or lost their node, more than spec.retries.disruptions (1)" in failed["message"]
    assert [r["pod"] for r in done["status"]["restarts"]] == [first], done["status"]["restarts"]
    child = get(cluster, "job", done["status"]["child"]["name"], namespace)
    assert child["metadata"]["annotations"]["kubetune.io/stopped"].startswith("2 pods were preempted")
    assert child["spec"]["activeDeadlineSeconds"] == 1
    assert second != first


def test_image_policy_refuses_images_from_other_registries(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    """The chart's optional image policy on the real API server: with
    imagePolicy.allowedRegistries set, a job whose spec.image is elsewhere is refused,
    naming the field and the chart value; an allowed image and no image pass."""
    policy = [
        d
        for d in render("--set", "imagePolicy.allowedRegistries={registry.example.com/trainers/}")
        if d["kind"].startswith("ValidatingAdmissionPolicy") and d["metadata"]["name"].endswith("-trainer-image")
    ]
    assert len(policy) == 2
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(policy))
    try:
        foreign = job("AutomodelJob", "foreign", {**LORA, "image": "evil.example/miner:1"})
        deadline = time.monotonic() + 30  # the API server picks a new policy up within a second or so
        while (
            refused := cluster.kubectl("apply", "-n", namespace, "-f", "-", input=foreign, check=False)
        ).returncode == 0:
            cluster.kubectl("delete", "automodeljob", "foreign", "-n", namespace, "--wait=false")
            assert time.monotonic() < deadline, "the image policy never refused a foreign image"
            time.sleep(0.5)
        assert "spec.image evil.example/miner:1 is not from an allowed registry" in refused.stderr, refused.stderr
        assert "imagePolicy.allowedRegistries" in refused.stderr
        allowed = job("AutomodelJob", "allowed", {**LORA, "image": "registry.example.com/trainers/automodel:1"})
        apply(cluster, namespace, text=allowed)
        apply(cluster, namespace, text=job("AutomodelJob", "default-image", LORA))
    finally:
        for doc in policy:
            cluster.kubectl("delete", doc["kind"], doc["metadata"]["name"], "--ignore-not-found", check=False)


def enforce_quota(cluster: Any, namespace: str, name: str, hard: dict[str, str]) -> None:
    """A ResourceQuota, once the quota controller has filled its status (before that it is not enforced)."""
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": name}, "spec": {"hard": hard}}
    apply(cluster, namespace, text=yaml.safe_dump(quota))
    deadline = time.monotonic() + 30
    while not (get(cluster, "resourcequota", name, namespace).get("status") or {}).get("hard"):
        assert time.monotonic() < deadline, f"the ResourceQuota {name} never got its status"
        time.sleep(0.3)


def test_quota_refusal_is_shown_and_asked_again(cluster: Any, operator: OperatorProcess, namespace: str) -> None:
    """A ResourceQuota's 403 is a refusal, not a transient error to retry in silence: the
    job shows it (Pending, Created=False QuotaExceeded, the API's words) and starts by
    itself, on the slow backoff, once the quota allows it."""
    prepare(cluster, namespace)
    enforce_quota(cluster, namespace, "no-jobs", {"count/jobs.batch": "0"})
    apply(cluster, namespace, text=job("AutomodelJob", "over-quota", LORA))
    body = wait_condition_reason(cluster, operator, "automodeljob", "over-quota", namespace, "Created", "QuotaExceeded")
    assert body["status"]["phase"] == "Pending"
    assert "exceeded quota" in condition(body, "Created")["message"]
    events = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=over-quota", "-o", "json"
    )
    assert "QuotaExceeded" in {e["reason"] for e in json.loads(events.stdout)["items"]}
    cluster.kubectl("delete", "resourcequota", "no-jobs", "-n", namespace)
    done = wait_phase(cluster, operator, "automodeljob", "over-quota", namespace, {"Succeeded", "Failed"}, timeout=150)
    assert done["status"]["phase"] == "Succeeded"


def test_refused_pod_creation_is_shown(cluster: Any, operator: OperatorProcess, namespace: str) -> None:
    """The child is made but its controller may not make the pods (here a pod quota of 0;
    as well Pod Security or a webhook): only the child's FailedCreate events say so. The
    job shows it (Pending, Running=False PodCreationRefused, the API's words) instead of
    waiting in silence, and runs once the refusal is gone."""
    prepare(cluster, namespace)
    enforce_quota(cluster, namespace, "no-pods", {"pods": "0"})
    apply(cluster, namespace, text=job("AutomodelJob", "no-pods", LORA))
    body = wait_condition_reason(
        cluster, operator, "automodeljob", "no-pods", namespace, "Running", "PodCreationRefused", timeout=90
    )
    assert body["status"]["phase"] == "Pending"
    message = condition(body, "Running")["message"]
    assert "cannot create its pods" in message and "exceeded quota" in message, message
    cluster.kubectl("delete", "resourcequota", "no-pods", "-n", namespace)
    done = wait_phase(cluster, operator, "automodeljob", "no-pods", namespace, {"Succeeded", "Failed"}, timeout=150)
    assert done["status"]["phase"] == "Succeeded"


def test_job_below_the_memory_guideline_gets_a_warning_and_still_runs(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    """A Model that states its parameter count: a full-weight job on one GPU is below the
    seed's guideline for its size (7-8B: 2-4 × 80 GB), so the job carries MemoryRisk=True
    and a Warning Event naming the row, and runs anyway; a LoRA job on one GPU is not."""
    prepare(cluster, namespace)
    apply(cluster, namespace, text=yaml.safe_dump(LLAMA_8B))
    full = {**LORA, "model": "llama-8b", "training": {"finetuning_type": "all_weights"}}
    apply(cluster, namespace, text=job("AutomodelJob", "full-8b", full))
    apply(cluster, namespace, text=job("AutomodelJob", "lora-8b", {**LORA, "model": "llama-8b"}))
    done = wait_phase(cluster, operator, "automodeljob", "full-8b", namespace, {"Succeeded", "Failed"}, timeout=120)
    assert done["status"]["phase"] == "Succeeded"  # a warning, never a refusal
    risk = condition(done, "MemoryRisk")
    assert risk["status"] == "True" and risk["reason"] == "BelowMemoryGuideline"
    assert "7-8B models is 2-4 × 80 GB" in risk["message"] and "asks for 1 GPU(s)" in risk["message"]
    events = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=full-8b", "-o", "json"
    )
    warned = [e for e in json.loads(events.stdout)["items"] if e["reason"] == "MemoryRisk"]
    assert warned and all(e["type"] == "Warning" and "2-4 × 80 GB" in e["message"] for e in warned), warned
    lora = wait_phase(cluster, operator, "automodeljob", "lora-8b", namespace, {"Succeeded", "Failed"}, timeout=120)
    assert lora["status"]["phase"] == "Succeeded"
    assert all(c["type"] != "MemoryRisk" for c in lora["status"]["conditions"])


def test_the_gpu_size_comes_from_the_nodes_feature_discovery_labels(
    cluster: Any, operator: OperatorProcess, namespace: str
) -> None:
    """Without --gpu-memory-gb, the smallest GPU that GPU feature discovery labelled on a
    node (read at each resync) is held against the guideline: a 7-8B LoRA job on one 24 GB
    GPU is below its row's 40 GB, and says which size it assumed."""
    prepare(cluster, namespace)
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    node = next(n["metadata"]["name"] for n in nodes if "nvidia.com/gpu" in (n["status"].get("capacity") or {}))
    apply(cluster, namespace, text=yaml.safe_dump(LLAMA_8B))
    cluster.kubectl("label", "node", node, "nvidia.com/gpu.memory=23028", "--overwrite")
    try:
        apply(cluster, namespace, text=job("AutomodelJob", "lora-8b-small", {**LORA, "model": "llama-8b"}, FOREVER))
        # The resync (every 20 s here) reads the label and passes every job again.
        deadline = time.monotonic() + 90
        while True:
            body = get(cluster, "automodeljob", "lora-8b-small", namespace)
            risk = [c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == "MemoryRisk"]
            if risk:
                break
            assert time.monotonic() < deadline, body.get("status")
            time.sleep(1)
        assert "asks for 1 GPU(s) of 24 GB" in risk[0]["message"] and "7-8B models is 40 GB" in risk[0]["message"]
    finally:
        cluster.kubectl("label", "node", node, "nvidia.com/gpu.memory-")


def test_outputs_never_collide(cluster: Any, operator: OperatorProcess, namespace: str) -> None:
    """An AutomodelJob and an UnslothJob of one name, and a job deleted and applied again
    while its old children are still being removed, each train into their own directory
    (keyed by uid) and produce their own Model; an output name that is already a Model
    this job did not make is refused (the job waits, saying so)."""
    prepare(cluster, namespace)
    apply(cluster, namespace, text=job("AutomodelJob", "same", LORA))
    apply(cluster, namespace, text=job("UnslothJob", "same", UNSLOTH))
    automodel = wait_phase(cluster, operator, "automodeljob", "same", namespace, {"Succeeded", "Failed"})
    unsloth = wait_phase(cluster, operator, "unslothjob", "same", namespace, {"Succeeded", "Failed"})
    assert automodel["status"]["phase"] == unsloth["status"]["phase"] == "Succeeded"
    models = [
        get(cluster, "models.kubetune.io", b["status"]["output"]["model"], namespace) for b in (automodel, unsloth)
    ]
    assert models[0]["metadata"]["name"] != models[1]["metadata"]["name"]
    paths = [m["spec"]["storage"]["pvc"]["path"] for m in models]
    assert paths[0] != paths[1] and all(
        b["metadata"]["uid"] in p for b, p in zip((automodel, unsloth), paths, strict=True)
    )
    for body, model in zip((automodel, unsloth), models, strict=True):
        assert model["metadata"]["labels"]["kubetune.io/job-uid"] == body["metadata"]["uid"]

    taken = job("AutomodelJob", "taken", {**LORA, "output": {"name": "smollm2-135m"}})  # the base model's name
    apply(cluster, namespace, text=taken)
    body = wait_condition_reason(
        cluster, operator, "automodeljob", "taken", namespace, "ReferencesResolved", "OutputNameTaken"
    )
    assert "spec.output.name: Model smollm2-135m already exists" in condition(body, "ReferencesResolved")["message"]
    assert body["status"]["phase"] == "Pending" and not body["status"].get("child")

    # Delete and apply again while the old child is still held (a finalizer stands in for
    # a slow garbage collector): the new job waits, then runs; it used to fail ChildNameTaken.
    slow = {"kubetune.io/fake-duration": "600s"}
    apply(cluster, namespace, text=job("AutomodelJob", "again", LORA, slow))
    first = wait_phase(cluster, operator, "automodeljob", "again", namespace, {"Running"})
    hold = '{"metadata": {"finalizers": ["kubetune.io/test-hold"]}}'
    cluster.kubectl("patch", "job", "again-automodel", "-n", namespace, "--type=merge", "-p", hold)
    cluster.kubectl("delete", "automodeljob", "again", "-n", namespace, "--wait=true", "--timeout=60s")
    apply(cluster, namespace, text=job("AutomodelJob", "again", LORA))
    waiting = wait_condition_reason(
        cluster, operator, "automodeljob", "again", namespace, "ReferencesResolved", "PreviousJobCleanup"
    )
    assert waiting["metadata"]["uid"] != first["metadata"]["uid"]
    cluster.kubectl(
        "patch", "job", "again-automodel", "-n", namespace, "--type=merge", "-p", '{"metadata": {"finalizers": null}}'
    )
    done = wait_phase(cluster, operator, "automodeljob", "again", namespace, {"Succeeded", "Failed"}, timeout=120)
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"], indent=1)
    output = get(cluster, "models.kubetune.io", done["status"]["output"]["model"], namespace)
    assert done["metadata"]["uid"] in output["spec"]["storage"]["pvc"]["path"]


def test_resync_catches_what_the_watches_missed(
    cluster: Any, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    """A watch event that never arrives must not leave a job behind. Here the operator may
    list batch Jobs but not watch them, so it never hears that the child finished: only
    the periodic resync (listing the children afresh) can take the job to Succeeded."""
    operator.stop()
    prepare(cluster, namespace)
    blind = [
        {**r, "verbs": [v for v in r["verbs"] if v != "watch"]} if r["apiGroups"] == ["batch"] else r
        for r in OPERATOR_RULES
    ]
    cluster.kubectl(
        "patch", "clusterrole", "kubetune-operator-test", "--type=merge", "-p", json.dumps({"rules": blind})
    )
    proc = OperatorProcess(
        operator.kubeconfig, tmp_path / "operator.log", ["--all-namespaces", "--resync-seconds", "2"]
    )
    try:
        proc.start()
        apply(cluster, namespace, text=job("AutomodelJob", "unheard", LORA))
        done = wait_phase(cluster, proc, "automodeljob", "unheard", namespace, {"Succeeded", "Failed"}, timeout=60)
        assert done["status"]["phase"] == "Succeeded"
        assert get(cluster, "models.kubetune.io", done["status"]["output"]["model"], namespace)
        assert "resync:" in proc.log_path.read_text()
    finally:
        grant_operator(cluster)
        proc.stop()
        operator.start()


def test_operator_restarted_during_200_jobs_loses_none(cluster: Any, operator: OperatorProcess, namespace: str) -> None:
    """The operator is killed while 200 jobs run; their children finish while it is down.
    After a restart every job reaches its true final phase (some fail on purpose) and
    every succeeded job has its output Model."""
    prepare(cluster, namespace)
    jobs = []
    for i in range(200):
        annotations = {"kubetune.io/fake-duration": f"{3 + i % 5}s"}
        if i % 10 == 0:
            annotations["kubetune.io/fake-fail"] = "true"
        jobs.append(job("AutomodelJob", f"r{i:03d}", LORA, annotations))
    apply(cluster, namespace, text="\n---\n".join(jobs))

    def phases() -> dict[str, str | None]:
        items = json.loads(cluster.kubectl("get", "automodeljobs", "-n", namespace, "-o", "json").stdout)["items"]
        return {i["metadata"]["name"]: (i.get("status") or {}).get("phase") for i in items}

    deadline = time.monotonic() + 120
    while sum(p in ("Running", "Succeeded", "Failed") for p in phases().values()) < 60:
        operator.check_alive()
        assert time.monotonic() < deadline, "60 jobs never got going"
        time.sleep(0.5)
    operator.kill()
    time.sleep(10)  # children finish while nobody watches
    finished_unseen = sum(p not in ("Succeeded", "Failed") for p in phases().values())
    operator.start()
    deadline = time.monotonic() + 300
    while True:
        current = phases()
        if all(p in ("Succeeded", "Failed") for p in current.values()):
            break
        operator.check_alive()
        pending = sorted(n for n, p in current.items() if p not in ("Succeeded", "Failed"))
        assert time.monotonic() < deadline, f"not finished: {pending[:10]}...; log {operator.log_path}"
        time.sleep(1)
    expected = {f"r{i:03d}": "Failed" if i % 10 == 0 else "Succeeded" for i in range(200)}
    assert current == expected
    models = json.loads(cluster.kubectl("get", "models.kubetune.io", "-n", namespace, "-o", "json").stdout)["items"]
    made = {(m["metadata"].get("labels") or {}).get("kubetune.io/job-name") for m in models}
    assert made >= {name for name, phase in expected.items() if phase == "Succeeded"}
    assert finished_unseen > 0  # the test did make the operator catch up on something


def test_two_replicas_one_leads_and_the_other_takes_over(
    cluster: Any, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    """replicas: 2 is safe. Two operators with --leader-elect: one holds the Lease and
    works, the other waits; the leader is killed (SIGKILL, no goodbye) while jobs are
    being created, the other takes the Lease over and every job converges, each with
    exactly one child."""
    operator.stop()
    prepare(cluster, namespace)
    lease = "kubetune-operator"
    cluster.kubectl("delete", "lease", lease, "-n", "kubetune-system", "--ignore-not-found")
    args = [
        "--all-namespaces",
        "--leader-elect",
        "--leader-election-namespace",
        "kubetune-system",
        "--lease-seconds",
        "4",
    ]
    first = OperatorProcess(operator.kubeconfig, tmp_path / "first.log", args).start()
    second: OperatorProcess | None = None
    try:

        def holder() -> str:
            result = cluster.kubectl("get", "lease", lease, "-n", "kubetune-system", "-o", "json", check=False)
            return str(json.loads(result.stdout)["spec"]["holderIdentity"]) if result.returncode == 0 else ""

        deadline = time.monotonic() + 30
        while not holder():
            first.check_alive()
            assert time.monotonic() < deadline, f"no leader; log {first.log_path}"
            time.sleep(0.3)
        leader = holder()
        port = free_port()
        second = OperatorProcess(
            operator.kubeconfig, tmp_path / "second.log", [*args, "--health-port", str(port)]
        ).start()
        deadline = time.monotonic() + 30  # a cold Python start takes seconds on a loaded machine
        while "waits for lease" not in second.log_path.read_text():
            second.check_alive()
            assert time.monotonic() < deadline, f"the second replica did not wait; log {second.log_path}"
            time.sleep(0.3)
        assert "leads" not in second.log_path.read_text()
        # A waiting replica is alive: its liveness probe must pass, or the kubelet restarts it in a loop.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            assert answer.status == 200
        apply(cluster, namespace, text="\n---\n".join(job("AutomodelJob", f"ha{i}", LORA) for i in range(10)))
        first.kill()
        apply(cluster, namespace, text="\n---\n".join(job("AutomodelJob", f"ha{i}", LORA) for i in range(10, 20)))
        for i in range(20):
            wait_phase(cluster, second, "automodeljob", f"ha{i}", namespace, {"Succeeded"}, timeout=120)
        assert holder() not in ("", leader)
        children = json.loads(cluster.kubectl("get", "jobs", "-n", namespace, "-o", "json").stdout)["items"]
        owners = sorted(c["metadata"]["labels"]["kubetune.io/job-name"] for c in children)
        assert owners == sorted(f"ha{i}" for i in range(20))
    finally:
        first.stop()
        if second is not None:
            second.stop()
        cluster.kubectl("delete", "lease", lease, "-n", "kubetune-system", "--ignore-not-found", check=False)
        operator.start()


def test_pytorchjob_kind_installed_after_the_operator(
    cluster: Any, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    """The training-operator may be installed after kubetune. A multi-GPU job then waits,
    saying what is missing (it used to wait in silence, and its PyTorchJob was never
    watched even once the kind existed); when the CRD appears the operator restarts
    itself to watch it, and the job runs."""
    crd_name = "pytorchjobs.kubeflow.org"
    crd = json.loads(cluster.kubectl("get", "crd", crd_name, "-o", "json").stdout)
    for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
        crd["metadata"].pop(key, None)
    crd.pop("status", None)
    operator.stop()
    prepare(cluster, namespace)
    cluster.kubectl("delete", "crd", crd_name, "--wait=true", "--timeout=60s")
    proc = OperatorProcess(
        operator.kubeconfig, tmp_path / "operator.log", ["--all-namespaces", "--resync-seconds", "2"]
    )
    try:
        proc.start()
        apply(cluster, namespace, text=job("AutomodelJob", "late", {**LORA, "parallelism": {"num_gpus_per_node": 2}}))
        body = wait_condition_reason(
            cluster, proc, "automodeljob", "late", namespace, "Created", "PyTorchJobNotInstalled"
        )
        assert "install the Kubeflow training-operator" in condition(body, "Created")["message"]
        cluster.kubectl("create", "-f", "-", input=json.dumps(crd))
        deadline = time.monotonic() + 60  # polled: kubectl wait fails on a CRD with no conditions yet
        while not any(
            c["type"] == "Established" and c["status"] == "True"
            for c in (get(cluster, "crd", crd_name, "default").get("status") or {}).get("conditions") or []
        ):
            assert time.monotonic() < deadline, "the PyTorchJob CRD never became Established"
            time.sleep(0.3)
        done = wait_phase(cluster, proc, "automodeljob", "late", namespace, {"Succeeded", "Failed"}, timeout=180)
        assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"], indent=1)
        assert "installed after the operator started: restarting to watch it" in proc.log_path.read_text()
    finally:
        if cluster.kubectl("get", "crd", crd_name, check=False).returncode != 0:
            cluster.kubectl("create", "-f", "-", input=json.dumps(crd))
        proc.stop()
        operator.start()


def test_no_per_job_state_outlives_its_jobs(
    cluster: Any, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    """Memory stays bounded: jobs that succeeded, failed or waited for a reference are
    deleted, and every per-job table of the operator empties again, as its /metrics
    shows (kubetune_tracked_entries). Before, a child's or pod's event after its job was
    deleted made a lock (and kept the trainer's exit reasons) for good. The same scrape
    shows the operator's counters move: passes, API requests, watch events, and jobs by
    phase."""
    operator.stop()
    prepare(cluster, namespace)
    port = free_port()
    proc = OperatorProcess(
        operator.kubeconfig, tmp_path / "operator.log", ["--namespace", namespace, "--metrics-port", str(port)]
    )
    try:
        proc.start()
        jobs = [job("AutomodelJob", f"ok{i}", LORA) for i in range(12)]
        jobs += [job("AutomodelJob", f"bad{i}", LORA, {"kubetune.io/fake-fail": "true"}) for i in range(4)]
        jobs += [job("UnslothJob", f"us{i}", UNSLOTH) for i in range(4)]
        jobs += [job("AutomodelJob", f"wait{i}", {**LORA, "model": "no-such-model"}) for i in range(4)]
        apply(cluster, namespace, text="\n---\n".join(jobs))
        for i in range(12):
            wait_phase(cluster, proc, "automodeljob", f"ok{i}", namespace, {"Succeeded"}, timeout=180)
        for i in range(4):
            wait_phase(cluster, proc, "automodeljob", f"bad{i}", namespace, {"Failed"}, timeout=120)
            wait_phase(cluster, proc, "unslothjob", f"us{i}", namespace, {"Succeeded"}, timeout=120)
            wait_condition_reason(
                cluster, proc, "automodeljob", f"wait{i}", namespace, "ReferencesResolved", "ReferenceNotFound"
            )
        busy = scrape(port)
        by_phase = {
            (dict(labels)["kind"], dict(labels)["phase"]): value
            for (name, labels), value in busy.items()
            if name == "kubetune_jobs"
        }
        assert by_phase == {
            ("AutomodelJob", "Failed"): 4,
            ("AutomodelJob", "Pending"): 4,
            ("AutomodelJob", "Succeeded"): 12,
            ("UnslothJob", "Succeeded"): 4,
        }, by_phase
        assert busy[("kubetune_tracked_entries", (("table", "jobs"),))] == 24
        passes = sum(v for (n, _), v in busy.items() if n == "kubetune_reconcile_passes_total")
        assert passes >= 24, busy
        patches = busy.get(("kubetune_api_request_duration_seconds_count", (("code", "200"), ("verb", "PATCH"))), 0)
        assert patches >= 24, "every job's status was written"
        assert busy[("kubetune_watch_events_total", (("resource", "Pod"), ("type", "MODIFIED")))] > 0
        lagged = busy[("kubetune_watch_event_lag_seconds_count", (("resource", "Pod"),))]
        assert lagged > 0 and busy[("kubetune_watch_event_lag_seconds_sum", (("resource", "Pod"),))] >= 0
        failures = (("failure_class", "TrainerError"), ("kind", "AutomodelJob"))
        assert busy[("kubetune_pod_failures_total", failures)] == 4, "each bad job's one pod, by its class"
        assert busy[("kubetune_leader", ())] == 1
        assert busy[("process_resident_memory_bytes", ())] > 10e6

        cluster.kubectl("delete", "automodeljobs,unslothjobs", "--all", "-n", namespace, "--wait=true", timeout=120)
        deadline = time.monotonic() + 90
        while True:
            left = {
                table: value
                for (name, labels), value in scrape(port).items()
                if name == "kubetune_tracked_entries" and (table := dict(labels)["table"]) in PER_JOB_TABLES and value
            }
            pods = cluster.kubectl("get", "pods,jobs", "-n", namespace, "-o", "name").stdout.split()
            if not left and not pods:
                break
            assert time.monotonic() < deadline, (
                f"per-job state left after every job, child and pod was deleted: {left}; objects left: {pods}; "
                f"log {proc.log_path}"
            )
            time.sleep(1)
    finally:
        proc.stop()
        operator.start()
