"""A real Kubernetes control plane on 127.0.0.1 for tests: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kwok (fake GPU nodes and pod lifecycle)
and the Kubeflow training-operator, run as plain processes from binaries that
hack/cluster/build.sh compiled into $KUBETUNE_CACHE/bin.

Optionally (real_node=True, KUBETUNE_REAL_NODE=1, `make cluster-up NODES=real`)
also one real node, kubetune-real-0: containerd + runc (Debian's), a kubelet,
kube-proxy and CoreDNS, with a CNI bridge network, so pods really run. It needs
root and the packages of hack/cluster/node-deps.sh; see hack/cluster/README.md.

Standard library only, so that `make cluster-up` runs with any python3 >= 3.11.

CLI (from the repository root; hack/run-in-venv.sh and the Makefile put hack/cluster
on PYTHONPATH):
       PYTHONPATH=hack/cluster python3 -m localcluster up|down|status
       PYTHONPATH=hack/cluster python3 -m localcluster kubeconfig USER [--group G ...]
       PYTHONPATH=hack/cluster python3 -m localcluster volume NAMESPACE CLAIM [--size 10Gi]
Python:
       from localcluster import LocalCluster
       cluster = LocalCluster(Path("/tmp/x"))
       cluster.up()
       cluster.kubectl("get", "nodes")
       cluster.down()
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# hack/cluster: versions.env, kwok/, manifests/ and tcpforward.py beside this package.
HERE = Path(__file__).resolve().parents[1]
REPO = HERE.parent.parent

# Start order; down() stops in reverse.
COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "training-operator",
)
KUBERNETES_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
# The real node's processes, started after the control plane; down() stops them first.
# api-forward: the API server listens on 127.0.0.1 only; it carries the node IP's
# connections there, so pods reach the `kubernetes` Service (hack/cluster/tcpforward.py).
# registry: the node's image registry (Debian's docker-registry, distribution 2.8), where
# hack/images.sh pushes what it builds and from which the node pulls.
NODE_COMPONENTS = ("api-forward", "registry", "containerd", "kubelet", "kube-proxy", "coredns")

ADMIN_USER = "kubetune-admin"
TEST_USER = "kubetune-tester"
SERVICE_CIDR = "10.96.0.0/16"
FAKE_FAIL_ANNOTATION = "kubetune.io/fake-fail"
FAKE_DURATION_ANNOTATION = "kubetune.io/fake-duration"
FAKE_EXIT_CODE_ANNOTATION = "kubetune.io/fake-exit-code"
FAKE_REASON_ANNOTATION = "kubetune.io/fake-reason"
GPU_NODES = ("kwok-gpu-0", "kwok-gpu-1")
CPU_NODES = ("kwok-cpu-0",)
STORAGE_CLASS = "kubetune-local"

# The real node. One per machine: its bridge, pod network and cgroup root are
# machine-wide names (a second cluster asking for one gets a ClusterError).
REAL_NODE = "kubetune-real-0"
REAL_NODE_LABEL = "kubetune.io/node-kind"  # = "real"; kwok nodes carry no such label
# Only pods that tolerate this taint run there, so the kwok tests' pods never land
# on a node that really runs them.
REAL_NODE_TAINT = {"key": "kubetune.io/real-node", "value": "true", "effect": "NoSchedule"}
REAL_NODE_GPUS = 4  # fake nvidia.com/gpu capacity; the trainers fall back to CPU
REAL_STORAGE_CLASS = "kubetune-real-local"  # static local PVs: LocalCluster.real_node_volume
CNI_BRIDGE = "kt-cni0"
POD_CIDR = "10.244.0.0/24"
# The bridge's own address is the node's InternalIP: reachable from the host (the
# API server's `kubectl logs`/exec calls) and from every pod (CoreDNS listens there).
NODE_IP = "10.244.0.1"
CLUSTER_DNS_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
CGROUP_ROOT = "kubetune-node"  # every pod's cgroup lives below /<this> in each hierarchy
REAL_NODE_ENV = "KUBETUNE_REAL_NODE"
# KUBETUNE_KWOK_NODES=0 (`make cluster-up NODES=real-only`): no kwok nodes, and the
# real node carries no taint: the cluster looks like a one-node GPU cluster, so the
# chart and the operator's pods run there unchanged (the end-to-end tier).
KWOK_NODES_ENV = "KUBETUNE_KWOK_NODES"
BUSYBOX = Path("/bin/busybox")  # from Debian's busybox-static: one static binary
CONTAINERD_MINOR = "1.6"  # Debian 12's; the config below is containerd's version-2 format
CNI_BIN_DIR = Path("/usr/lib/cni")  # where Debian's containernetworking-plugins puts them
# Which cluster's state directory runs the machine's one real node.
REAL_NODE_OWNER = Path("/run/kubetune-real-node.owner")
COREDNS_USER = "kubetune:coredns"
# The real node's registry, on loopback at a fixed port so that image references
# (`KUBETUNE_REGISTRY=127.0.0.1:5111/kubetune make images`) stay the same between runs.
# Not Debian's default 5000: the docker-registry package may run a registry there.
REGISTRY_PORT = int(os.environ.get("KUBETUNE_REGISTRY_PORT", "5111"))
REGISTRY_BINARY = Path("/usr/bin/docker-registry")
NODE_DEPS_HINT = "install them with `bash hack/cluster/node-deps.sh` (apt-get; idempotent)"

# Generous: the first start on 2 busy cores takes ~20 s; these are deadlines for
# failing with a useful message, not expectations.
DEFAULT_TIMEOUT_S = 180.0


class ClusterError(RuntimeError):
    """The local cluster could not be started or used; the message says why and what to read."""


class ComponentDied(ClusterError):
    """A control-plane process exited; the message names its log file."""


def default_cache() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune")


def default_base_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_CLUSTER_DIR") or REPO / ".cluster")


def read_versions(path: Path = HERE / "versions.env") -> dict[str, str]:
    versions: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ClusterError(f"{path}:{lineno}: expected KEY=VALUE, got {raw!r}")
        versions[key.strip()] = value.strip().strip('"')
    return versions


def component_versions(versions: dict[str, str]) -> dict[str, str]:
    return {
        "etcd": versions["ETCD_VERSION"],
        "kube-apiserver": versions["KUBERNETES_VERSION"],
        "kube-controller-manager": versions["KUBERNETES_VERSION"],
        "kube-scheduler": versions["KUBERNETES_VERSION"],
        "kubelet": versions["KUBERNETES_VERSION"],
        "kube-proxy": versions["KUBERNETES_VERSION"],
        "coredns": versions["COREDNS_VERSION"],
        "kwok": versions["KWOK_VERSION"],
        "training-operator": versions["TRAINING_OPERATOR_VERSION"],
        "helm": versions["HELM_VERSION"],
    }


def binary_path(component: str, cache: Path | None = None) -> Path:
    """Where build.sh puts the binary of `component` for the pinned version."""
    version = component_versions(read_versions())[component]
    return (cache or default_cache()) / "bin" / f"{component}-{version}" / component


# Ports handed out by this process: nothing binds them between free_port() and the
# component's start, so without this two calls could return the same one.
_GIVEN_PORTS: set[int] = set()
_PORT_FLOOR = 10000  # below: well-known and commonly configured ports


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default range starts here


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port nothing listens on, below the kernel's ephemeral range.

    Port 0 picks from the ephemeral range, which every outgoing connection also takes its
    local port from: between the pick and the component's bind, one of the cluster's own
    client connections took kwok's port ("bind: address already in use", seen in make
    bench). Below that range only another listener can take it. Every component still fails
    loudly on a taken port, and up() reports its log."""
    floor = _ephemeral_floor()
    rng = random.SystemRandom()
    if floor - _PORT_FLOOR >= 1000:
        for _ in range(200):
            port = rng.randrange(_PORT_FLOOR, floor)
            if port not in _GIVEN_PORTS and _bindable(port):
                _GIVEN_PORTS.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # no room below: the kernel's pick
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    _GIVEN_PORTS.add(port)
    return port


def _proc_start_ticks(pid: int) -> int | None:
    """Start time of a pid (clock ticks since boot) or None when it is gone/zombie;
    guards against killing an unrelated process that reused a recorded pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _run(args: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=True, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


# ---------------------------------------------------------------- certificates


class Pki:
    """Certificates made with the openssl CLI: one CA signs the API server's serving
    certificate and every client certificate (CN = user, O = groups)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca_crt = directory / "ca.crt"
        self.ca_key = directory / "ca.key"
        self.sa_key = directory / "sa.key"
        self.sa_pub = directory / "sa.pub"

    def ensure_openssl(self) -> str:
        exe = shutil.which("openssl")
        if exe is None:
            raise ClusterError("the openssl CLI is needed to make the cluster's certificates: apt-get install openssl")
        return exe

    def create_ca(self) -> None:
        openssl = self.ensure_openssl()
        self.dir.mkdir(parents=True, exist_ok=True)
        _run([openssl, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(self.ca_key)])
        _run(
            [
                openssl,
                "req",
                "-x509",
                "-new",
                "-key",
                str(self.ca_key),
                "-out",
                str(self.ca_crt),
                "-days",
                "3650",
                "-subj",
                "/CN=kubetune-local-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            ]
        )
        # Service-account token signing key (ES256 is accepted by the API server).
        _run([openssl, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(self.sa_key)])
        _run([openssl, "ec", "-in", str(self.sa_key), "-pubout", "-out", str(self.sa_pub)])

    def issue(
        self, name: str, cn: str, groups: Sequence[str] = (), server_names: Sequence[str] = ()
    ) -> tuple[Path, Path]:
        """Issue a certificate; with server_names it is a serving certificate for them."""
        openssl = self.ensure_openssl()
        for part in (cn, *groups):
            if "/" in part or "\n" in part or not part:
                raise ClusterError(f"certificate subject part {part!r} must be non-empty and contain no '/'")
        key = self.dir / f"{name}.key"
        crt = self.dir / f"{name}.crt"
        csr = self.dir / f"{name}.csr"
        ext = self.dir / f"{name}.ext"
        subject = "".join(f"/O={g}" for g in groups) + f"/CN={cn}"
        _run([openssl, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)])
        _run([openssl, "req", "-new", "-key", str(key), "-out", str(csr), "-subj", subject])
        lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
        if server_names:
            alt = ",".join((f"IP:{n}" if n.replace(".", "").isdigit() else f"DNS:{n}") for n in server_names)
            lines += ["extendedKeyUsage=serverAuth", f"subjectAltName={alt}"]
        else:
            lines += ["extendedKeyUsage=clientAuth"]
        ext.write_text("\n".join(lines) + "\n")
        _run(
            [
                openssl,
                "x509",
                "-req",
                "-in",
                str(csr),
                "-CA",
                str(self.ca_crt),
                "-CAkey",
                str(self.ca_key),
                "-CAcreateserial",
                "-out",
                str(crt),
                "-days",
                "3650",
                "-extfile",
                str(ext),
            ]
        )
        csr.unlink()
        ext.unlink()
        return crt, key


# Fixed by training-operator v1.9 (pkg/cert) and controller-runtime's default: in a
# cluster the kubelet mounts the webhook Secret there.
WEBHOOK_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")
WEBHOOK_SERVICE_DNS = "training-operator.kubeflow.svc"


def webhook_pki(cache: Path) -> dict[str, bytes]:
    """CA + serving certificate for the training-operator webhook, made once per
    machine: the webhook reads them from one fixed path, so every local cluster on
    the machine must hand it the same files. The cert rotator accepts them only if
    the CA is named training-operator-ca, the server cert names the Service DNS
    name, and both outlive its 90-day lookahead; 127.0.0.1 lets the API server call
    the out-of-cluster webhook by URL."""
    directory = cache / "cluster-webhook-pki"
    names = {"ca.crt": "ca.crt", "ca.key": "ca.key", "tls.crt": "server.crt", "tls.key": "server.key"}
    if not directory.is_dir():
        openssl = Pki(directory).ensure_openssl()
        tmp = cache / f".cluster-webhook-pki-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ext = tmp / "server.ext"
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage=serverAuth\nsubjectAltName=DNS:{WEBHOOK_SERVICE_DNS},IP:127.0.0.1\n"
        )
        # PKCS#1 RSA keys: the rotator parses the CA key only in that form.
        _run([openssl, "genrsa", "-traditional", "-out", str(tmp / "ca.key"), "2048"])
        _run(
            [
                openssl,
                "req",
                "-x509",
                "-new",
                "-key",
                str(tmp / "ca.key"),
                "-out",
                str(tmp / "ca.crt"),
                "-days",
                "3650",
                "-subj",
                "/O=training-operator/CN=training-operator-ca",
                "-addext",
                "subjectAltName=DNS:training-operator-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,digitalSignature,keyEncipherment",
            ]
        )
        _run([openssl, "genrsa", "-traditional", "-out", str(tmp / "server.key"), "2048"])
        _run(
            [
                openssl,
                "req",
                "-new",
                "-key",
                str(tmp / "server.key"),
                "-out",
                str(tmp / "server.csr"),
                "-subj",
                f"/CN={WEBHOOK_SERVICE_DNS}",
            ]
        )
        _run(
            [
                openssl,
                "x509",
                "-req",
                "-in",
                str(tmp / "server.csr"),
                "-CA",
                str(tmp / "ca.crt"),
                "-CAkey",
                str(tmp / "ca.key"),
                "-CAcreateserial",
                "-out",
                str(tmp / "server.crt"),
                "-days",
                "3650",
                "-extfile",
                str(ext),
            ]
        )
        try:
            tmp.rename(directory)
        except OSError:
            # Another cluster made it first; use theirs.
            shutil.rmtree(tmp, ignore_errors=True)
    return {key: (directory / name).read_bytes() for key, name in names.items()}


def install_webhook_certs(pki: dict[str, bytes]) -> None:
    WEBHOOK_CERT_DIR.mkdir(parents=True, exist_ok=True)
    for name in ("tls.crt", "tls.key"):
        target = WEBHOOK_CERT_DIR / name
        if target.exists() and target.read_bytes() == pki[name]:
            continue
        tmp = WEBHOOK_CERT_DIR / f".{name}.{os.getpid()}"
        tmp.write_bytes(pki[name])
        tmp.replace(target)


def write_kubeconfig(
    path: Path, server: str, ca: Path, user: str, *, cert: tuple[Path, Path] | None = None, token: str | None = None
) -> Path:
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    user_entry: dict[str, str] = {}
    if cert is not None:
        user_entry = {"client-certificate-data": b64(cert[0]), "client-key-data": b64(cert[1])}
    elif token is not None:
        user_entry = {"token": token}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kubetune-local", "cluster": {"server": server, "certificate-authority-data": b64(ca)}}],
        "users": [{"name": user, "user": user_entry}],
        "contexts": [{"name": user, "context": {"cluster": "kubetune-local", "user": user}}],
        "current-context": user,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # JSON is valid YAML, and kubectl/kopf/client libraries read it as a kubeconfig.
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- the real node's images


@dataclass(frozen=True)
class LocalImages:
    """The images the real node has without a registry: `busybox` (sh and the usual
    applets, default command `sh`) and `pause` (the pod sandbox: sleeps)."""

    tarball: Path
    busybox: str
    pause: str


def _tar_add(tar: tarfile.TarFile, name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.linkname = kind, mode, 0, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def local_images(cache: Path) -> LocalImages:
    """A docker-archive tarball (what `ctr images import` reads) holding two images made
    of one layer: Debian's static busybox and a symlink per applet. Built once per
    busybox package version into $KUBETUNE_CACHE/images/; the same bytes every time
    (mtime 0, sorted entries), so the image ids are stable."""
    if not BUSYBOX.is_file():
        raise ClusterError(f"{BUSYBOX} is missing (Debian package busybox-static); {NODE_DEPS_HINT}")
    version = _run(["dpkg-query", "-W", "-f=${Version}", "busybox-static"]).stdout.strip()
    tag = re.sub(r"[^A-Za-z0-9_.-]", "-", version.split(":")[-1])  # no epoch
    images = LocalImages(
        cache / "images" / f"busybox-{tag}.tar", f"kubetune.local/busybox:{tag}", f"kubetune.local/pause:{tag}"
    )
    if images.tarball.is_file():
        return images
    applets = _run([str(BUSYBOX), "--list-full"]).stdout.split()
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.GNU_FORMAT) as layer:
        for d in ("bin", "dev", "etc", "proc", "sbin", "sys", "usr", "usr/bin", "usr/sbin", "var"):
            _tar_add(layer, d, tarfile.DIRTYPE, 0o755)
        _tar_add(layer, "tmp", tarfile.DIRTYPE, 0o1777)
        _tar_add(layer, "bin/busybox", tarfile.REGTYPE, 0o755, BUSYBOX.read_bytes())
        for applet in sorted(set(applets) - {"bin/busybox"}):
            _tar_add(layer, applet, tarfile.SYMTYPE, 0o777, link="/bin/busybox")
    layer_bytes = layer_buf.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    env = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
    configs = {
        images.busybox: {"Env": env, "Cmd": ["sh"]},
        # The sandbox's process only holds the pod's namespaces; the runtime kills it
        # with SIGKILL, so it need not handle signals as the real pause binary does.
        images.pause: {"Env": env, "Entrypoint": ["/bin/sleep", "2147483647"]},
    }
    manifest = []
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as archive:
        _tar_add(archive, "layer.tar", tarfile.REGTYPE, 0o644, layer_bytes)
        for ref, config in configs.items():
            blob = json.dumps(
                {
                    "architecture": "amd64",
                    "os": "linux",
                    "config": config,
                    "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                },
                sort_keys=True,
            ).encode()
            name = hashlib.sha256(blob).hexdigest() + ".json"
            _tar_add(archive, name, tarfile.REGTYPE, 0o644, blob)
            manifest.append({"Config": name, "RepoTags": [ref], "Layers": ["layer.tar"]})
        _tar_add(archive, "manifest.json", tarfile.REGTYPE, 0o644, json.dumps(manifest).encode())
    images.tarball.parent.mkdir(parents=True, exist_ok=True)
    tmp = images.tarball.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(out.getvalue())
    tmp.replace(images.tarball)
    return images


def _mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest first (as /proc/self/mountinfo names them)."""
    prefix = str(root).rstrip("/") + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if point == str(root) or point.startswith(prefix):
            points.append(point)
    return sorted(set(points), key=lambda x: x.count("/"), reverse=True)


def _unmount_all(root: Path) -> list[str]:
    """Unmount everything below root (the kubelet's volume mounts, containerd's
    rootfs overlays and network namespaces); returns what is still mounted."""
    for _ in range(3):
        points = _mounts_under(root)
        if not points:
            return []
        for point in points:
            if subprocess.run(["umount", point], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    return _mounts_under(root)


# ---------------------------------------------------------------- the real node's host setup


def cni_config(ipam_dir: Path) -> dict[str, object]:
    """The pod network: one Linux bridge (pre-created by _start_real_node with the node
    IP as its gateway address), host-local addresses, portmap for hostPorts.
    containerd adds the loopback plugin itself. No ipMasq: pods talk only to each
    other and to the node, never beyond this machine."""
    return {
        "cniVersion": "0.4.0",
        "name": "kubetune",
        "plugins": [
            {
                "type": "bridge",
                "bridge": CNI_BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                # A pod reaching itself through a Service comes back over its own port.
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    # Its allocations live and die with the cluster's state directory.
                    "dataDir": str(ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def containerd_config(
    node_dir: Path, sock: Path, sandbox_image: str, root: Path, registry: str, with_cri: bool = True
) -> str:
    """containerd 1.6 (config version 2): state, socket and network namespaces below
    node_dir, the root (images) at `root` (containerd_root), nothing of a system
    containerd shared. `registry` (host:port, plain HTTP) is the node's registry.
    with_cri=False: without the CRI plugin, for _forget_old_containers."""
    disabled = "" if with_cri else ', "io.containerd.grpc.v1.cri"'
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{root}"
state = "{node_dir / "containerd-state"}"
# Not needed by a CRI node; `opt` would write /opt/containerd.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp"{disabled}]

[grpc]
  address = "{sock}"

[{cri}]
  sandbox_image = "{sandbox_image}"
  # Root here lacks CAP_SYS_RESOURCE: without this every sandbox fails with runc's
  # "failed to update /proc/self/oom_score_adj: Permission denied" (the kubelet
  # asks -998 for sandboxes); with it, runc never lowers a score below its own.
  restrict_oom_score_adj = true
  # Pod network namespaces under our state dir, not /var/run/netns: down() finds them.
  netns_mounts_under_state_dir = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        # The kubelet's cgroupDriver is cgroupfs; both must agree.
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{node_dir / "cni"}"
    max_conf_num = 1
  # The node's registry speaks plain HTTP on loopback (as Docker allows for 127.0.0.0/8).
  [{cri}.registry.mirrors."{registry}"]
    endpoint = ["http://{registry}"]
"""


def real_node_manifests(api_port: int, default_class: bool = False) -> dict[str, object]:
    """Cluster objects the real node needs: CoreDNS's read access and its Service
    (kube-dns at CLUSTER_DNS_IP, served by CoreDNS on the node IP, so the
    EndpointSlice is written here, not by a selector), the `kubernetes` Service's
    endpoint (the node IP, where api-forward listens on the API server's port; the API
    server's own endpoint reconciler is off because 127.0.0.1 is no valid endpoint),
    and the local-volume class."""
    dns_labels = {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"}
    items: list[dict[str, object]] = [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "kubetune:coredns"},
            "rules": [
                {"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "kubetune:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubetune:coredns"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": COREDNS_USER}],
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": dns_labels},
            "spec": {
                "clusterIP": CLUSTER_DNS_IP,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                ],
            },
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kube-dns-node",
                "namespace": "kube-system",
                "labels": {
                    "kubernetes.io/service-name": "kube-dns",
                    "endpointslice.kubernetes.io/managed-by": "localcluster.kubetune.io",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}, "nodeName": REAL_NODE}],
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            ],
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kubernetes-node",
                "namespace": "default",
                "labels": {
                    "kubernetes.io/service-name": "kubernetes",
                    "endpointslice.kubernetes.io/managed-by": "localcluster.kubetune.io",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": api_port, "protocol": "TCP"}],
        },
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": REAL_STORAGE_CLASS,
                # Alone (no kwok nodes), the node's local volumes are what a claim without
                # a class gets, as on a cluster whose default class is node-local.
                "annotations": {"storageclass.kubernetes.io/is-default-class": str(default_class).lower()},
            },
            # Static PVs only (LocalCluster.real_node_volume), each pre-bound to its claim.
            "provisioner": "kubernetes.io/no-provisioner",
            "reclaimPolicy": "Retain",
            "volumeBindingMode": "Immediate",
        },
    ]
    return {"apiVersion": "v1", "kind": "List", "items": items}


def _cgroup_mounts() -> list[Path]:
    """Every cgroup hierarchy's mount point (v1 controllers, name=systemd, unified)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fstype = line.split(" - ", 1)[1].split()[0]
        if fstype in ("cgroup", "cgroup2"):
            points.append(Path(line.split()[4]))
    return points


def _make_cgroup_root() -> None:
    """The kubelet's cgroupRoot must exist in every hierarchy. A new v1 cpuset group
    starts with no CPUs and memory nodes; give it the parent's."""
    for mount in _cgroup_mounts():
        root = mount / CGROUP_ROOT
        root.mkdir(exist_ok=True)
        for name in ("cpuset.cpus", "cpuset.mems"):
            if (root / name).exists() and not (root / name).read_text().strip():
                (root / name).write_text((mount / name).read_text())


def _kill_cgroup_tree() -> list[str]:
    """SIGKILL every process below /CGROUP_ROOT (all of the node's containers, and
    nothing else) and remove the groups; returns those that would not go."""
    for _ in range(50):
        pids: set[int] = set()
        for mount in _cgroup_mounts():
            for procs in (mount / CGROUP_ROOT).rglob("cgroup.procs") if (mount / CGROUP_ROOT).is_dir() else ():
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(x) for x in procs.read_text().split())
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    left = []
    for mount in _cgroup_mounts():
        root = mount / CGROUP_ROOT
        if not root.is_dir():
            continue
        for dirpath, _dirs, _files in os.walk(root, topdown=False):
            try:
                os.rmdir(dirpath)
            except OSError:
                left.append(dirpath)
    return left


# Host settings the node changes: the kubelet sets the first five (protectKernelDefaults
# would make it refuse to start instead), the CNI bridge plugin turns on forwarding.
# _start_real_node records them; _cleanup_node_host puts them back.
NODE_SYSCTLS = (
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
)
# Chains the kubelet itself adds (kube-proxy --cleanup removes only kube-proxy's):
# (table, chain, the built-in chains that jump to it).
KUBELET_CHAINS = (
    ("filter", "KUBE-FIREWALL", ("INPUT", "OUTPUT")),
    ("filter", "KUBE-KUBELET-CANARY", ()),
    ("nat", "KUBE-KUBELET-CANARY", ()),
    ("mangle", "KUBE-KUBELET-CANARY", ()),
    ("mangle", "KUBE-IPTABLES-HINT", ()),
)


def _save_sysctls(path: Path) -> None:
    if path.exists():  # keep the values from before the first start
        return
    values = {name: (Path("/proc/sys") / name).read_text().strip() for name in NODE_SYSCTLS}
    path.write_text(json.dumps(values, indent=2) + "\n")


def _restore_sysctls(path: Path) -> list[str]:
    problems = []
    with contextlib.suppress(FileNotFoundError):
        for name, value in json.loads(path.read_text()).items():
            try:
                (Path("/proc/sys") / name).write_text(value + "\n")
            except OSError as err:
                problems.append(f"could not restore sysctl {name}={value}: {err}")
    return problems


def _remove_kubelet_chains() -> list[str]:
    problems = []
    for tool in ("iptables", "ip6tables"):
        exe = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
        if exe is None:
            continue
        for table, chain, parents in KUBELET_CHAINS:
            if subprocess.run([exe, "-t", table, "-S", chain], capture_output=True, check=False).returncode != 0:
                continue  # not there
            for parent in parents:
                while (
                    subprocess.run(
                        [exe, "-t", table, "-D", parent, "-j", chain], capture_output=True, check=False
                    ).returncode
                    == 0
                ):
                    pass
            subprocess.run([exe, "-t", table, "-F", chain], capture_output=True, check=False)
            result = subprocess.run([exe, "-t", table, "-X", chain], capture_output=True, text=True, check=False)
            if result.returncode != 0:
                problems.append(f"{tool} -t {table} -X {chain}: {result.stderr.strip()}")
    return problems


def containerd_root(cache: Path) -> Path:
    """The real node's containerd root (content store, unpacked layers, metadata), kept
    between clusters in the machine's cache: the trainer images are gigabytes, and
    unpacking them again for every cluster would cost minutes. One real node per
    machine, so one containerd at a time uses it."""
    return cache / "node-containerd"


def registry_root(cache: Path) -> Path:
    """The real node's registry storage, kept between clusters like containerd_root:
    a warm `hack/images.sh --push` sends only the layers that changed."""
    return cache / "node-registry"


def _cleanup_node_host(node_dir: Path, kube_proxy: Path, ip: Path, ctr_root: Path | None = None) -> list[str]:
    """Undo what a real node did to the host, also after a crash: its containers'
    processes and shims, mounts under node_dir, kube-proxy's iptables rules, the
    bridge, the cgroups, the kubelet's /var/log/containers links. Idempotent;
    returns what could not be undone."""
    problems: list[str] = []
    sock = str(node_dir / "containerd.sock")
    # Shims outlive containerd by design; ours name our socket on their command line.
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if (
                argv
                and Path(argv[0].decode(errors="replace")).name.startswith("containerd-shim")
                and sock.encode() in argv
            ):
                os.kill(int(entry.name), signal.SIGKILL)
    problems += [f"cgroup {d} still has processes" for d in _kill_cgroup_tree()]
    for root in (node_dir, ctr_root):
        # The sandboxes' /dev/shm mounts live below containerd's root.
        if root is not None and root.is_dir():
            problems += [f"still mounted: {m}" for m in _unmount_all(root)]
    # kube-proxy's own cleanup removes exactly its KUBE-* chains and rules.
    result = subprocess.run([str(kube_proxy), "--cleanup"], capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        problems.append(f"{kube_proxy} --cleanup failed: {result.stderr.strip()[-500:]}")
    problems += _remove_kubelet_chains()
    if Path(f"/sys/class/net/{CNI_BRIDGE}").exists():
        result = subprocess.run([str(ip), "link", "del", CNI_BRIDGE], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            problems.append(f"ip link del {CNI_BRIDGE}: {result.stderr.strip()}")
    logs = Path("/var/log/containers")
    if logs.is_dir():
        for link in logs.iterdir():
            with contextlib.suppress(OSError):
                if link.is_symlink() and os.readlink(link).startswith(str(node_dir) + "/"):
                    link.unlink()
    problems += _restore_sysctls(node_dir / "host-sysctls.json")
    # runc's and the shims' state roots, when nothing else uses them.
    for leftover in ("/run/containerd/runc/k8s.io", "/run/containerd/runc", "/run/containerd/s", "/run/containerd"):
        with contextlib.suppress(OSError):
            os.rmdir(leftover)
    # libcni's result cache, keyed by our network's name.
    for cached in Path("/var/lib/cni/results").glob("kubetune-*") if Path("/var/lib/cni/results").is_dir() else ():
        with contextlib.suppress(OSError):
            cached.unlink()
    return problems


# ---------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    pid: int
    start_ticks: int
    log: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _proc_start_ticks(self.pid) == self.start_ticks

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()


def _log_tail(log: Path, lines: int = 25) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


# ---------------------------------------------------------------- the cluster


class LocalCluster:
    """One control plane whose state lives in `base_dir` (default: $KUBETUNE_CLUSTER_DIR
    or <repo>/.cluster): certs in pki/, logs in logs/<component>.log, pids in pids/,
    kubeconfigs at the top."""

    def __init__(
        self,
        base_dir: Path | None = None,
        cache: Path | None = None,
        real_node: bool | None = None,
        kwok_nodes: bool | None = None,
    ) -> None:
        """real_node: also start the real node (None: KUBETUNE_REAL_NODE=1 turns it on;
        a running cluster's state file wins, so `down` stops what `up` started).
        kwok_nodes: the fake kwok nodes (None: on unless KUBETUNE_KWOK_NODES=0). Without
        them the real node is untainted, the only node, and real_node is required."""
        self.base_dir = (base_dir or default_base_dir()).resolve()
        self.cache = cache or default_cache()
        self.real_node = os.environ.get(REAL_NODE_ENV, "") == "1" if real_node is None else real_node
        self.kwok_nodes = os.environ.get(KWOK_NODES_ENV, "") != "0" if kwok_nodes is None else kwok_nodes
        self.pki = Pki(self.base_dir / "pki")
        self.logs_dir = self.base_dir / "logs"
        self.pids_dir = self.base_dir / "pids"
        self.state_file = self.base_dir / "state.json"
        self.procs: dict[str, Proc] = {}
        self.ports: dict[str, int] = {}
        self._load_state()

    # -- paths a test uses
    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (user kubetune-admin, group system:masters: bypasses RBAC)."""
        return self.base_dir / "kubeconfig"

    @property
    def tester_kubeconfig(self) -> Path:
        """Kubeconfig of the non-admin user kubetune-tester (only system:authenticated)."""
        return self.base_dir / "kubeconfig-user"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['kube-apiserver']}"

    def log_path(self, component: str) -> Path:
        return self.logs_dir / f"{component}.log"

    # -- state
    def _load_state(self) -> None:
        if not self.state_file.exists():
            return
        state = json.loads(self.state_file.read_text())
        self.real_node = bool(state.get("real_node", False)) or self.real_node
        self.kwok_nodes = bool(state.get("kwok_nodes", True))
        self.ports = {k: int(v) for k, v in state.get("ports", {}).items()}
        for name, p in state.get("procs", {}).items():
            self.procs[name] = Proc(name, int(p["pid"]), int(p["start_ticks"]), Path(p["log"]))

    def _save_state(self) -> None:
        state = {
            "ports": self.ports,
            "procs": {
                n: {"pid": p.pid, "start_ticks": p.start_ticks, "log": str(p.log)} for n, p in self.procs.items()
            },
            "versions": read_versions(),
            "real_node": self.real_node,
            "kwok_nodes": self.kwok_nodes,
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)

    @property
    def components(self) -> tuple[str, ...]:
        """The processes this cluster runs, in start order."""
        return COMPONENTS + (NODE_COMPONENTS if self.real_node else ())

    @property
    def node_dir(self) -> Path:
        """The real node's state: configs, containerd root/state, kubelet root, pod logs, volumes."""
        return self.base_dir / "node"

    # -- health
    def dead_components(self) -> list[str]:
        return [name for name in self.components if name not in self.procs or not self.procs[name].alive()]

    def check_alive(self) -> None:
        """Raise ComponentDied naming the log of every component that is not running."""
        dead = [n for n in self.components if n in self.procs and not self.procs[n].alive()]
        if not dead:
            return
        parts = []
        for name in dead:
            proc = self.procs[name]
            code = proc.exit_code()
            how = f"exited with code {code}" if code is not None else "is no longer running"
            parts.append(
                f"{name} (pid {proc.pid}) {how}; read {proc.log}\n--- last lines of {proc.log}:\n{_log_tail(proc.log)}"
            )
        raise ComponentDied("local cluster component died: " + "\n".join(parts))

    def is_running(self) -> bool:
        if not self.procs or self.dead_components():
            return False
        try:
            return self._get("/readyz") == 200
        except OSError:
            return False

    # -- HTTP against the API server with the admin certificate
    def _ssl_context(self, client: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_crt))
        if client:
            ctx.load_cert_chain(str(self.pki.dir / "admin.crt"), str(self.pki.dir / "admin.key"))
        return ctx

    def _get(self, path: str) -> int:
        req = urllib.request.Request(self.server + path)
        try:
            with urllib.request.urlopen(req, context=self._ssl_context(), timeout=5) as resp:
                status: int = resp.status
                return status
        except urllib.error.HTTPError as err:
            return err.code

    # -- kubectl
    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster (admin unless `kubeconfig` says otherwise).
        With check=True a non-zero exit raises ClusterError carrying stderr."""
        exe = shutil.which("kubectl")
        if exe is None:
            raise ClusterError("kubectl is not on PATH; install kubectl (any version >= 1.30)")
        cmd = [exe, "--kubeconfig", str(kubeconfig or self.kubeconfig), *args]
        result = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr}{result.stdout}")
        return result

    def get_json(self, *args: str, kubeconfig: Path | None = None) -> dict[str, object]:
        out = self.kubectl("get", *args, "-o", "json", kubeconfig=kubeconfig).stdout
        data: dict[str, object] = json.loads(out)
        return data

    def wait_for(
        self,
        what: str,
        condition: Callable[[], bool],
        timeout: float = DEFAULT_TIMEOUT_S,
        logs: Sequence[str] = (),
        interval: float = 0.5,
    ) -> None:
        """Poll `condition` until true. A dead component or the deadline raises an error
        naming `what` and the logs of `logs` (component names) to read."""
        deadline = time.monotonic() + timeout
        last_error = ""
        while True:
            self.check_alive()
            try:
                if condition():
                    return
            except (ClusterError, OSError, subprocess.SubprocessError, ValueError, KeyError) as err:
                last_error = f" (last error: {err})"
            if time.monotonic() > deadline:
                hints = "; ".join(f"read {self.log_path(c)}" for c in logs) or f"logs in {self.logs_dir}"
                raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}{last_error}; {hints}")
            time.sleep(interval)

    # -- identities
    def user_kubeconfig(self, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig for any user and groups, by a client certificate the cluster CA
        signs. Without groups the user has only what RBAC grants system:authenticated."""
        name = "user-" + "".join(c if c.isalnum() or c in "-." else "_" for c in user)
        if groups:
            name += "-" + "-".join("".join(c if c.isalnum() else "_" for c in g) for g in groups)
        cert = self.pki.issue(name, user, groups)
        return write_kubeconfig(
            self.base_dir / "users" / f"{name}.kubeconfig", self.server, self.pki.ca_crt, user, cert=cert
        )

    def service_account_kubeconfig(self, namespace: str, name: str, duration: str = "24h") -> Path:
        """A kubeconfig that authenticates as ServiceAccount namespace/name through a
        TokenRequest (what a pod of that ServiceAccount would get)."""
        token = self.kubectl("create", "token", name, "-n", namespace, f"--duration={duration}").stdout.strip()
        path = self.base_dir / "users" / f"sa-{namespace}-{name}.kubeconfig"
        return write_kubeconfig(
            path, self.server, self.pki.ca_crt, f"system:serviceaccount:{namespace}:{name}", token=token
        )

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        """Create a namespace and wait for its `default` ServiceAccount, without which
        the API server refuses pods in it."""
        manifest = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}
        self.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        self.wait_for(
            f"ServiceAccount {name}/default",
            lambda: self.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
            logs=("kube-controller-manager",),
        )

    # -- lifecycle
    def up(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Start everything and wait until it is ready. Returns at once when a cluster
        is already running in base_dir; a half-dead one is stopped and started anew."""
        if self.is_running():
            return
        if self.procs:
            self.down()
        if not self.kwok_nodes and not self.real_node:
            raise ClusterError(
                f"no nodes: {KWOK_NODES_ENV}=0 (NODES=real-only) leaves only the real node; turn it on too "
                f"({REAL_NODE_ENV}=1 or real_node=True)"
            )
        binaries = self._binaries()
        started = time.monotonic()
        # A fresh start must not inherit the etcd data, certificates or logs of an
        # earlier cluster in the same directory; a crashed real node may have left
        # mounts there, and rmtree must not reach through them.
        if self.base_dir.is_dir() and _unmount_all(self.base_dir):
            raise ClusterError(
                f"{self.base_dir} still has mounts below it ({', '.join(_mounts_under(self.base_dir))}); "
                "unmount them (umount -R) before starting a cluster there"
            )
        shutil.rmtree(self.base_dir, ignore_errors=True)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for sub in (self.logs_dir, self.pids_dir):
            sub.mkdir(parents=True, exist_ok=True)
        try:
            self._start(binaries, timeout)
        except BaseException:
            # Keep logs for reading but leave no process behind.
            self.down(remove_state=False)
            raise
        print(
            f"localcluster: up in {time.monotonic() - started:.1f}s; export KUBECONFIG={self.kubeconfig}",
            file=sys.stderr,
        )

    def _binaries(self) -> dict[str, Path]:
        built = COMPONENTS + (("kubelet", "kube-proxy", "coredns") if self.real_node else ())
        found = {c: binary_path(c, self.cache) for c in built}
        missing = [str(p) for p in found.values() if not p.is_file()]
        if missing:
            raise ClusterError(
                "control-plane binaries are not built: "
                + ", ".join(missing)
                + "\nbuild them with `make cluster-build` (bash hack/cluster/build.sh; ~40 min cold, cached after)"
            )
        if self.real_node:
            found.update(self._host_binaries())
        return found

    def _host_binaries(self) -> dict[str, Path]:
        """The real node's programs from Debian packages (hack/cluster/node-deps.sh), after
        checking what the node needs of the host: root, overlayfs, the packages."""
        if os.geteuid() != 0:
            raise ClusterError(
                "the real node (real_node=True / KUBETUNE_REAL_NODE=1 / NODES=real) needs root: "
                "containerd, the kubelet's mounts and the CNI bridge do; run as root or without it"
            )
        found: dict[str, Path] = {}
        for name in ("containerd", "containerd-shim-runc-v2", "ctr", "runc", "iptables", "conntrack", "ip"):
            exe = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
            if exe is None:
                raise ClusterError(f"{name} is not on PATH; the real node needs it; {NODE_DEPS_HINT}")
            found[name] = Path(exe)
        for plugin in ("bridge", "host-local", "loopback", "portmap"):
            if not (CNI_BIN_DIR / plugin).is_file():
                raise ClusterError(
                    f"CNI plugin {CNI_BIN_DIR / plugin} is missing (package containernetworking-plugins); "
                    + NODE_DEPS_HINT
                )
        version = _run([str(found["containerd"]), "--version"]).stdout.split()
        if len(version) < 3 or not version[2].lstrip("v").startswith(CONTAINERD_MINOR + "."):
            raise ClusterError(
                f"{found['containerd']} reports {' '.join(version)!r}; the real node's containerd config "
                f"(localcluster's containerd_config) is written for containerd {CONTAINERD_MINOR}.x, Debian 12's"
            )
        if "overlay" not in Path("/proc/filesystems").read_text():
            subprocess.run(["modprobe", "overlay"], capture_output=True, check=False)
            if "overlay" not in Path("/proc/filesystems").read_text():
                raise ClusterError("the kernel has no overlay filesystem (containerd's snapshotter needs it)")
        return found

    def _pytorchjob_crd(self) -> Path:
        version = read_versions()["TRAINING_OPERATOR_VERSION"]
        crd = self.cache / "bin" / f"training-operator-{version}" / "crds" / "kubeflow.org_pytorchjobs.yaml"
        if not crd.is_file():
            raise ClusterError(f"{crd} is missing; run `make cluster-build` (it copies the CRD from the Go module)")
        return crd

    def _spawn(self, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        log = self.log_path(name)
        with log.open("ab") as out:
            popen = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                env={**os.environ, **(env or {})},
                # Own session and process group: killable as a group, and not hit
                # by the Ctrl-C meant for `make`/pytest.
                start_new_session=True,
            )
        ticks = _proc_start_ticks(popen.pid) or 0
        self.procs[name] = Proc(name, popen.pid, ticks, log, popen)
        (self.pids_dir / f"{name}.pid").write_text(f"{popen.pid}\n")
        self._save_state()

    def _start(self, binaries: dict[str, Path], timeout: float) -> None:
        for comp in (
            "etcd-client",
            "etcd-peer",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kwok",
            "to-metrics",
            "to-probe",
            "to-webhook",
            *(
                (
                    "kubelet",
                    "kubelet-healthz",
                    "kube-proxy-healthz",
                    "kube-proxy-metrics",
                    "coredns-health",
                    "coredns-ready",
                )
                if self.real_node
                else ()
            ),
        ):
            self.ports[comp] = free_port()
        self._make_pki()
        self._save_state()
        d = self.base_dir

        etcd_url = f"http://127.0.0.1:{self.ports['etcd-client']}"
        peer_url = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        self._spawn(
            "etcd",
            [
                str(binaries["etcd"]),
                "--name=kubetune",
                f"--data-dir={d / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=kubetune={peer_url}",
                # Test data: durability is not worth the fsync cost on a shared disk.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self.wait_for("etcd /health", lambda: _http_ok(etcd_url + "/health"), timeout, logs=("etcd",))

        pki = self.pki.dir
        self._spawn(
            "kube-apiserver",
            [
                str(binaries["kube-apiserver"]),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.ports['kube-apiserver']}",
                f"--cert-dir={d / 'apiserver-certs'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={self.pki.ca_crt}",
                "--authorization-mode=Node,RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={self.pki.sa_pub}",
                f"--service-account-signing-key-file={self.pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # The "kubernetes" Service cannot point at a loopback address.
                "--endpoint-reconciler-type=none",
                *self._apiserver_node_args(),
                "--allow-privileged=true",
                "--profiling=false",
            ],
        )
        self.wait_for(
            "kube-apiserver /readyz", lambda: self._get("/readyz") == 200, timeout, logs=("kube-apiserver", "etcd")
        )

        self._spawn(
            "kube-controller-manager",
            [
                *self._control_plane_component_args("kube-controller-manager", binaries),
                f"--cert-dir={d / 'kcm-certs'}",
                "--leader-elect=false",
                # Each controller acts as its own ServiceAccount, so RBAC applies as in a real cluster.
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={self.pki.sa_key}",
                f"--root-ca-file={self.pki.ca_crt}",
                f"--cluster-signing-cert-file={self.pki.ca_crt}",
                f"--cluster-signing-key-file={self.pki.ca_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                *self._control_plane_component_args("kube-scheduler", binaries),
                f"--cert-dir={d / 'scheduler-certs'}",
                "--leader-elect=false",
            ],
        )
        kwok_kc = write_kubeconfig(
            d / "kubeconfigs" / "kwok",
            self.server,
            self.pki.ca_crt,
            "kwok",
            cert=self._cert("kwok", groups=("system:masters",)),
        )
        self._spawn(
            "kwok",
            [
                str(binaries["kwok"]),
                f"--kubeconfig={kwok_kc}",
                f"--config={HERE / 'kwok' / 'stages.yaml'}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--node-ip=127.0.0.1",
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{self.ports['kwok']}",
                f"--node-port={self.ports['kwok']}",
            ],
        )

        manifests = HERE / "manifests"
        # The kwok nodes and the kwok-provisioned default class go together.
        kwok_manifests = ["-f", str(manifests / "nodes.yaml"), "-f", str(manifests / "storage.yaml")]
        self.kubectl("apply", *(kwok_manifests if self.kwok_nodes else []), "-f", str(manifests / "kubeflow.yaml"))
        self.kubectl(
            "apply", "--server-side", "--field-manager=kubetune-localcluster", "-f", str(self._pytorchjob_crd())
        )
        self.wait_for(
            "CRD pytorchjobs.kubeflow.org to be Established",
            lambda: self._crd_established("pytorchjobs.kubeflow.org"),
            timeout,
            logs=("kube-apiserver",),
        )

        self._install_training_operator_webhook()
        to_kc = write_kubeconfig(
            d / "kubeconfigs" / "training-operator",
            self.server,
            self.pki.ca_crt,
            "training-operator",
            cert=self._cert("training-operator", groups=("system:masters",)),
        )
        self._spawn(
            "training-operator",
            [
                str(binaries["training-operator"]),
                f"--kubeconfig={to_kc}",
                "--enable-scheme=pytorchjob",
                "--gang-scheduler-name=",
                f"--metrics-bind-address=127.0.0.1:{self.ports['to-metrics']}",
                f"--health-probe-bind-address=127.0.0.1:{self.ports['to-probe']}",
                f"--webhook-server-port={self.ports['to-webhook']}",
            ],
            env={"KUBECONFIG": str(to_kc), "MY_POD_NAMESPACE": "kubeflow", "TMPDIR": "/tmp"},
        )

        if self.kwok_nodes:
            self.wait_for("kwok to mark every node Ready", self._nodes_ready, timeout, logs=("kwok",))
        self.wait_for(
            "ServiceAccount default/default",
            lambda: self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0,
            timeout,
            logs=("kube-controller-manager",),
        )
        probe = f"http://127.0.0.1:{self.ports['to-probe']}/readyz"
        self.wait_for("training-operator /readyz", lambda: _http_ok(probe), timeout, logs=("training-operator",))
        if self.real_node:
            self._start_real_node(binaries, timeout)

    def _control_plane_component_args(self, name: str, binaries: dict[str, Path]) -> list[str]:
        """Binary, identity (system:<name>, a client cert of the cluster CA) and serving flags
        shared by the controller-manager and the scheduler."""
        kubeconfig = write_kubeconfig(
            self.base_dir / "kubeconfigs" / name, self.server, self.pki.ca_crt, f"system:{name}", cert=self._cert(name)
        )
        return [
            str(binaries[name]),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.ports[name]}",
        ]

    def _cert(self, name: str, groups: Sequence[str] = ()) -> tuple[Path, Path]:
        # The controller-manager and scheduler need the user names that the bootstrap
        # RBAC policy binds their roles to.
        cn = {
            "kube-controller-manager": "system:kube-controller-manager",
            "kube-scheduler": "system:kube-scheduler",
        }.get(name, name)
        return self.pki.issue(name, cn, groups)

    def _make_pki(self) -> None:
        self.pki.create_ca()
        self.pki.issue(
            "apiserver",
            "kube-apiserver",
            server_names=(
                "127.0.0.1",
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                "10.96.0.1",
            ),
        )
        server = f"https://127.0.0.1:{self.ports['kube-apiserver']}"
        write_kubeconfig(
            self.kubeconfig,
            server,
            self.pki.ca_crt,
            ADMIN_USER,
            cert=self.pki.issue("admin", ADMIN_USER, ("system:masters",)),
        )
        write_kubeconfig(
            self.tester_kubeconfig, server, self.pki.ca_crt, TEST_USER, cert=self.pki.issue("tester", TEST_USER)
        )
        if self.real_node:
            # The API server's identity towards the kubelet (logs, exec, port-forward).
            self.pki.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",))

    def _install_training_operator_webhook(self) -> None:
        """Register the training-operator's PyTorchJob validating webhook as its
        manifests do, but by URL on 127.0.0.1 since it runs out of cluster. Its cert
        rotator refuses to report ready until it has injected the CA into this
        configuration, and it reads the serving cert from the Secret-mount path."""
        pki = webhook_pki(self.cache)
        install_webhook_certs(pki)
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "training-operator-webhook-cert", "namespace": "kubeflow"},
            "type": "Opaque",
            "data": {k: base64.b64encode(v).decode() for k, v in pki.items()},
        }
        url = f"https://127.0.0.1:{self.ports['to-webhook']}/validate-kubeflow-org-v1-pytorchjob"
        webhook = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "validator.training-operator.kubeflow.org"},
            "webhooks": [
                {
                    "name": "validator.pytorchjob.training-operator.kubeflow.org",
                    "admissionReviewVersions": ["v1"],
                    "clientConfig": {"url": url, "caBundle": base64.b64encode(pki["ca.crt"]).decode()},
                    "failurePolicy": "Fail",
                    "sideEffects": "None",
                    "rules": [
                        {
                            "apiGroups": ["kubeflow.org"],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE", "UPDATE"],
                            "resources": ["pytorchjobs"],
                        }
                    ],
                }
            ],
        }
        self.kubectl(
            "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [secret, webhook]})
        )

    # -- the real node
    def _apiserver_node_args(self) -> list[str]:
        if not self.real_node:
            return []
        pki = self.pki.dir
        return [
            # Else the API server dials the node by its name for logs/exec, and no DNS
            # on this machine resolves kubetune-real-0.
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
        ]

    def _owns_real_node(self) -> bool:
        """Whether the machine-wide parts of the real node (bridge, iptables rules, cgroup
        root, sysctls) are this cluster's to clean up: no other cluster has claimed them."""
        try:
            return REAL_NODE_OWNER.read_text().strip() == str(self.base_dir)
        except FileNotFoundError:
            return True

    def _claim_real_node(self, binaries: dict[str, Path]) -> None:
        """One real node per machine. Refuse when another cluster's node runs; clean up
        after one whose processes are gone (a killed test run) before starting ours."""
        if REAL_NODE_OWNER.exists():
            other = Path(REAL_NODE_OWNER.read_text().strip())
            if other != self.base_dir:
                previous = LocalCluster(other, self.cache)
                kubelet = previous.procs.get("kubelet")
                if kubelet is not None and kubelet.alive():
                    raise ClusterError(
                        f"the local cluster in {other} already runs the real node (one per machine: the bridge "
                        f"{CNI_BRIDGE}, the pod network {POD_CIDR} and the cgroup /{CGROUP_ROOT} are machine-wide); "
                        f"stop it with `KUBETUNE_CLUSTER_DIR={other} make cluster-down`"
                    )
                _cleanup_node_host(
                    previous.node_dir, binaries["kube-proxy"], binaries["ip"], containerd_root(self.cache)
                )
        _cleanup_node_host(self.node_dir, binaries["kube-proxy"], binaries["ip"], containerd_root(self.cache))
        REAL_NODE_OWNER.parent.mkdir(parents=True, exist_ok=True)
        REAL_NODE_OWNER.write_text(f"{self.base_dir}\n")

    def _start_real_node(self, binaries: dict[str, Path], timeout: float) -> None:
        self._claim_real_node(binaries)
        nd = self.node_dir
        for sub in ("cni", "cni-ipam", "containerd-state", "kubelet", "pod-logs", "volumes"):
            (nd / sub).mkdir(parents=True, exist_ok=True)
        images = local_images(self.cache)
        _save_sysctls(nd / "host-sysctls.json")
        # The bridge exists before any pod so that its address (the node IP) is there
        # for the kubelet's server and CoreDNS; the CNI bridge plugin adopts it.
        ip = str(binaries["ip"])
        _run([ip, "link", "add", CNI_BRIDGE, "type", "bridge"])
        _run([ip, "addr", "add", f"{NODE_IP}/{POD_CIDR.split('/')[1]}", "dev", CNI_BRIDGE])
        _run([ip, "link", "set", CNI_BRIDGE, "up"])
        _make_cgroup_root()
        api_port = self.ports["kube-apiserver"]
        self._spawn(
            "api-forward",
            [sys.executable, str(HERE / "tcpforward.py"), f"{NODE_IP}:{api_port}", f"127.0.0.1:{api_port}"],
        )
        (nd / "cni" / "10-kubetune.conflist").write_text(json.dumps(cni_config(nd / "cni-ipam"), indent=2) + "\n")

        self._start_registry(timeout)
        root = containerd_root(self.cache)
        self._forget_old_containers(binaries, root, images.pause, timeout)
        sock = nd / "containerd.sock"
        (nd / "containerd.toml").write_text(containerd_config(nd, sock, images.pause, root, self.registry))
        self._spawn("containerd", [str(binaries["containerd"]), f"--config={nd / 'containerd.toml'}"])
        ctr = [str(binaries["ctr"]), f"--address={sock}", "--namespace=k8s.io"]
        self.wait_for(
            "containerd to answer on " + str(sock),
            lambda: subprocess.run([*ctr, "version"], capture_output=True, check=False).returncode == 0,
            timeout,
            logs=("containerd",),
        )
        # The sandbox (pause) and busybox images come from a tarball, so that the node
        # works before anything is pushed to its registry.
        _run([*ctr, "images", "import", str(images.tarball)], timeout=120)

        self.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps(real_node_manifests(self.ports["kube-apiserver"], default_class=not self.kwok_nodes)),
        )
        kubelet_kc = write_kubeconfig(
            nd / "kubelet.kubeconfig",
            self.server,
            self.pki.ca_crt,
            f"system:node:{REAL_NODE}",
            # The Node authorizer gives system:node:<name> in system:nodes its own node and pods.
            cert=self.pki.issue("kubelet", f"system:node:{REAL_NODE}", ("system:nodes",)),
        )
        (nd / "kubelet.json").write_text(json.dumps(self._kubelet_config(sock), indent=2) + "\n")
        self._spawn(
            "kubelet",
            [
                str(binaries["kubelet"]),
                f"--config={nd / 'kubelet.json'}",
                f"--kubeconfig={kubelet_kc}",
                f"--hostname-override={REAL_NODE}",
                f"--node-ip={NODE_IP}",
                f"--root-dir={nd / 'kubelet'}",
                f"--cert-dir={nd / 'kubelet-pki'}",
                f"--node-labels={REAL_NODE_LABEL}=real",
                "--v=1",
            ],
        )
        self.wait_for(
            f"the kubelet to register node {REAL_NODE}",
            lambda: self.kubectl("get", "node", REAL_NODE, check=False).returncode == 0,
            timeout,
            logs=("kubelet", "containerd"),
        )
        # Extended resources are advertised by patching the node's status; the kubelet
        # then keeps them and derives allocatable (no device plugin involved).
        self.kubectl(
            "patch",
            "node",
            REAL_NODE,
            "--subresource=status",
            "--type=json",
            "-p",
            json.dumps([{"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": str(REAL_NODE_GPUS)}]),
        )

        proxy_kc = write_kubeconfig(
            nd / "kube-proxy.kubeconfig",
            self.server,
            self.pki.ca_crt,
            "system:kube-proxy",
            # The bootstrap binding system:node-proxier names this user.
            cert=self.pki.issue("kube-proxy", "system:kube-proxy"),
        )
        (nd / "kube-proxy.json").write_text(json.dumps(self._kube_proxy_config(proxy_kc), indent=2) + "\n")
        self._spawn("kube-proxy", [str(binaries["kube-proxy"]), f"--config={nd / 'kube-proxy.json'}", "--v=1"])

        dns_kc = write_kubeconfig(
            nd / "coredns.kubeconfig",
            self.server,
            self.pki.ca_crt,
            COREDNS_USER,
            cert=self.pki.issue("coredns", COREDNS_USER),
        )
        (nd / "Corefile").write_text(
            f""".:53 {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:{self.ports["coredns-health"]}
    ready 127.0.0.1:{self.ports["coredns-ready"]}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {dns_kc} {COREDNS_USER}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
    # No forward plugin: names outside the cluster are refused, never sent off this machine.
}}
"""
        )
        self._spawn("coredns", [str(binaries["coredns"]), f"-conf={nd / 'Corefile'}"])

        self.wait_for(
            f"node {REAL_NODE} Ready with nvidia.com/gpu {REAL_NODE_GPUS} allocatable",
            self._real_node_ready,
            timeout,
            logs=("kubelet", "containerd"),
        )
        healthz = f"http://127.0.0.1:{self.ports['kube-proxy-healthz']}/healthz"
        self.wait_for("kube-proxy /healthz", lambda: _http_ok(healthz), timeout, logs=("kube-proxy",))
        ready = f"http://127.0.0.1:{self.ports['coredns-ready']}/ready"
        self.wait_for("CoreDNS /ready", lambda: _http_ok(ready), timeout, logs=("coredns",))

    @property
    def registry(self) -> str:
        """host:port of the real node's registry (plain HTTP on loopback): push with
        `KUBETUNE_REGISTRY=<this>/kubetune bash hack/images.sh --push`; the node pulls
        `<this>/kubetune/<image>:<tag>` from it."""
        return f"127.0.0.1:{REGISTRY_PORT}"

    def _start_registry(self, timeout: float) -> None:
        if not REGISTRY_BINARY.is_file():
            raise ClusterError(f"{REGISTRY_BINARY} is missing (Debian package docker-registry); {NODE_DEPS_HINT}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", REGISTRY_PORT)) == 0:
                raise ClusterError(
                    f"port {REGISTRY_PORT} on 127.0.0.1 is taken, and the real node's registry listens there; "
                    "free it, or set KUBETUNE_REGISTRY_PORT to another port"
                )
        storage = registry_root(self.cache)
        storage.mkdir(parents=True, exist_ok=True)
        config = {  # JSON is YAML: distribution reads it as its config file
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
            "http": {"addr": self.registry},
        }
        (self.node_dir / "registry.yml").write_text(json.dumps(config, indent=2) + "\n")
        # The storage outlives clusters and every build pushes the same tags again: drop
        # the layers only superseded manifests still use, before serving.
        with self.log_path("registry").open("ab") as log:
            subprocess.run(
                [str(REGISTRY_BINARY), "garbage-collect", "--delete-untagged", str(self.node_dir / "registry.yml")],
                stdout=log,
                stderr=log,
                timeout=600,
                check=False,
            )
        self._spawn("registry", [str(REGISTRY_BINARY), "serve", str(self.node_dir / "registry.yml")])
        self.wait_for(
            f"the node's registry on {self.registry}",
            lambda: _http_ok(f"http://{self.registry}/v2/"),
            timeout,
            logs=("registry",),
        )

    def _forget_old_containers(self, binaries: dict[str, Path], root: Path, pause: str, timeout: float) -> None:
        """containerd_root outlives clusters; the containers of an earlier node (its pods
        died with it) would come back as sandboxes whose network and state are gone.
        Remove them with a containerd that has no CRI plugin, before the node's own
        containerd (and its CRI plugin) reads them. Images and layers stay."""
        if not (root / "io.containerd.metadata.v1.bolt" / "meta.db").is_file():
            return
        scratch = self.node_dir / "containerd-cleanup"
        scratch.mkdir(parents=True, exist_ok=True)
        sock = scratch / "containerd.sock"
        config = scratch / "containerd.toml"
        config.write_text(containerd_config(scratch, sock, pause, root, self.registry, with_cri=False))
        ctr = [str(binaries["ctr"]), f"--address={sock}", "--namespace=k8s.io"]
        log = (self.logs_dir / "containerd-cleanup.log").open("ab")
        proc = subprocess.Popen([str(binaries["containerd"]), f"--config={config}"], stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + timeout
            while subprocess.run([*ctr, "version"], capture_output=True, check=False).returncode != 0:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise ClusterError(
                        f"containerd on {root} did not start to remove old containers; see "
                        f"{self.logs_dir / 'containerd-cleanup.log'}"
                    )
                time.sleep(0.2)
            old = _run([*ctr, "containers", "list", "--quiet"]).stdout.split()
            if old:
                _run([*ctr, "containers", "delete", *old], timeout=120)
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        # The CRI plugin's per-sandbox and per-container directories of those containers.
        for sub in ("sandboxes", "containers"):
            shutil.rmtree(root / "io.containerd.grpc.v1.cri" / sub, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)

    def _real_node_ready(self) -> bool:
        node = self.get_json("node", REAL_NODE)
        status: dict[str, object] = node.get("status", {})  # type: ignore[assignment]
        conditions: list[dict[str, str]] = status.get("conditions") or []  # type: ignore[assignment]
        allocatable: dict[str, str] = status.get("allocatable") or {}  # type: ignore[assignment]
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
        return ready and allocatable.get("nvidia.com/gpu") == str(REAL_NODE_GPUS)

    def _kubelet_config(self, sock: Path) -> dict[str, object]:
        nd = self.node_dir
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": self.ports["kubelet"],
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.ports["kubelet-healthz"],
            "containerRuntimeEndpoint": f"unix://{sock}",
            # This machine: cgroup v1 hierarchies (+ a cgroup2 `unified` mount), no
            # systemd as init, no swap accounting; kubelet 1.36 refuses v1 unless told.
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "failSwapOn": False,
            "cgroupRoot": f"/{CGROUP_ROOT}",
            "podLogsDir": str(nd / "pod-logs"),
            "volumePluginDir": str(nd / "volume-plugins"),
            # Keeps the kwok tiers' pods off a node that really runs them; alone, the
            # node takes every pod, as a GPU cluster's node does.
            "registerWithTaints": [REAL_NODE_TAINT] if self.kwok_nodes else [],
            "clusterDNS": [CLUSTER_DNS_IP],
            "clusterDomain": CLUSTER_DOMAIN,
            # Pods get only the cluster DNS; the host's resolvers are never handed out.
            "resolvConf": "",
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.pki.ca_crt)},
            },
            "authorization": {"mode": "Webhook"},
            # A shared test machine's disk may be fuller than the defaults allow; the
            # node must not evict test pods or delete the imported images for it.
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "maxPods": 30,
            "nodeStatusUpdateFrequency": "10s",
        }

    def _kube_proxy_config(self, kubeconfig: Path) -> dict[str, object]:
        return {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": REAL_NODE,
            "bindAddress": NODE_IP,
            "healthzBindAddress": f"127.0.0.1:{self.ports['kube-proxy-healthz']}",
            "metricsBindAddress": f"127.0.0.1:{self.ports['kube-proxy-metrics']}",
            "mode": "iptables",
            "clusterCIDR": POD_CIDR,
            # This kernel has no br_netfilter, so a reply from a pod on the same bridge
            # would bypass the DNAT's reverse translation; masquerading every Service
            # connection sends replies back through the host.
            "iptables": {"masqueradeAll": True, "localhostNodePorts": False},
            # Leave the host's conntrack table size alone (a shared VM).
            "conntrack": {"maxPerCore": 0, "min": 0},
            "nodePortAddresses": [f"{NODE_IP}/32"],
        }

    def real_node_volume(self, namespace: str, claim: str, size: str = "10Gi") -> Path:
        """A local directory on the real node as a PersistentVolume pre-bound to the
        claim namespace/claim (class kubetune-real-local; the claim may be created
        before or after). Returns the directory, so a test can put files there
        before a pod reads them and read back what the pod wrote. World-writable:
        the pods run as uid 65532 and local volumes get no ownership change."""
        if not self.real_node:
            raise ClusterError("real_node_volume needs the real node: LocalCluster(real_node=True) or NODES=real")
        path = self.node_dir / "volumes" / f"{namespace}-{claim}"
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)
        pv = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"real-{namespace}-{claim}"[:253], "labels": {REAL_NODE_LABEL: "real"}},
            "spec": {
                "capacity": {"storage": size},
                # The kubelet does not enforce access modes for local volumes; the
                # operator's claims ask for any of these.
                "accessModes": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": REAL_STORAGE_CLASS,
                "local": {"path": str(path)},
                "claimRef": {"namespace": namespace, "name": claim},
                "nodeAffinity": {
                    "required": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [REAL_NODE]}
                                ]
                            }
                        ]
                    }
                },
            },
        }
        self.kubectl("apply", "-f", "-", input=json.dumps(pv))
        return path

    @property
    def busybox_image(self) -> str:
        """The busybox image imported into the real node (imagePullPolicy: Never or IfNotPresent)."""
        return local_images(self.cache).busybox

    def _drain_real_node(self) -> None:
        """Delete the real node's pods while its kubelet and the API server run, so the
        kubelet stops their containers and tears their network down (CNI DEL); what
        is left after that is killed by _cleanup_node_host."""
        alive = [n for n in ("kube-apiserver", "kubelet") if n in self.procs and self.procs[n].alive()]
        if len(alive) < 2:
            return
        selector = f"--field-selector=spec.nodeName={REAL_NODE}"
        with contextlib.suppress(ClusterError, OSError, subprocess.SubprocessError, KeyError):
            self.kubectl("delete", "pods", "-A", selector, "--grace-period=1", "--wait=false", timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.get_json("pods", "-A", selector)["items"]:
                time.sleep(0.5)

    def _crd_established(self, name: str) -> bool:
        crd = self.get_json("crd", name)
        conditions = crd.get("status", {}).get("conditions") or []  # type: ignore[attr-defined]
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    def _nodes_ready(self) -> bool:
        nodes = self.get_json("nodes")
        ready = set()
        for item in nodes["items"]:  # type: ignore[attr-defined]
            for cond in item.get("status", {}).get("conditions", []):
                if cond["type"] == "Ready" and cond["status"] == "True":
                    ready.add(item["metadata"]["name"])
        return ready >= set(GPU_NODES + CPU_NODES)

    def down(self, remove_state: bool = True) -> list[str]:
        """Stop every process this cluster started (by recorded pid, whole process
        group, SIGTERM then SIGKILL) and, with remove_state, delete base_dir.
        Returns the names of the processes it had to stop."""
        stopped: list[str] = []
        procs = dict(self.procs)
        # A crash between spawn and state save still leaves a pid file.
        if self.pids_dir.is_dir():
            for pidfile in self.pids_dir.glob("*.pid"):
                if pidfile.stem not in procs:
                    with contextlib.suppress(ValueError):
                        pid = int(pidfile.read_text().strip())
                        ticks = _proc_start_ticks(pid)
                        if ticks is not None and _is_our_binary(pid, self.cache):
                            procs[pidfile.stem] = Proc(pidfile.stem, pid, ticks, self.log_path(pidfile.stem))
        if self.real_node:
            self._drain_real_node()
        order = [n for n in reversed(self.components) if n in procs] + [n for n in procs if n not in self.components]
        # One at a time, clients first and etcd last: an API server whose etcd is
        # already gone hangs in its graceful shutdown.
        for name in order:
            proc = procs[name]
            if not proc.alive():
                continue
            stopped.append(name)
            _signal_group(proc, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while proc.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.alive():
                _signal_group(proc, signal.SIGKILL)
            if proc.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=5)
        self.procs = {}
        if self.real_node:
            if self._owns_real_node():
                problems = _cleanup_node_host(
                    self.node_dir,
                    binary_path("kube-proxy", self.cache),
                    Path(shutil.which("ip") or "/usr/sbin/ip"),
                    containerd_root(self.cache),
                )
                REAL_NODE_OWNER.unlink(missing_ok=True)
            else:
                # Another cluster runs the machine's real node (this one was refused):
                # its bridge, rules and cgroups are not ours to remove.
                problems = [f"still mounted: {m}" for m in _unmount_all(self.node_dir)]
            if problems:
                # Never delete the state directory through a mount that is still there.
                raise ClusterError(
                    "the real node left things behind (state kept in "
                    + f"{self.base_dir}):\n  "
                    + "\n  ".join(problems)
                )
        if remove_state:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.state_file.unlink()
            shutil.rmtree(self.pids_dir, ignore_errors=True)
        return stopped

    def status(self) -> str:
        if not self.procs:
            return f"no cluster in {self.base_dir}"
        lines = [f"cluster in {self.base_dir}: server {self.server}"]
        for name in self.components:
            proc = self.procs.get(name)
            state = "missing" if proc is None else ("running" if proc.alive() else "DEAD")
            pid = "" if proc is None else f" pid {proc.pid}"
            lines.append(f"  {name:24} {state}{pid}  log {self.log_path(name)}")
        return "\n".join(lines)


def _is_our_binary(pid: int, cache: Path) -> bool:
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    # containerd and the registry are Debian's (the real node); the rest are build.sh's.
    return exe.startswith(str(cache / "bin")) or exe in ("/usr/bin/containerd", str(REGISTRY_BINARY))


def _signal_group(proc: Proc, sig: signal.Signals) -> None:
    # The recorded start time proves the pid still belongs to our process; its
    # group id is its pid because it was started in a new session.
    if _proc_start_ticks(proc.pid) != proc.start_ticks and proc.popen is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _http_ok(url: str) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def running_cluster(base_dir: Path | None = None) -> Iterator[LocalCluster]:
    """Start a cluster for the duration of a with-block; always stops it."""
    cluster = LocalCluster(base_dir)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down(remove_state=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="localcluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="state directory (default $KUBETUNE_CLUSTER_DIR or .cluster)"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="start the cluster (no-op when running)")
    sub.add_parser("down", help="stop every process it started and remove its state")
    sub.add_parser("status", help="show processes and logs")
    kc = sub.add_parser("kubeconfig", help="print the path of a new kubeconfig for USER in GROUPs")
    kc.add_argument("user")
    kc.add_argument("--group", action="append", default=[])
    vol = sub.add_parser(
        "volume",
        help="make a directory on the real node a PersistentVolume pre-bound to NAMESPACE/CLAIM; print it",
    )
    vol.add_argument("namespace")
    vol.add_argument("claim")
    vol.add_argument("--size", default="10Gi")
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.dir)
    try:
        if args.cmd == "up":
            if cluster.is_running():
                print(
                    f"localcluster: already running in {cluster.base_dir}; export KUBECONFIG={cluster.kubeconfig}",
                    file=sys.stderr,
                )
                return 0
            cluster.up()
        elif args.cmd == "down":
            stopped = cluster.down()
            print(
                f"localcluster: stopped {', '.join(stopped) or 'nothing'}; removed {cluster.base_dir}", file=sys.stderr
            )
        elif args.cmd == "status":
            print(cluster.status())
            return 0 if cluster.is_running() else 1
        elif args.cmd == "kubeconfig":
            if not cluster.is_running():
                raise ClusterError(f"no running cluster in {cluster.base_dir}; run `make cluster-up` first")
            print(cluster.user_kubeconfig(args.user, args.group))
        elif args.cmd == "volume":
            if not cluster.is_running():
                raise ClusterError(f"no running cluster in {cluster.base_dir}; run `make cluster-up NODES=real` first")
            print(cluster.real_node_volume(args.namespace, args.claim, args.size))
    except ClusterError as err:
        print(f"localcluster: {err}", file=sys.stderr)
        return 1
    return 0
