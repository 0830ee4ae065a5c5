"""A real Kubernetes control plane on 127.0.0.1 for tests: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kwok (fake GPU nodes and pod lifecycle)
and the Kubeflow training-operator, run as plain processes from binaries that
hack/cluster/build.sh compiled into $KUBETUNE_CACHE/bin.

Standard library only, so that `make cluster-up` runs with any python3 >= 3.11.

CLI:   python3 hack/cluster/localcluster.py up|down|status
       python3 hack/cluster/localcluster.py kubeconfig USER [--group G ...]
Python:
       cluster = LocalCluster(Path("/tmp/x"))
       cluster.up()
       cluster.kubectl("get", "nodes")
       cluster.down()
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
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

ADMIN_USER = "kubetune-admin"
TEST_USER = "kubetune-tester"
SERVICE_CIDR = "10.96.0.0/16"
FAKE_FAIL_ANNOTATION = "kubetune.io/fake-fail"
FAKE_DURATION_ANNOTATION = "kubetune.io/fake-duration"
FAKE_EXIT_CODE_ANNOTATION = "kubetune.io/fake-exit-code"
GPU_NODES = ("kwok-gpu-0", "kwok-gpu-1")
CPU_NODES = ("kwok-cpu-0",)
STORAGE_CLASS = "kubetune-local"

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
        "kwok": versions["KWOK_VERSION"],
        "training-operator": versions["TRAINING_OPERATOR_VERSION"],
        "helm": versions["HELM_VERSION"],
    }


def binary_path(component: str, cache: Path | None = None) -> Path:
    """Where build.sh puts the binary of `component` for the pinned version."""
    version = component_versions(read_versions())[component]
    return (cache or default_cache()) / "bin" / f"{component}-{version}" / component


def free_port() -> int:
    # Bind-then-release can race with another process; every component fails
    # loudly on a taken port and up() reports its log, so a retry is obvious.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
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

    def __init__(self, base_dir: Path | None = None, cache: Path | None = None) -> None:
        self.base_dir = (base_dir or default_base_dir()).resolve()
        self.cache = cache or default_cache()
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
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)

    # -- health
    def dead_components(self) -> list[str]:
        return [name for name in COMPONENTS if name not in self.procs or not self.procs[name].alive()]

    def check_alive(self) -> None:
        """Raise ComponentDied naming the log of every component that is not running."""
        dead = [n for n in COMPONENTS if n in self.procs and not self.procs[n].alive()]
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
        binaries = self._binaries()
        started = time.monotonic()
        # A fresh start must not inherit the etcd data, certificates or logs of an
        # earlier cluster in the same directory.
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
        found = {c: binary_path(c, self.cache) for c in COMPONENTS}
        missing = [str(p) for p in found.values() if not p.is_file()]
        if missing:
            raise ClusterError(
                "control-plane binaries are not built: "
                + ", ".join(missing)
                + "\nbuild them with `make cluster-build` (bash hack/cluster/build.sh; ~40 min cold, cached after)"
            )
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
        self.kubectl(
            "apply",
            "-f",
            str(manifests / "nodes.yaml"),
            "-f",
            str(manifests / "storage.yaml"),
            "-f",
            str(manifests / "kubeflow.yaml"),
        )
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

        self.wait_for("kwok to mark every node Ready", self._nodes_ready, timeout, logs=("kwok",))
        self.wait_for(
            "ServiceAccount default/default",
            lambda: self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0,
            timeout,
            logs=("kube-controller-manager",),
        )
        probe = f"http://127.0.0.1:{self.ports['to-probe']}/readyz"
        self.wait_for("training-operator /readyz", lambda: _http_ok(probe), timeout, logs=("training-operator",))

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
        order = [n for n in reversed(COMPONENTS) if n in procs] + [n for n in procs if n not in COMPONENTS]
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
        for name in COMPONENTS:
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
    return exe.startswith(str(cache / "bin"))


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
    except ClusterError as err:
        print(f"localcluster: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
