"""The local control plane behaves like a cluster with GPU nodes: scheduling, the
training-operator's PyTorchJob flow, kwok's fake pod lifecycle (success and the
fail annotation), volume binding, RBAC for a non-admin identity and garbage
collection. Pods never run: kwok (a fake kubelet) moves their status."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from localcluster import (
    CPU_NODES,
    FAKE_FAIL_ANNOTATION,
    GPU_NODES,
    STORAGE_CLASS,
    LocalCluster,
    free_port,
)

IMAGE = "kubetune.invalid/noop:0"  # never pulled: kwok has no container runtime


def apply(cluster: LocalCluster, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))


def get(cluster: LocalCluster, *args: str) -> dict[str, Any]:
    return cluster.get_json(*args)


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() -> None:
    """The components' ports: an ephemeral one could be taken by any of the cluster's own
    outgoing connections before its component binds it (kwok lost its port so once)."""
    floor = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports), "a port was handed out twice"
    if floor > 11000:  # room below the range (Linux's default range starts at 32768)
        assert all(10000 <= p < floor for p in ports), [p for p in ports if not 10000 <= p < floor]
    for port in ports[:20]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for cond in obj.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == ctype:
            return dict(cond)
    return None


def pytorchjob(
    name: str, namespace: str, *, gpus: int, pod_annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    def replica(replicas: int) -> dict[str, Any]:
        return {
            "replicas": replicas,
            "restartPolicy": "Never",
            "template": {
                "metadata": {"annotations": pod_annotations or {}},
                "spec": {
                    "containers": [
                        {
                            "name": "pytorch",
                            "image": IMAGE,
                            "command": ["torchrun", "train.py"],
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                        }
                    ]
                },
            },
        }

    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "nprocPerNode": str(gpus),
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 0},
            "pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(1)},
        },
    }


def job_condition_true(cluster: LocalCluster, namespace: str, name: str, ctype: str) -> bool:
    cond = condition(get(cluster, "pytorchjob", name, "-n", namespace), ctype)
    return cond is not None and cond.get("status") == "True"


def test_nodes_report_gpus(cluster: LocalCluster) -> None:
    nodes = {n["metadata"]["name"]: n for n in get(cluster, "nodes")["items"]}
    for name in GPU_NODES:
        assert nodes[name]["status"]["allocatable"].get("nvidia.com/gpu") == "8", nodes[name]["status"]
        assert nodes[name]["status"]["capacity"].get("nvidia.com/gpu") == "8"
    for name in CPU_NODES:
        assert "nvidia.com/gpu" not in nodes[name]["status"]["allocatable"]
    for node in nodes.values():
        ready = condition(node, "Ready")
        assert ready is not None and ready["status"] == "True", node["metadata"]["name"]


def test_pytorchjob_is_scheduled_on_gpu_nodes_gets_torch_env_and_succeeds(
    cluster: LocalCluster, namespace: str
) -> None:
    apply(cluster, pytorchjob("ok", namespace, gpus=4))
    cluster.wait_for(
        "PyTorchJob ok to succeed",
        lambda: job_condition_true(cluster, namespace, "ok", "Succeeded"),
        logs=("training-operator", "kwok", "kube-scheduler"),
    )
    pods = get(cluster, "pods", "-n", namespace, "-l", "training.kubeflow.org/job-name=ok")["items"]
    assert len(pods) == 2
    ranks = {}
    for pod in pods:
        labels = pod["metadata"]["labels"]
        assert pod["spec"]["nodeName"] in GPU_NODES, pod["spec"].get("nodeName")
        assert pod["status"]["phase"] == "Succeeded"
        container = next(c for c in pod["spec"]["containers"] if c["name"] == "pytorch")
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env["MASTER_ADDR"] == "ok-master-0", env
        assert env["MASTER_PORT"] == "23456", env
        assert env["WORLD_SIZE"] == "8", env
        assert env["PET_NNODES"] == "2", env
        assert env["PET_NPROC_PER_NODE"] == "4", env
        assert env["PET_NODE_RANK"] == env["RANK"], env
        ranks[labels["training.kubeflow.org/replica-type"]] = env["RANK"]
    assert ranks == {"master": "0", "worker": "1"}


def test_pytorchjob_whose_pods_are_told_to_fail_fails(cluster: LocalCluster, namespace: str) -> None:
    apply(cluster, pytorchjob("boom", namespace, gpus=1, pod_annotations={FAKE_FAIL_ANNOTATION: "true"}))
    cluster.wait_for(
        "PyTorchJob boom to fail",
        lambda: job_condition_true(cluster, namespace, "boom", "Failed"),
        logs=("training-operator", "kwok"),
    )
    assert not job_condition_true(cluster, namespace, "boom", "Succeeded")
    phases = {p["status"]["phase"] for p in get(cluster, "pods", "-n", namespace)["items"]}
    assert "Failed" in phases


def test_training_operator_webhook_refuses_a_pytorchjob_without_a_pytorch_container(
    cluster: LocalCluster, namespace: str
) -> None:
    job = pytorchjob("badname", namespace, gpus=1)
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        replica["template"]["spec"]["containers"][0]["name"] = "trainer"
    refused = cluster.kubectl("apply", "-f", "-", input=json.dumps(job), check=False)
    assert refused.returncode != 0
    assert "validator.pytorchjob.training-operator.kubeflow.org" in refused.stderr, refused.stderr
    assert "must have at least one container with name pytorch" in refused.stderr, refused.stderr


def test_batch_job_pod_completes(cluster: LocalCluster, namespace: str) -> None:
    apply(
        cluster,
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "once", "namespace": namespace},
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "main", "image": IMAGE}],
                    }
                },
            },
        },
    )
    cluster.wait_for(
        "Job once to complete",
        lambda: (condition(get(cluster, "job", "once", "-n", namespace), "Complete") or {}).get("status") == "True",
        logs=("kube-controller-manager", "kwok"),
    )


def test_pod_asking_for_more_gpus_than_any_node_has_is_unschedulable(cluster: LocalCluster, namespace: str) -> None:
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "greedy", "namespace": namespace},
            "spec": {
                "containers": [{"name": "main", "image": IMAGE, "resources": {"limits": {"nvidia.com/gpu": "16"}}}]
            },
        },
    )

    def unschedulable() -> bool:
        cond = condition(get(cluster, "pod", "greedy", "-n", namespace), "PodScheduled")
        return cond is not None and cond.get("status") == "False" and cond.get("reason") == "Unschedulable"

    cluster.wait_for("pod greedy to be marked Unschedulable", unschedulable, logs=("kube-scheduler",))
    pod = get(cluster, "pod", "greedy", "-n", namespace)
    assert pod["status"]["phase"] == "Pending"
    assert "nodeName" not in pod["spec"]
    assert "nvidia.com/gpu" in (condition(pod, "PodScheduled") or {}).get("message", "")


def test_claim_binds_without_a_pod_and_a_pod_using_it_runs(cluster: LocalCluster, namespace: str) -> None:
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "models", "namespace": namespace},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "50Gi"}}},
        },
    )
    cluster.wait_for(
        "PVC models to bind",
        lambda: get(cluster, "pvc", "models", "-n", namespace)["status"].get("phase") == "Bound",
        logs=("kwok", "kube-controller-manager"),
    )
    pvc = get(cluster, "pvc", "models", "-n", namespace)
    assert pvc["spec"]["storageClassName"] == STORAGE_CLASS  # the default class was applied
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "reader", "namespace": namespace},
            "spec": {
                "containers": [
                    {"name": "main", "image": IMAGE, "volumeMounts": [{"name": "m", "mountPath": "/models"}]}
                ],
                "volumes": [{"name": "m", "persistentVolumeClaim": {"claimName": "models"}}],
            },
        },
    )
    cluster.wait_for(
        "pod reader to run",
        lambda: get(cluster, "pod", "reader", "-n", namespace)["status"].get("phase") == "Running",
        logs=("kube-scheduler", "kwok"),
    )


def test_non_admin_user_is_refused_what_rbac_does_not_grant(cluster: LocalCluster, namespace: str) -> None:
    refused = cluster.kubectl("get", "secrets", "-n", namespace, kubeconfig=cluster.tester_kubeconfig, check=False)
    assert refused.returncode != 0
    assert "Forbidden" in refused.stderr and "kubetune-tester" in refused.stderr, refused.stderr
    # The admin identity is allowed the same request.
    cluster.kubectl("get", "secrets", "-n", namespace)


def test_minted_identities_get_exactly_what_rbac_binds(cluster: LocalCluster, namespace: str) -> None:
    member = cluster.user_kubeconfig("alice", groups=["kubetune-viewers"])
    outsider = cluster.user_kubeconfig("bob")
    cluster.kubectl(
        "create",
        "rolebinding",
        "viewers",
        "-n",
        namespace,
        "--clusterrole=view",
        "--group=kubetune-viewers",
        "--serviceaccount",
        f"{namespace}:robot",
    )
    cluster.kubectl("create", "serviceaccount", "robot", "-n", namespace)
    robot = cluster.service_account_kubeconfig(namespace, "robot")
    assert cluster.kubectl("get", "pods", "-n", namespace, kubeconfig=member, check=False).returncode == 0
    assert cluster.kubectl("get", "pods", "-n", namespace, kubeconfig=robot, check=False).returncode == 0
    denied = cluster.kubectl("get", "pods", "-n", namespace, kubeconfig=outsider, check=False)
    assert denied.returncode != 0 and "Forbidden" in denied.stderr, denied.stderr
    # view does not include writes.
    write = cluster.kubectl("create", "configmap", "x", "-n", namespace, kubeconfig=member, check=False)
    assert write.returncode != 0 and "forbidden" in write.stderr.lower(), write.stderr


@pytest.mark.parametrize("policy", ["background", "foreground"])
def test_garbage_collector_deletes_owned_objects(cluster: LocalCluster, namespace: str, policy: str) -> None:
    cluster.kubectl("create", "configmap", "owner", "-n", namespace)
    uid = get(cluster, "configmap", "owner", "-n", namespace)["metadata"]["uid"]
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "owned",
                "namespace": namespace,
                "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}],
            },
        },
    )
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace, f"--cascade={policy}", "--wait=false")
    cluster.wait_for(
        "garbage collector to delete ConfigMap owned",
        lambda: cluster.kubectl("get", "configmap", "owned", "-n", namespace, check=False).returncode != 0,
        logs=("kube-controller-manager",),
    )
