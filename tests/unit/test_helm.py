"""The Helm chart, rendered by a real helm (built from its Go module by hack/cluster/build.sh):
lint, both RBAC scopes, Pod Security "restricted", no wildcard RBAC, the operator's rules,
the CRDs it ships, the schema rejecting mistyped keys, and flags that follow the values."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

import kubetune
from kubetune.controller.rbac import OPERATOR_RULES
from support.helm import CHART, NAMESPACE, RELEASE, ROOT, helm, render, render_error, versions_env

# Golden-file switch: with it set to 1, the values table of README.md is rewritten instead of
# failing when stale (`make generate` sets it). The chart's files/ are written by `kubetune crds`
# and checked by test_generated.py.
UPDATE_ENV = "KUBETUNE_UPDATE_CHART"


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def container_args(docs: list[dict[str, Any]]) -> list[str]:
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    args: list[str] = pod["containers"][0]["args"]
    return args


SCOPES = {
    "cluster": (),
    "namespace": ("--set", "rbac.scope=namespace"),
    "namespace-two": ("--set", "rbac.scope=namespace", "--set", "watchNamespaces={team-a,team-b}"),
}


@pytest.fixture(params=sorted(SCOPES), ids=str)
def scope_docs(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    yield request.param, render(*SCOPES[request.param])


# --- version ---------------------------------------------------------------------------


def test_one_version_for_chart_images_and_package() -> None:
    version = (ROOT / "VERSION").read_text().strip()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == version, "Chart.yaml version must equal VERSION"
    assert chart["appVersion"] == version, "Chart.yaml appVersion must equal VERSION"
    assert kubetune.__version__ == version, "operator/kubetune/__init__.py __version__ must equal VERSION"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(rf'^version = "{re.escape(version)}"$', pyproject, re.M), "pyproject.toml version != VERSION"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{version}]" in changelog, f"CHANGELOG.md has no section for {version}"


# --- lint ------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [(), ("--set", "rbac.scope=namespace")], ids=["cluster", "namespace"])
def test_helm_lint_strict(args: tuple[str, ...]) -> None:
    result = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_chart_packages_with_its_crds_and_rules(tmp_path: Path) -> None:
    result = helm("package", str(CHART), "--destination", str(tmp_path))
    assert result.returncode == 0, result.stderr
    version = (ROOT / "VERSION").read_text().strip()
    with tarfile.open(tmp_path / f"kubetune-{version}.tgz") as archive:
        names = set(archive.getnames())
    expected = {f"kubetune/crds/{p.name}" for p in (ROOT / "crds").glob("*.yaml")}
    expected |= {"kubetune/files/operator-rules.yaml", "kubetune/values.schema.json", "kubetune/templates/NOTES.txt"}
    assert expected <= names, sorted(expected - names)


def test_helm_lint_rejects_a_mistyped_key() -> None:
    result = helm("lint", str(CHART), "--set", "operator.imagee=x")
    assert result.returncode != 0
    assert "imagee" in result.stdout + result.stderr


# --- values and schema -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--set", "operator.imagee=x"), "imagee"),
        (("--set", "rbac.scop=namespace"), "scop"),
        (("--set", "trainer.automodel.image.tg=1"), "tg"),
        (("--set", "operator.securityContext.runAsNonroot=true"), "runAsNonroot"),
        (("--set", "operator.livenessProbe.period=3"), "period"),
        (("--set", "tolerations[0].key=x"), "tolerations"),
    ],
    ids=lambda v: v[-1] if isinstance(v, tuple) else v,
)
def test_mistyped_value_key_is_rejected(args: tuple[str, ...], named: str) -> None:
    error = render_error(*args)
    assert "additional properties" in error.lower() or "additionalproperties" in error.lower(), error
    assert named in error, error


@pytest.mark.parametrize(
    "args",
    [
        ("--set", "rbac.scope=everywhere"),
        ("--set", "trainer.imagePullPolicy=Sometimes"),
        ("--set", "operator.healthPort=0"),
        ("--set", "trainer.outputClaim=Not_A_Claim"),
        ("--set", "operator.image.digest=latest"),
    ],
    ids=lambda v: v[-1],
)
def test_invalid_value_is_rejected(args: tuple[str, ...]) -> None:
    render_error(*args)


def test_cluster_scope_with_watch_namespaces_fails_with_a_fix() -> None:
    error = render_error("--set", "watchNamespaces={team-a}")
    assert "rbac.scope=namespace" in error, error


def _value_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        out: list[str] = []
        for key, value in node.items():
            out += [f"{prefix}{key}", *_value_paths(value, f"{prefix}{key}.")]
        return out
    return []


def _schema_node(schema: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The schema of a dotted values path: a named property, or the value schema of a map."""
    node: dict[str, Any] | None = schema
    for key in path.split("."):
        if node is None:
            return None
        if key in node.get("properties", {}):
            node = node["properties"][key]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return None
    return node


def test_every_value_is_in_the_schema_and_every_object_is_closed() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [p for p in _value_paths(values) if _schema_node(schema, p) is None]
    assert not missing, f"values.yaml keys without a schema entry in values.schema.json: {missing}"

    def walk(node: dict[str, Any], path: str) -> Iterator[str]:
        if node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is not False:
            yield path
        for key, sub in node.get("properties", {}).items():
            yield from walk(sub, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], f"{path}[]")

    open_objects = list(walk(schema, "values"))
    assert not open_objects, f"objects in values.schema.json that accept unknown keys: {open_objects}"


def test_every_value_is_documented() -> None:
    """cert-manager's rule: a `# --` comment right above each key, or above a block that holds it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented: list[str] = []
    stack: list[tuple[int, str, bool]] = []  # indent, key, documented (itself or an ancestor)
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w-]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        above = number - 1
        while above >= 0 and lines[above].strip().startswith("#") and not lines[above].strip().startswith("# --"):
            above -= 1
        documented = (above >= 0 and lines[above].strip().startswith("# --")) or (bool(stack) and stack[-1][2])
        stack.append((indent, key, documented))
        value = line.split(":", 1)[1].strip()
        following = next((x for x in lines[number + 1 :] if x.strip() and not x.strip().startswith("#")), "")
        is_block = value == "" and len(following) - len(following.lstrip()) > indent
        if not is_block and not documented:
            undocumented.append(".".join(k for _, k, _ in stack))
    assert not undocumented, f"values.yaml keys without a `# --` comment: {undocumented}"


README = CHART / "README.md"
TABLE_START, TABLE_END = (
    "<!-- values table: generated from values.yaml by tests/unit/test_helm.py -->",
    "<!-- end of values table -->",
)


def values_table() -> str:
    """Markdown rows for every key that carries a `# --` comment: its path, default and text."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    values = yaml.safe_load("\n".join(lines))
    rows = ["| Key | Default | Description |", "|---|---|---|"]
    stack: list[tuple[int, str]] = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w-]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        comment: list[str] = []
        above = number - 1
        while above >= 0 and lines[above].strip().startswith("#"):
            comment.insert(0, lines[above].strip().lstrip("#").strip())
            if lines[above].strip().startswith("# --"):
                break
            above -= 1
        if not comment or not comment[0].startswith("--"):
            continue
        path = [k for _, k in stack]
        default: Any = values
        for k in path:
            default = default[k]
        text = " ".join(comment)[2:].strip().replace("|", "\\|")
        shown = json.dumps(default, separators=(", ", ": "))
        rows.append(f"| `{'.'.join(path)}` | `{shown}` | {text} |")
    return "\n".join(rows) + "\n"


def test_readme_shows_the_real_schema_error() -> None:
    error = render_error("--set", "operator.imagee=x")
    shown = README.read_text().split("$ helm template kubetune helm/kubetune --set operator.imagee=x\n", 1)[1]
    shown = shown.split("```", 1)[0]
    assert shown.strip() == error.strip(), f"README.md shows a different error than helm prints:\n{error}"


def test_readme_values_table_is_current() -> None:
    text = README.read_text()
    assert TABLE_START in text and TABLE_END in text, f"{README} lacks the values table markers"
    head, rest = text.split(TABLE_START + "\n", 1)
    current, tail = rest.split(TABLE_END, 1)
    expected = values_table()
    if current != expected and os.environ.get(UPDATE_ENV) == "1":
        README.write_text(head + TABLE_START + "\n" + expected + TABLE_END + tail)
        current = expected
    assert current == expected, (
        f"the values table of {README.relative_to(ROOT)} differs from values.yaml: run `make generate` and commit "
        "the result"
    )


# --- RBAC ------------------------------------------------------------------------------


def test_rendered_rules_are_operator_rules(scope_docs: tuple[str, list[dict[str, Any]]]) -> None:
    scope, docs = scope_docs
    roles = [
        r for r in of_kind(docs, "ClusterRole" if scope == "cluster" else "Role")
        if not r["metadata"]["name"].endswith(("-volumes", "-leader"))
    ]  # fmt: skip
    assert roles, f"no {'ClusterRole' if scope == 'cluster' else 'Role'} rendered"
    for role in roles:
        assert role["rules"] == OPERATOR_RULES


def test_volume_reads_are_a_cluster_role_in_both_scopes(scope_docs: tuple[str, list[dict[str, Any]]]) -> None:
    """Which volume backs a claim is cluster-scoped: a ClusterRole of read verbs only, in
    the namespaced scope too, with exactly VOLUME_RULES."""
    from kubetune.controller.rbac import VOLUME_RULES

    _, docs = scope_docs
    [role] = [r for r in of_kind(docs, "ClusterRole") if r["metadata"]["name"].endswith("-volumes")]
    assert role["rules"] == VOLUME_RULES
    assert yaml.safe_load((CHART / "files" / "operator-volume-rules.yaml").read_text()) == VOLUME_RULES
    [binding] = [b for b in of_kind(docs, "ClusterRoleBinding") if b["metadata"]["name"].endswith("-volumes")]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_no_wildcard_rbac(scope_docs: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = scope_docs
    roles = of_kind(docs, "ClusterRole") + of_kind(docs, "Role")
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for field in ("verbs", "resources", "apiGroups", "resourceNames"):
                assert "*" not in rule.get(field, []), f"{role['kind']} {role['metadata']['name']}: wildcard in {field}"
                assert not any("*" in item for item in rule.get(field, [])), f"wildcard pattern in {field}: {rule}"
            assert "nonResourceURLs" not in rule
            # escalate/bind/impersonate would let the operator grant itself more than these rules.
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule


def _without_volume_reads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chart's documents less what both scopes have: the volume-read ClusterRole and the
    leader-election Role, with their bindings."""
    return [d for d in docs if not ("Role" in d["kind"] and d["metadata"]["name"].endswith(("-volumes", "-leader")))]


def test_cluster_scope_renders_cluster_role_and_all_namespaces() -> None:
    docs = _without_volume_reads(render())
    assert not of_kind(docs, "Role") and not of_kind(docs, "RoleBinding")
    binding = only(docs, "ClusterRoleBinding")
    role = only(docs, "ClusterRole")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    account = only(docs, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    args = container_args(docs)
    assert "--all-namespaces" in args
    assert not [a for a in args if a.startswith("--namespace")]


@pytest.mark.parametrize(
    ("args", "namespaces"),
    [
        (("--set", "rbac.scope=namespace"), [NAMESPACE]),
        (("--set", "rbac.scope=namespace", "--set", "watchNamespaces={team-a,team-b}"), ["team-a", "team-b"]),
    ],
    ids=["release-namespace", "two-namespaces"],
)
def test_namespace_scope_renders_a_role_per_watched_namespace(args: tuple[str, ...], namespaces: list[str]) -> None:
    docs = _without_volume_reads(render(*args))
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    roles = of_kind(docs, "Role")
    bindings = of_kind(docs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(namespaces)
    assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(namespaces)
    account = only(docs, "ServiceAccount")
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
        ]
    args_rendered = container_args(docs)
    assert "--all-namespaces" not in args_rendered
    assert [a for a in args_rendered if a.startswith("--namespace")] == [f"--namespace={ns}" for ns in namespaces]


def test_rbac_create_false_renders_no_rbac() -> None:
    docs = render("--set", "rbac.create=false")
    assert not [d for d in docs if d["kind"] in {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}]


# --- Pod Security "restricted" ---------------------------------------------------------

_ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
_SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
_SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """The checks of Pod Security Standards "restricted" (which includes "baseline"), field by
    field, as https://kubernetes.io/docs/concepts/security/pod-security-standards/ lists them."""
    out: list[str] = []
    psc = pod.get("securityContext") or {}
    containers = [
        (kind, c) for kind in ("initContainers", "containers", "ephemeralContainers") for c in pod.get(kind) or []
    ]
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            out.append(f"{field} is true")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("pod windowsOptions.hostProcess")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= _ALLOWED_VOLUMES:
            out.append(f"volume {volume['name']} has type {sorted(kinds)}")
    for sysctl in psc.get("sysctls") or []:
        if sysctl["name"] not in _SAFE_SYSCTLS:
            out.append(f"unsafe sysctl {sysctl['name']}")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"pod seccompProfile {pod_seccomp}")
    if (psc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        out.append("pod appArmorProfile Unconfined")
    if psc.get("runAsUser") == 0:
        out.append("pod runAsUser 0")
    for name, opts in [("pod", psc.get("seLinuxOptions"))] + [
        (c["name"], (c.get("securityContext") or {}).get("seLinuxOptions")) for _, c in containers
    ]:
        if opts and (opts.get("type", "") not in _SELINUX_TYPES or opts.get("user") or opts.get("role")):
            out.append(f"{name}: seLinuxOptions {opts}")
    for kind, c in containers:
        where = f"{kind}/{c['name']}"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"{where}: privileged")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{where}: windowsOptions.hostProcess")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{where}: procMount {sc['procMount']}")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"{where}: hostPort {port['hostPort']}")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation is not false")
        run_as_non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if run_as_non_root is not True:
            out.append(f"{where}: runAsNonRoot is not true (pod or container)")
        if sc.get("runAsUser") == 0:
            out.append(f"{where}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where}: seccompProfile is {seccomp} (needs RuntimeDefault or Localhost)")
        if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
            out.append(f"{where}: appArmorProfile Unconfined")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{where}: capabilities.drop lacks ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{where}: adds capabilities {caps['add']}")
    return out


def test_operator_pod_meets_pod_security_restricted(scope_docs: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = scope_docs
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    # Stated explicitly too, so a refactor of the checker cannot hide a dropped field.
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] != 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert not any(pod.get(f) for f in ("hostNetwork", "hostPID", "hostIPC"))


@pytest.mark.parametrize(
    ("args", "violation"),
    [
        (("--set", "operator.securityContext.allowPrivilegeEscalation=true"), "allowPrivilegeEscalation"),
        (("--set", "operator.securityContext.capabilities.drop=null"), "capabilities.drop lacks ALL"),
        (("--set", "operator.podSecurityContext.seccompProfile.type=Unconfined"), "seccompProfile"),
        (
            (
                "--set",
                "operator.podSecurityContext.runAsNonRoot=false",
                "--set",
                "operator.securityContext.runAsNonRoot=false",
            ),
            "runAsNonRoot",
        ),
    ],
    ids=["privilege-escalation", "capabilities", "seccomp", "root"],
)
def test_restricted_checker_catches_a_weakened_pod(args: tuple[str, ...], violation: str) -> None:
    pod = only(render(*args), "Deployment")["spec"]["template"]["spec"]
    assert any(violation in v for v in restricted_violations(pod)), restricted_violations(pod)


# --- Deployment ------------------------------------------------------------------------


def test_deployment_shape_and_probes() -> None:
    docs = render()
    deployment = only(docs, "Deployment")
    assert deployment["metadata"]["namespace"] == NAMESPACE
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    template = spec["template"]
    assert spec["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    pod = template["spec"]
    assert pod["serviceAccountName"] == only(docs, "ServiceAccount")["metadata"]["name"]
    (container,) = pod["containers"]
    assert container["command"] == ["kubetune"]
    assert container["args"][0] == "operator"
    assert container["ports"] == [
        {"name": "health", "containerPort": 8080, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 8081, "protocol": "TCP"},
    ]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    assert container["resources"]["requests"] and "nvidia.com/gpu" not in str(container["resources"])


def test_container_args_follow_the_values() -> None:
    version = (ROOT / "VERSION").read_text().strip()
    assert container_args(render()) == [
        "operator",
        "--all-namespaces",
        f"--automodel-image=ghcr.io/kubetune/trainer-automodel:{version}",
        f"--unsloth-image=ghcr.io/kubetune/trainer-unsloth:{version}",
        f"--initializer-image=ghcr.io/kubetune/kubetune-operator:{version}",  # the operator's own
        "--image-pull-policy=IfNotPresent",
        "--output-claim=kubetune-output",
        "--health-port=8080",
        "--metrics-port=8081",
        "--leader-elect",
        f"--leader-election-namespace={NAMESPACE}",
        "--lease-seconds=15",
    ]
    digest = "sha256:" + "a" * 64
    docs = render(
        "--set", "rbac.scope=namespace",
        "--set", "watchNamespaces={ml}",
        "--set", "trainer.automodel.image.repository=registry.local/automodel",
        "--set", "trainer.automodel.image.tag=dev1",
        "--set", f"trainer.unsloth.image.digest={digest}",
        "--set", "trainer.imagePullPolicy=Never",
        "--set", "trainer.outputClaim=results",
        "--set", "operator.healthPort=9090",
        "--set", "metrics.port=0",
        "--set", "operator.extraArgs={--verbose}",
        "--set", "operator.image.tag=abc",
        "--set", "operator.leaseSeconds=30",
        "--set", "initializer.hfEndpoint=https://hub.internal",
    )  # fmt: skip
    assert container_args(docs) == [
        "operator",
        "--namespace=ml",
        "--automodel-image=registry.local/automodel:dev1",
        f"--unsloth-image=ghcr.io/kubetune/trainer-unsloth@{digest}",
        "--initializer-image=ghcr.io/kubetune/kubetune-operator:abc",  # follows operator.image
        "--hf-endpoint=https://hub.internal",
        "--image-pull-policy=Never",
        "--output-claim=results",
        "--health-port=9090",
        "--metrics-port=0",
        "--leader-elect",
        f"--leader-election-namespace={NAMESPACE}",
        "--lease-seconds=30",
        "--verbose",
    ]
    (container,) = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "ghcr.io/kubetune/kubetune-operator:abc"
    assert container["ports"] == [{"name": "health", "containerPort": 9090, "protocol": "TCP"}]
    own = render("--set", "initializer.image.repository=registry.local/fetch", "--set", "initializer.image.tag=v9")
    assert "--initializer-image=registry.local/fetch:v9" in container_args(own)
    assert not [d for d in docs if d["kind"] in ("Service", "ServiceMonitor")], "metrics.port=0: nothing to scrape"


@pytest.mark.parametrize("scope", sorted(SCOPES))
def test_rendered_command_parses_with_the_operator_cli(scope: str) -> None:
    """The container runs `kubetune <args>`: the real argument parser must accept them and
    read back the values the chart was given."""
    from kubetune.cli import build_parser

    docs = render(*SCOPES[scope])
    (container,) = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["kubetune"]
    parsed = build_parser().parse_args(container["args"])
    assert parsed.command == "operator"
    if scope == "cluster":
        assert parsed.all_namespaces is True
    else:
        expected = ["team-a", "team-b"] if scope == "namespace-two" else [NAMESPACE]
        assert [n for item in parsed.namespace for n in item.split(",") if n] == expected
        assert parsed.all_namespaces is False
    version = (ROOT / "VERSION").read_text().strip()
    assert parsed.automodel_image == f"ghcr.io/kubetune/trainer-automodel:{version}"
    assert parsed.unsloth_image == f"ghcr.io/kubetune/trainer-unsloth:{version}"
    assert parsed.image_pull_policy == "IfNotPresent"
    assert parsed.output_claim == "kubetune-output"
    assert parsed.initializer_image == f"ghcr.io/kubetune/kubetune-operator:{version}"
    assert parsed.health_port == container["ports"][0]["containerPort"] == 8080
    assert parsed.metrics_port == container["ports"][1]["containerPort"] == 8081


def test_service_link_variables_do_not_break_the_operator_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen on the real node: the Service <release>-metrics made Kubernetes set
    KUBETUNE_METRICS_PORT=tcp://IP:8081 in the operator pod, and `kubetune operator`
    crashed building its parser. The chart turns service links off, and the command the
    chart renders parses even with such variables set."""
    from kubetune.cli import build_parser

    docs = render()
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False
    (container,) = pod["containers"]
    monkeypatch.setenv("KUBETUNE_METRICS_PORT", "tcp://10.96.40.254:8081")
    monkeypatch.setenv("KUBETUNE_HEALTH_PORT", "tcp://10.96.40.255:8080")
    parsed = build_parser().parse_args(container["args"])
    assert (parsed.metrics_port, parsed.health_port) == (8081, 8080)


def test_metrics_service_and_optional_service_monitor() -> None:
    docs = render()
    deployment = only(docs, "Deployment")
    service = only(docs, "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8081, "targetPort": "metrics", "protocol": "TCP"}]
    assert not [d for d in docs if d["kind"] == "ServiceMonitor"], "a ServiceMonitor only when asked for"
    docs = render(
        "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "metrics.serviceMonitor.interval=15s",
        "--set", "metrics.serviceMonitor.labels.release=prom",
    )  # fmt: skip
    monitor = only(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= only(docs, "Service")["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    failed = render_error("--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.service.enabled=false")
    assert "metrics.serviceMonitor.enabled needs metrics.service.enabled=true" in failed


def test_default_images_are_the_ones_make_images_builds() -> None:
    listed = subprocess.run(["bash", "hack/images.sh", "--list"], cwd=ROOT, capture_output=True, text=True, check=True)
    docs = render()
    (container,) = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    args = container_args(docs)
    rendered = [
        container["image"],
        next(a.split("=", 1)[1] for a in args if a.startswith("--automodel-image=")),
        next(a.split("=", 1)[1] for a in args if a.startswith("--unsloth-image=")),
    ]
    assert rendered == listed.stdout.split()


def test_scheduling_values_reach_the_pod() -> None:
    required = "requiredDuringSchedulingIgnoredDuringExecution"
    docs = render(
        "--set", "operator.nodeSelector.pool=system",
        "--set", "operator.tolerations[0].key=dedicated",
        "--set", "operator.tolerations[0].operator=Exists",
        "--set", f"operator.affinity.nodeAffinity.{required}.nodeSelectorTerms[0].matchExpressions[0].key=a",
        "--set", "operator.priorityClassName=system-cluster-critical",
    )  # fmt: skip
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "system"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    assert "nodeAffinity" in pod["affinity"]
    assert pod["priorityClassName"] == "system-cluster-critical"


# --- CRDs and NOTES --------------------------------------------------------------------


def test_chart_ships_exactly_the_generated_crds() -> None:
    source = {p.name: p.read_bytes() for p in sorted((ROOT / "crds").glob("*.yaml"))}
    shipped = {p.name: p.read_bytes() for p in sorted((CHART / "crds").iterdir())}
    assert source, "crds/ is empty: run `make crds`"
    assert shipped == source, "helm/kubetune/crds/ differs from crds/: run `make crds` (never edit either by hand)"
    rendered = {d["metadata"]["name"]: d for d in render() if d["kind"] == "CustomResourceDefinition"}
    expected = {}
    for text in source.values():
        crd = yaml.safe_load(text)
        expected[crd["metadata"]["name"]] = crd
    assert rendered == expected


def render_notes(*args: str) -> str:
    """NOTES.txt rendered by helm's own engine. `helm template` leaves NOTES out and `helm install
    --dry-run` needs a cluster, so a copy of the chart renders it through `tpl` as a YAML value."""
    with tempfile.TemporaryDirectory() as tmp:
        chart = Path(tmp) / "kubetune"
        shutil.copytree(CHART, chart)
        (chart / "notes-source.txt").write_text((chart / "templates" / "NOTES.txt").read_text())
        (chart / "templates" / "NOTES.txt").unlink()
        (chart / "templates" / "notes.yaml").write_text('notes: {{ tpl (.Files.Get "notes-source.txt") . | toJson }}\n')
        result = helm(
            "template", RELEASE, str(chart), "--namespace", NAMESPACE, "--show-only", "templates/notes.yaml", *args
        )
    assert result.returncode == 0, result.stderr
    notes: str = yaml.safe_load(result.stdout)["notes"]
    return notes


def test_notes_tell_what_to_apply_next() -> None:
    notes = render_notes()
    assert "kubectl get automodeljobs,unslothjobs" in notes
    assert "kubectl wait --for=condition=Succeeded automodeljob/" in notes
    # Every file and object the notes name exists, so the commands stay true.
    for path in re.findall(r"examples/[\w.-]+\.yaml", notes):
        assert (ROOT / path).is_file(), f"NOTES.txt names {path}, which does not exist"
    lora = yaml.safe_load((ROOT / "examples" / "automodel-lora.yaml").read_text())
    assert f"automodeljob/{lora['metadata']['name']}" in notes
    operator_version = versions_env()["TRAINING_OPERATOR_VERSION"]
    assert f"ref={operator_version}" in notes, "NOTES.txt training-operator ref != hack/cluster/versions.env"
    assert f"deployment/{only(render(), 'Deployment')['metadata']['name']}" in notes


def test_notes_name_the_watched_namespaces() -> None:
    assert "in every namespace" in render_notes()
    notes = render_notes("--set", "rbac.scope=namespace", "--set", "watchNamespaces={team-a,team-b}")
    assert "in: team-a, team-b." in notes


# --- on a real API server --------------------------------------------------------------

RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}


@pytest.mark.cluster
@pytest.mark.slow
def test_chart_installs_on_a_real_api_server(tmp_path: Path) -> None:
    """`helm install --wait` on the local control plane (hack/cluster: real kube-apiserver with
    Pod Security admission, kwok nodes): the CRDs are accepted, the operator pod is admitted in a
    namespace that enforces "restricted", and both RBAC scopes are served with the operator's rules.
    About 30 s: a control plane of its own starts and stops here."""
    # The control-plane binaries: hack/test.sh's unit stage builds them before pytest (a cold Go
    # build ran past this test's timeout); here it only finds them cached (seconds), or builds
    # them when the test runs on its own.
    build = subprocess.run(["bash", "hack/cluster/build.sh"], cwd=ROOT, capture_output=True, text=True)
    assert build.returncode == 0, f"`bash hack/cluster/build.sh` failed:\n{build.stdout[-3000:]}{build.stderr[-3000:]}"
    from localcluster import LocalCluster

    cluster = LocalCluster(tmp_path / "cluster")
    cluster.up()
    try:
        kube = ("--kubeconfig", str(cluster.kubeconfig))
        for namespace in (NAMESPACE, "team-a"):
            cluster.create_namespace(namespace, labels=RESTRICTED)
        install = helm(
            "upgrade", "--install", RELEASE, str(CHART), "--namespace", NAMESPACE, *kube,
            "--set", "rbac.scope=namespace", "--set", "watchNamespaces={team-a}", "--wait", "--timeout", "120s",
        )  # fmt: skip
        assert install.returncode == 0, install.stderr
        crds = cast(list[dict[str, Any]], cluster.get_json("crd")["items"])
        served = {c["metadata"]["name"] for c in crds}
        assert {yaml.safe_load(p.read_text())["metadata"]["name"] for p in (ROOT / "crds").glob("*.yaml")} <= served
        role = cluster.get_json("role", "kubetune", "-n", "team-a")
        assert role["rules"] == OPERATOR_RULES
        deployment = cast(dict[str, Any], cluster.get_json("deployment", "kubetune", "-n", NAMESPACE))
        assert deployment["status"]["availableReplicas"] == 1

        upgrade = helm(
            "upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE, *kube,
            "--reset-values", "--set", "rbac.scope=cluster", "--wait", "--timeout", "120s",
        )  # fmt: skip
        assert upgrade.returncode == 0, upgrade.stderr
        assert cluster.get_json("clusterrole", "kubetune")["rules"] == OPERATOR_RULES
        assert cluster.kubectl("get", "role", "kubetune", "-n", "team-a", check=False).returncode != 0

        # The admission side of the restricted checker: the API server refuses a weakened pod.
        weak = render("--set", "operator.securityContext.allowPrivilegeEscalation=true")
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "weak", "namespace": NAMESPACE},
            "spec": only(weak, "Deployment")["spec"]["template"]["spec"],
        }
        refused = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False)
        assert refused.returncode != 0 and "violates PodSecurity" in refused.stderr, refused.stderr
    finally:
        cluster.down()


def test_trainer_status_policy_is_shipped_by_default_and_can_be_left_out() -> None:
    docs = render()
    policy = only(docs, "ValidatingAdmissionPolicy")
    binding = only(docs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    from kubetune.controller.policies import trainer_status_policy_spec

    assert policy["spec"] == trainer_status_policy_spec()
    off = render("--set", "trainerStatusPolicy.enabled=false")
    assert not of_kind(off, "ValidatingAdmissionPolicy") and not of_kind(off, "ValidatingAdmissionPolicyBinding")


def test_image_policy_only_when_registries_are_listed() -> None:
    assert not [d for d in render() if d["metadata"]["name"].endswith("-trainer-image")]
    docs = render("--set", "imagePolicy.allowedRegistries={nvcr.io/acme/,registry.example.com/}")
    policy = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy" and d["metadata"]["name"].endswith("-image")]
    assert len(policy) == 1
    assert json.loads(policy[0]["spec"]["variables"][0]["expression"]) == ["nvcr.io/acme/", "registry.example.com/"]


def test_operator_pod_names_its_kopf_identity() -> None:
    container = only(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    extra = only(render("--set", "operator.extraEnv[0].name=A", "--set", "operator.extraEnv[0].value=b"), "Deployment")
    assert {"name": "A", "value": "b"} in extra["spec"]["template"]["spec"]["containers"][0]["env"]


def test_every_replica_elects_a_leader(scope_docs: tuple[str, list[dict[str, Any]]]) -> None:
    """Several replicas are safe: each runs with --leader-elect on a Lease in the release
    namespace, which a Role there (LEADER_ELECTION_RULES) lets it use."""
    from kubetune.controller.rbac import LEADER_ELECTION_RULES

    _, docs = scope_docs
    args = container_args(docs)
    assert "--leader-elect" in args and f"--leader-election-namespace={NAMESPACE}" in args
    assert "--lease-seconds=15" in args
    [role] = [r for r in of_kind(docs, "Role") if r["metadata"]["name"].endswith("-leader")]
    assert role["metadata"]["namespace"] == NAMESPACE and role["rules"] == LEADER_ELECTION_RULES
    assert yaml.safe_load((CHART / "files" / "operator-leader-rules.yaml").read_text()) == LEADER_ELECTION_RULES
    two = only(render("--set", "operator.replicas=2"), "Deployment")
    assert two["spec"]["replicas"] == 2


def _exposed_metric_names() -> set[str]:
    """Every series name the operator's /metrics can carry (histogram and counter suffixes
    included), from its registry with an empty reconciler's tables."""
    from kubetune.controller import metrics

    metrics.track(metrics.TableCollector(lambda: {}, lambda: []))
    names = set()
    for family in metrics.REGISTRY.collect():
        names |= {family.name, *(family.name + s for s in ("_total", "_bucket", "_sum", "_count", "_created"))}
    return names


def test_grafana_dashboard_ships_on_request_and_queries_only_real_metrics() -> None:
    assert not [d for d in render() if d["kind"] == "ConfigMap"], "the dashboard only when asked for"
    (config_map,) = [d for d in render("--set", "metrics.grafanaDashboard.enabled=true") if d["kind"] == "ConfigMap"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["kubetune-operator.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "kubetune-operator.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    exposed = _exposed_metric_names()
    for expr in exprs:
        # Metric names are the identifiers right before `{` (every query here selects $job).
        used = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))
        assert used, f"no metric in {expr!r}"
        assert used <= exposed, f"{expr!r} queries {sorted(used - exposed)}, which the operator does not expose"
