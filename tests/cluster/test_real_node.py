"""The local cluster's real node (kubelet + containerd + runc, CNI bridge, kube-proxy,
CoreDNS) runs pods for real: a pod with the restricted security context the operator
writes, with a ConfigMap, a projected ServiceAccount token and an emptyDir mounted;
`kubectl logs` through the API server; a Service name that resolves and answers from
another pod; a local PersistentVolume the host and a pod share.

The session's cluster starts the real node because these tests carry the `real_node`
marker (tests/cluster/conftest.py). Needs root and hack/cluster/node-deps.sh."""

from __future__ import annotations

import base64
import ipaddress
import json
import time
from typing import Any

import pytest
from localcluster import (
    CLUSTER_DNS_IP,
    CONTAINERD_MINOR,
    NODE_IP,
    POD_CIDR,
    REAL_NODE,
    REAL_NODE_GPUS,
    REAL_NODE_LABEL,
    REAL_NODE_TAINT,
    REAL_STORAGE_CLASS,
    ClusterError,
    LocalCluster,
    read_versions,
)

pytestmark = pytest.mark.real_node

UID = 65532  # the operator's pods' user


def apply(cluster: LocalCluster, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))


def require_real_node(cluster: LocalCluster) -> None:
    # A reused cluster (KUBETUNE_TEST_CLUSTER_DIR) started without the node fails here.
    if not cluster.real_node:
        pytest.fail(
            f"the cluster in {cluster.base_dir} has no real node; start it with `make cluster-up NODES=real` "
            "or run without KUBETUNE_TEST_CLUSTER_DIR"
        )


def restricted_namespace(cluster: LocalCluster, namespace: str) -> None:
    """Pod Security "restricted" enforced, as the README asks of kubetune's namespaces:
    the API server itself then refuses a pod that is not."""
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")


def container(name: str, image: str, script: str, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        # Imported into containerd by the cluster; there is no registry to pull from.
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", script],
        "volumeMounts": mounts,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def real_node_pod(
    name: str,
    containers: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "nodeSelector": {REAL_NODE_LABEL: "real"},
            # Without this toleration the scheduler keeps the pod off the real node.
            "tolerations": [{**REAL_NODE_TAINT, "operator": "Equal"}],
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "terminationGracePeriodSeconds": 1,
            "containers": containers,
            "volumes": volumes,
        },
    }


def wait_phase(cluster: LocalCluster, namespace: str, pod: str, phases: set[str], timeout: float = 120) -> str:
    """Wait for one of `phases`; on timeout fail with the pod's description and the
    kubelet's log to read."""
    last = ""

    def reached() -> bool:
        nonlocal last
        last = str(cluster.get_json("pod", pod, "-n", namespace).get("status", {}).get("phase", ""))  # type: ignore[attr-defined]
        return last in phases

    try:
        cluster.wait_for(
            f"pod {namespace}/{pod} to be {sorted(phases)}", reached, timeout, logs=("kubelet", "containerd")
        )
    except ClusterError as err:
        describe = cluster.kubectl("describe", "pod", pod, "-n", namespace, check=False).stdout
        logs = cluster.kubectl("logs", pod, "-n", namespace, "--all-containers", check=False)
        pytest.fail(f"{err}\nphase {last!r}\n{describe}\nlogs:\n{logs.stdout}{logs.stderr}")
    return last


def logs(cluster: LocalCluster, namespace: str, pod: str) -> str:
    return cluster.kubectl("logs", pod, "-n", namespace).stdout


def test_real_node_registers_ready_tainted_with_fake_gpus(cluster: LocalCluster) -> None:
    require_real_node(cluster)
    node: dict[str, Any] = cluster.get_json("node", REAL_NODE)
    assert node["metadata"]["labels"][REAL_NODE_LABEL] == "real"
    assert REAL_NODE_TAINT in [
        {k: t[k] for k in ("key", "value", "effect") if k in t} for t in node["spec"].get("taints", [])
    ], node["spec"]
    status = node["status"]
    assert status["capacity"]["nvidia.com/gpu"] == str(REAL_NODE_GPUS)
    assert status["allocatable"]["nvidia.com/gpu"] == str(REAL_NODE_GPUS)
    assert {"type": "InternalIP", "address": NODE_IP} in status["addresses"]
    info = status["nodeInfo"]
    # Built from the control plane's own module and version.
    assert info["kubeletVersion"] == read_versions()["KUBERNETES_VERSION"]
    assert info["kubeProxyVersion"] in ("", read_versions()["KUBERNETES_VERSION"])
    assert info["containerRuntimeVersion"].startswith(f"containerd://{CONTAINERD_MINOR}."), info
    ready = [c for c in status["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True", status["conditions"]


def test_restricted_pod_runs_with_configmap_token_and_emptydir(cluster: LocalCluster, namespace: str) -> None:
    require_real_node(cluster)
    restricted_namespace(cluster, namespace)
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "settings", "namespace": namespace},
            "data": {"greeting": "hello from a configmap"},
        },
    )
    script = (
        "echo uid=$(id -u); echo gid=$(id -g); "
        'echo "config=$(cat /config/greeting)"; '
        'echo "token=$(cat /var/run/secrets/kubetune/token)"; '
        "echo scratch > /scratch/file && echo emptydir=$(cat /scratch/file); "
        "if touch /probe 2>/dev/null; then echo root=writable; else echo root=read-only; fi; "
        "grep -E '^(CapEff|Seccomp|NoNewPrivs):' /proc/self/status; "
        # The API server through the `kubernetes` Service the kubelet names in the
        # environment (kube-proxy, then api-forward). Busybox has no TLS client: plain
        # HTTP to the TLS port gets Go's own answer, which only the API server gives here.
        "echo api=$(printf 'GET /version HTTP/1.0\\r\\n\\r\\n' "
        "| nc -w 3 $KUBERNETES_SERVICE_HOST $KUBERNETES_SERVICE_PORT | grep -o 'HTTP request to an HTTPS server')"
    )
    pod = real_node_pod(
        "restricted",
        [
            container(
                "main",
                cluster.busybox_image,
                script,
                [
                    {"name": "config", "mountPath": "/config", "readOnly": True},
                    {"name": "token", "mountPath": "/var/run/secrets/kubetune", "readOnly": True},
                    {"name": "scratch", "mountPath": "/scratch"},
                ],
            )
        ],
        [
            {"name": "config", "configMap": {"name": "settings"}},
            {
                "name": "token",
                "projected": {
                    "sources": [
                        {
                            "serviceAccountToken": {
                                "audience": "kubetune-test",
                                "expirationSeconds": 3600,
                                "path": "token",
                            }
                        }
                    ]
                },
            },
            {"name": "scratch", "emptyDir": {}},
        ],
    )
    apply(cluster, {**pod, "metadata": {**pod["metadata"], "namespace": namespace}})
    assert wait_phase(cluster, namespace, "restricted", {"Succeeded", "Failed"}) == "Succeeded", logs(
        cluster, namespace, "restricted"
    )
    placed = cluster.get_json("pod", "restricted", "-n", namespace)
    spec: dict[str, Any] = placed["spec"]  # type: ignore[assignment]
    status: dict[str, Any] = placed["status"]  # type: ignore[assignment]
    assert spec["nodeName"] == REAL_NODE
    assert status["hostIP"] == NODE_IP
    assert ipaddress.ip_address(status["podIP"]) in ipaddress.ip_network(POD_CIDR)

    # Read back through the API server, which asks the kubelet (InternalIP, client cert).
    text = logs(cluster, namespace, "restricted")
    out = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    assert out["uid"] == str(UID), text
    assert out["gid"] == str(UID), text
    assert out["config"] == "hello from a configmap", text
    assert out["emptydir"] == "scratch", text
    assert out["root"] == "read-only", text
    assert "CapEff:\t0000000000000000" in text, text
    assert "NoNewPrivs:\t1" in text, text
    assert "Seccomp:\t2" in text, text  # 2 = filter: the runtime's default profile is on
    assert out["api"] == "HTTP request to an HTTPS server", text
    # The projected token is a real one the API server issued for this pod.
    payload = out["token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["aud"] == ["kubetune-test"], claims
    assert claims["sub"] == f"system:serviceaccount:{namespace}:default", claims
    assert claims["kubernetes.io"]["pod"]["name"] == "restricted", claims


def test_service_name_resolves_and_answers_from_another_pod(cluster: LocalCluster, namespace: str) -> None:
    require_real_node(cluster)
    restricted_namespace(cluster, namespace)
    server = real_node_pod(
        "web-server",
        [
            {
                **container(
                    "httpd",
                    cluster.busybox_image,
                    'echo "hello from $(hostname)" > /www/index.html && exec httpd -f -p 8080 -h /www',
                    [{"name": "www", "mountPath": "/www"}],
                ),
                "ports": [{"containerPort": 8080, "name": "http"}],
                # The Service lists the pod only once it listens.
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
            }
        ],
        [{"name": "www", "emptyDir": {}}],
        labels={"app": "web"},
    )
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
    }
    apply(cluster, {**server, "metadata": {**server["metadata"], "namespace": namespace}})
    apply(cluster, service)
    cluster_ip = str(cluster.get_json("service", "web", "-n", namespace)["spec"]["clusterIP"])  # type: ignore[index]

    def server_ready() -> bool:
        pod = cluster.get_json("pod", "web-server", "-n", namespace)
        conditions = pod.get("status", {}).get("conditions", [])  # type: ignore[attr-defined]
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    cluster.wait_for("pod web-server Ready", server_ready, 120, logs=("kubelet", "containerd"))
    # Name resolution as a libc resolver does it: the short name under each search
    # domain the kubelet wrote into /etc/resolv.conf, asked of the nameserver there
    # (CoreDNS, behind the kube-dns Service). Busybox's own lookups are used because
    # Debian's static busybox cannot run glibc's resolver (its wget segfaults on it).
    # Then an HTTP request to the answer, through kube-proxy's rules; retried, since
    # kube-proxy programs the Service a moment after the endpoint turns ready.
    script = r"""
set -u
cat /etc/resolv.conf
ip=""
for domain in $(sed -n 's/^search //p' /etc/resolv.conf); do
  answer=$(nslookup -type=a "web.$domain" 2>/dev/null | sed -n '/^Name:/,$ s/^Address: *//p' | head -1)
  if [ -n "$answer" ]; then echo "resolved web.$domain=$answer"; ip=$answer; break; fi
done
[ -n "$ip" ] || { echo "web did not resolve"; exit 1; }
for i in $(seq 30); do
  if printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 "$ip" 80 | tee /dev/stderr | grep -q '^hello from'; then exit 0; fi
  sleep 1
done
exit 1
"""
    client = real_node_pod("client", [container("client", cluster.busybox_image, script, [])], [])
    started = time.monotonic()
    apply(cluster, {**client, "metadata": {**client["metadata"], "namespace": namespace}})
    phase = wait_phase(cluster, namespace, "client", {"Succeeded", "Failed"})
    text = logs(cluster, namespace, "client")
    assert phase == "Succeeded", f"client could not reach http://web/ ({time.monotonic() - started:.0f}s):\n{text}"
    assert f"nameserver {CLUSTER_DNS_IP}" in text, text
    # The first search domain is the pod's namespace: CoreDNS answered with the Service's IP.
    assert f"resolved web.{namespace}.svc.cluster.local={cluster_ip}" in text, text
    assert "hello from web-server" in text, text


def test_local_volume_is_shared_between_host_and_pod(cluster: LocalCluster, namespace: str) -> None:
    require_real_node(cluster)
    restricted_namespace(cluster, namespace)
    directory = cluster.real_node_volume(namespace, "outputs", size="1Gi")
    (directory / "input.txt").write_text("from the host\n")
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "outputs", "namespace": namespace},
            "spec": {
                "storageClassName": REAL_STORAGE_CLASS,
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    pod = real_node_pod(
        "writer",
        [
            container(
                "writer",
                cluster.busybox_image,
                "cat /data/input.txt && echo written-by-pod > /data/output.txt",
                [{"name": "data", "mountPath": "/data"}],
            )
        ],
        [{"name": "data", "persistentVolumeClaim": {"claimName": "outputs"}}],
    )
    apply(cluster, {**pod, "metadata": {**pod["metadata"], "namespace": namespace}})
    assert wait_phase(cluster, namespace, "writer", {"Succeeded", "Failed"}) == "Succeeded", logs(
        cluster, namespace, "writer"
    )
    assert logs(cluster, namespace, "writer") == "from the host\n"
    assert (directory / "output.txt").read_text() == "written-by-pod\n"
    assert (directory / "output.txt").stat().st_uid == UID
