"""Helpers for tests on the local control plane: install the kubetune CRDs, run the
operator as a subprocess under its own least-privilege ServiceAccount, wait for a
job's phase."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from kubetune.controller.rbac import LEADER_ELECTION_RULES, OPERATOR_RULES, VOLUME_RULES

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_NAMESPACE = "kubetune-system"
OPERATOR_SA = "kubetune-operator"
EXAMPLES = ROOT / "examples"
LORA = {"model": "smollm2-135m", "dataset": {"training": "chat-train"}}  # the smallest AutomodelJob spec


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


def install_crds(cluster: Any) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    for crd in sorted((ROOT / "crds").glob("*.yaml")):
        name = yaml.safe_load(crd.read_text())["metadata"]["name"]
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}")


def _role_and_binding(
    kind: str, name: str, rules: list[dict[str, Any]], subject: list[dict[str, str]], namespace: str | None = None
) -> list[dict[str, Any]]:
    """A Role or ClusterRole with `rules`, and its binding to `subject`."""
    metadata: dict[str, str] = {"name": name, **({"namespace": namespace} if namespace else {})}
    rbac = "rbac.authorization.k8s.io"
    return [
        {"apiVersion": f"{rbac}/v1", "kind": kind, "metadata": metadata, "rules": rules},
        {
            "apiVersion": f"{rbac}/v1",
            "kind": f"{kind}Binding",
            "metadata": metadata,
            "subjects": subject,
            "roleRef": {"apiGroup": rbac, "kind": kind, "name": name},
        },
    ]


def grant_operator(cluster: Any, namespace: str | None = None) -> Path:
    """The chart's RBAC, from the same rules: ClusterRole, or a Role in `namespace`, plus
    the volume-read ClusterRole of either scope. Returns a kubeconfig that authenticates
    as the operator's ServiceAccount."""
    cluster.kubectl("create", "namespace", OPERATOR_NAMESPACE, check=False)
    cluster.kubectl("create", "serviceaccount", OPERATOR_SA, "-n", OPERATOR_NAMESPACE, check=False)
    subject = [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": OPERATOR_NAMESPACE}]
    if namespace is None:
        objects = _role_and_binding("ClusterRole", "kubetune-operator-test", OPERATOR_RULES, subject)
    else:
        objects = _role_and_binding("Role", "kubetune-operator", OPERATOR_RULES, subject, namespace)
    objects += _role_and_binding("ClusterRole", "kubetune-operator-volumes-test", VOLUME_RULES, subject)
    objects += _role_and_binding("Role", "kubetune-operator-leader", LEADER_ELECTION_RULES, subject, OPERATOR_NAMESPACE)
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))
    return Path(cluster.service_account_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_SA))


class OperatorProcess:
    """`kubetune operator` as a user runs it, with its log in a file the failure names."""

    def __init__(self, kubeconfig: Path, log: Path, args: list[str]) -> None:
        self.kubeconfig, self.log_path, self.args = kubeconfig, log, args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONPATH": str(ROOT / "operator")}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            # No metrics port unless a test asks (two replicas would race for the default port).
            [sys.executable, "-m", "kubetune", "operator", "--health-port", "0", "--metrics-port", "0", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self.log_path.read_text()[-3000:]
            raise AssertionError(f"the operator exited with {self.proc.returncode}; log {self.log_path}:\n{tail}")


def get(cluster: Any, kind: str, name: str, namespace: str) -> dict[str, Any]:
    result = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json")
    return dict(json.loads(result.stdout))


def wait_phase(
    cluster: Any,
    operator: OperatorProcess,
    kind: str,
    name: str,
    namespace: str,
    phases: set[str],
    timeout: float = 120,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        operator.check_alive()
        result = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
        if result.returncode == 0:
            body = json.loads(result.stdout)
            if (body.get("status") or {}).get("phase") in phases:
                return body
        time.sleep(0.5)
    raise AssertionError(
        f"{kind}/{name} did not reach {sorted(phases)} in {timeout}s; status: "
        f"{json.dumps(body.get('status'), indent=1)}; operator log: {operator.log_path}"
    )


def wait_condition_reason(
    cluster: Any,
    operator: OperatorProcess,
    kind: str,
    name: str,
    namespace: str,
    type_: str,
    reason: str,
    timeout: float = 60,
) -> dict[str, Any]:
    """Poll until condition `type_` of the object has `reason`; returns the object."""
    deadline = time.monotonic() + timeout
    while True:
        operator.check_alive()
        body = get(cluster, kind, name, namespace)
        conditions = {c["type"]: c for c in (body.get("status") or {}).get("conditions") or []}
        if conditions.get(type_, {}).get("reason") == reason:
            return body
        assert time.monotonic() < deadline, (
            f"{kind}/{name}: condition {type_} never had reason {reason}: {body.get('status')}; "
            f"operator log: {operator.log_path}"
        )
        time.sleep(0.3)


# A sample of the operator's /metrics: (name, sorted labels) -> value.
Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Metrics:
    """GET /metrics, parsed with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
