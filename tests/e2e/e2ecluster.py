"""The cluster the end-to-end tier runs on, and the claims' files as a user reaches them.

One test body (test_user_path.py) runs on two kinds of cluster:
- `local` (the default, `make test`): the local cluster's real node alone (NODES=real-only),
  started by the session. The README's blocks build and push the images, install the chart
  (`e2e:install`) and seed the node's volumes (`e2e:seed`).
- `current` (KUBETUNE_E2E_CLUSTER=current; `e2e/run.sh` on kind): the cluster of KUBECONFIG,
  with the Kubeflow training-operator installed, `nvidia.com/gpu` advertised on its nodes and
  the images already there (e2e/run.sh does those three for kind). The session installs the
  chart with helm and seeds the claims through a pod, as a user without access to the nodes.

Either way the tests read and write the claims' files only through `ClaimFiles`, a pod that
mounts them, so the way the files are checked is the same on both.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localcluster import NODE_IP, REAL_NODE, LocalCluster

REPO = Path(__file__).resolve().parents[2]

LOCAL = "local"
CURRENT = "current"
CLUSTER_ENV = "KUBETUNE_E2E_CLUSTER"
# Space-separated image references, operator first, as `hack/images.sh --list` prints them.
IMAGES_ENV = "KUBETUNE_E2E_IMAGES"
# The claims the `current` seed applies (kind's local-path provisioner has no ReadWriteMany).
STORAGE_ENV = "KUBETUNE_E2E_STORAGE"
DEFAULT_STORAGE = REPO / "e2e" / "manifests" / "storage.yaml"
LOCAL_REGISTRY = "127.0.0.1:5111/kubetune"
# An address of this machine that the current cluster's pods reach (kind: its network's gateway).
HUB_HOST_ENV = "KUBETUNE_E2E_HUB_HOST"
COMPONENTS = ("kubetune-operator", "trainer-automodel", "trainer-unsloth")
NAMESPACE = "team-a"  # the README's
SYSTEM_NAMESPACE = "kubetune-system"
CLAIMS = ("models", "datasets", "kubetune-output")  # examples/storage.yaml's
TRAINER_UID = 65532  # kubetune_api.constants.TRAINER_UID: the claims' files are written as it


# Runs a README block marked `<!-- e2e:NAME -->` (conftest.readme).
ReadmeRunner = Callable[[str], subprocess.CompletedProcess[str]]


class E2EError(AssertionError):
    """A step of the tier's own plumbing failed (kubectl, the claims pod); says which."""


def image_references(registry: str | None) -> dict[str, str]:
    """component -> image reference: KUBETUNE_E2E_IMAGES, else what hack/images.sh builds."""
    given = os.environ.get(IMAGES_ENV, "").split()
    if not given:
        env = dict(os.environ)
        if registry:
            env["KUBETUNE_REGISTRY"] = registry
        listed = subprocess.run(
            ["bash", "hack/images.sh", "--list"], cwd=REPO, env=env, capture_output=True, text=True, check=True
        )
        given = listed.stdout.split()
    refs = {ref.rsplit(":", 1)[0].rsplit("/", 1)[-1]: ref for ref in given}
    missing = [c for c in COMPONENTS if c not in refs]
    if missing:
        raise E2EError(f"{IMAGES_ENV}={' '.join(given)!r} names no image for {missing}; give {len(COMPONENTS)}")
    return {c: refs[c] for c in COMPONENTS}


@dataclass
class E2ECluster:
    kind: str
    kubeconfig: Path
    images: dict[str, str]  # component -> reference (repository:tag)
    local: LocalCluster | None = None  # the local cluster, when kind == LOCAL

    @property
    def hub_host(self) -> str | None:
        """An address of this machine that pods reach (the stand-in Hub serves there)."""
        return NODE_IP if self.local is not None else (os.environ.get(HUB_HOST_ENV) or None)

    def repository(self, component: str) -> str:
        return self.images[component].rsplit(":", 1)[0]

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        cmd = ["kubectl", "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise E2EError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr}{result.stdout}")
        return result

    def get_json(self, *args: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.kubectl("get", *args, "-o", "json").stdout)
        return data

    def node_names(self) -> set[str]:
        """The nodes whose pods really run: the real node, or every node of the current cluster."""
        if self.local is not None:
            return {REAL_NODE}
        return {n["metadata"]["name"] for n in self.get_json("nodes")["items"]}

    def ensure_namespace(self, name: str) -> None:
        """The namespace, enforcing Pod Security "restricted" (the README's two commands, idempotent)."""
        manifest = self.kubectl("create", "namespace", name, "--dry-run=client", "-o", "json").stdout
        self.kubectl("apply", "-f", "-", input=manifest)
        self.kubectl("label", "--overwrite", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")


class ClaimFiles:
    """The files on a namespace's claims, through one pod that mounts each claim at
    /claims/<claim>. It runs the Automodel trainer image (tar, coreutils) as the trainers'
    uid under Pod Security "restricted", so it sees the files as the trainers do."""

    POD = "e2e-claim-files"

    def __init__(self, cluster: E2ECluster, namespace: str, claims: tuple[str, ...]) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.claims = claims

    def start(self, timeout_s: int = 600) -> None:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": self.POD, "labels": {"app.kubernetes.io/name": self.POD}},
            "spec": {
                "terminationGracePeriodSeconds": 0,
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": TRAINER_UID,
                    "runAsGroup": TRAINER_UID,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [
                    {
                        "name": "files",
                        "image": self.cluster.images["trainer-automodel"],
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["sleep", "infinity"],
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [{"name": c, "mountPath": f"/claims/{c}"} for c in self.claims],
                    }
                ],
                "volumes": [{"name": c, "persistentVolumeClaim": {"claimName": c}} for c in self.claims],
            },
        }
        self.cluster.kubectl("apply", "-n", self.namespace, "-f", "-", input=json.dumps(pod))
        waited = self.cluster.kubectl(
            "wait", "-n", self.namespace, "--for=condition=Ready", f"pod/{self.POD}", f"--timeout={timeout_s}s",
            check=False, timeout=timeout_s + 30,
        )  # fmt: skip
        if waited.returncode != 0:
            described = self.cluster.kubectl("describe", "-n", self.namespace, "pod", self.POD, check=False).stdout
            raise E2EError(f"the claims pod {self.namespace}/{self.POD} is not Ready:\n{described[-3000:]}")

    def stop(self) -> None:
        self.cluster.kubectl("delete", "-n", self.namespace, "pod", self.POD, "--ignore-not-found", "--wait=false")

    def path(self, claim: str, path: str = "") -> str:
        if claim not in self.claims:
            raise E2EError(f"the claims pod mounts {self.claims}, not {claim!r}")
        return f"/claims/{claim}/{path}".rstrip("/")

    def exec(self, *command: str, stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        kubectl = ["kubectl", "--kubeconfig", str(self.cluster.kubeconfig)]
        cmd = [*kubectl, "exec", "-i", "-n", self.namespace, self.POD, "--", *command]
        result = subprocess.run(cmd, input=stdin, capture_output=True, timeout=600, check=False)
        if check and result.returncode != 0:
            stderr = result.stderr.decode(errors="replace")[-2000:]
            raise E2EError(f"in the claims pod, {' '.join(command)} failed ({result.returncode}): {stderr}")
        return result

    def read_bytes(self, claim: str, path: str) -> bytes:
        return self.exec("cat", self.path(claim, path)).stdout

    def read_text(self, claim: str, path: str) -> str:
        return self.read_bytes(claim, path).decode()

    def is_file(self, claim: str, path: str) -> bool:
        return self.exec("test", "-f", self.path(claim, path), check=False).returncode == 0

    def owner_uid(self, claim: str, path: str) -> int:
        return int(self.exec("stat", "-c", "%u", self.path(claim, path)).stdout)

    def listing(self, claim: str, path: str = "", limit: int = 30) -> list[str]:
        """The first paths below claim/path, for an assertion's message."""
        found = self.exec("find", self.path(claim, path), check=False).stdout.decode().split()
        return found[:limit]

    def write_bytes(self, claim: str, path: str, data: bytes) -> None:
        target = self.path(claim, path)
        self.exec("sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "sh", target, stdin=data)

    def upload_dir(self, source: Path, claim: str, path: str) -> None:
        """source's contents into claim/path (replacing what is there), as the trainers' uid."""
        target = self.path(claim, path)
        packed = subprocess.run(["tar", "-C", str(source), "-cf", "-", "."], capture_output=True, check=True).stdout
        script = 'rm -rf "$1" && mkdir -p "$1" && tar -C "$1" -xf - --no-same-owner --no-same-permissions'
        self.exec("sh", "-c", script, "sh", target, stdin=packed)

    def download_dir(self, claim: str, path: str, dest: Path) -> Path:
        """claim/path's contents into dest (made), which is returned."""
        packed = self.exec("tar", "-C", self.path(claim, path), "-cf", "-", ".").stdout
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-C", str(dest), "-xf", "-"], input=packed, capture_output=True, check=True)
        return dest


def helm_binary(local_cache: Path | None, version: str) -> Path:
    """KUBETUNE_HELM, the one hack/cluster/build.sh caches, or helm on PATH."""
    if os.environ.get("KUBETUNE_HELM"):
        return Path(os.environ["KUBETUNE_HELM"])
    cache = local_cache or Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))
    cached = cache / "bin" / f"helm-{version}" / "helm"
    if cached.is_file():
        return cached
    on_path = shutil.which("helm")
    if on_path is None:
        raise E2EError(f"no helm: install helm v3, `bash hack/cluster/build.sh helm` ({cached}) or set KUBETUNE_HELM")
    return Path(on_path)
