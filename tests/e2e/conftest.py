"""Fixtures of the end-to-end tier (`bash hack/test.sh e2e`): the user's path with no fakes
between `helm install` and a trained adapter, on the cluster e2ecluster.py describes.

`local_cluster` (session): a LocalCluster with the real node alone and untainted
(`make cluster-up NODES=real-only`): kubelet, containerd, kube-proxy, CoreDNS and the node's
registry; no kwok nodes, so every pod really runs. Started in a temporary directory and
stopped at the end, also on failure; KUBETUNE_TEST_CLUSTER_DIR reuses a running one. None
with KUBETUNE_E2E_CLUSTER=current (e2e/run.sh on kind).

`readme` (session): runs a block of the README marked `<!-- e2e:NAME -->`, exactly as
written, with the cluster's KUBECONFIG and the cached helm on PATH, so the README's
commands are the ones tested.

`installed` and `claims` (session): the chart installed; the team namespace seeded, and the
pod through which the tests read and write its claims.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2ecluster import (
    CLAIMS,
    CLUSTER_ENV,
    CURRENT,
    DEFAULT_STORAGE,
    LOCAL,
    LOCAL_REGISTRY,
    NAMESPACE,
    STORAGE_ENV,
    SYSTEM_NAMESPACE,
    ClaimFiles,
    E2ECluster,
    ReadmeRunner,
    helm_binary,
    image_references,
)
from localcluster import LocalCluster, read_versions

REPO = Path(__file__).resolve().parents[2]

README = REPO / "README.md"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


def readme_block(name: str, text: str | None = None) -> str:
    """The ```sh block right after `<!-- e2e:NAME -->` in the README."""
    text = README.read_text() if text is None else text
    match = re.search(rf"<!-- e2e:{re.escape(name)} -->\s*```sh\n(.*?)```", text, re.S)
    if match is None:
        raise AssertionError(f"README.md has no ```sh block after <!-- e2e:{name} -->")
    return match.group(1)


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster | None]:
    """The local cluster's real node alone, or None where the tier runs on KUBECONFIG's cluster."""
    kind = os.environ.get(CLUSTER_ENV, LOCAL)
    if kind == CURRENT:
        yield None
        return
    if kind != LOCAL:
        pytest.fail(f"{CLUSTER_ENV}={kind!r}: use {LOCAL} (the local cluster's real node) or {CURRENT} (KUBECONFIG's)")
    if os.geteuid() != 0:
        pytest.fail("the end-to-end tier runs pods on the real node, which needs root (containerd, mounts, bridge)")
    reuse_dir = os.environ.get("KUBETUNE_TEST_CLUSTER_DIR")
    if reuse_dir:
        existing = LocalCluster(Path(reuse_dir))
        if existing.is_running():
            if not existing.real_node or existing.kwok_nodes:
                pytest.fail(f"the cluster in {reuse_dir} is not NODES=real-only; the e2e tier needs it")
            yield existing
            existing.check_alive()
            return
    base = Path(reuse_dir) if reuse_dir else tmp_path_factory.mktemp("cluster")
    instance = LocalCluster(base, real_node=True, kwok_nodes=False)
    try:
        instance.up()
        yield instance
        instance.check_alive()
    finally:
        instance.down(remove_state=False)


@pytest.fixture(scope="session")
def cluster(local_cluster: LocalCluster | None) -> E2ECluster:
    if local_cluster is not None:
        return E2ECluster(LOCAL, local_cluster.kubeconfig, image_references(LOCAL_REGISTRY), local_cluster)
    configured = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    if os.pathsep in configured or not Path(configured).is_file():
        pytest.fail(f"{CLUSTER_ENV}={CURRENT} needs KUBECONFIG naming one kubeconfig file (got {configured!r})")
    found = E2ECluster(CURRENT, Path(configured), image_references(None))
    found.kubectl("version")  # reachable, or a clear error now rather than in every test
    return found


@pytest.fixture(scope="session")
def shell_env(cluster: E2ECluster) -> dict[str, str]:
    cache = cluster.local.cache if cluster.local is not None else None
    helm = helm_binary(cache, read_versions()["HELM_VERSION"])
    env = dict(os.environ)
    env["KUBECONFIG"] = str(cluster.kubeconfig)
    if cluster.local is not None:
        # The README's `localcluster` commands find the cluster here (default: .cluster).
        env["KUBETUNE_CLUSTER_DIR"] = str(cluster.local.base_dir)
    env["PATH"] = f"{helm.parent}:{env['PATH']}"
    return env


@pytest.fixture(scope="session")
def readme(shell_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> ReadmeRunner:
    logs = tmp_path_factory.mktemp("readme-blocks")

    def run(name: str) -> subprocess.CompletedProcess[str]:
        block = readme_block(name)
        started = time.monotonic()
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=REPO,
            env=shell_env,
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
        (logs / f"{name}.log").write_text(f"$ {block}\n{result.stdout}\n--- stderr\n{result.stderr}")
        print(f"README block e2e:{name}: exit {result.returncode} in {time.monotonic() - started:.0f}s")
        if result.returncode != 0:
            raise AssertionError(
                f"README block e2e:{name} failed (exit {result.returncode}); log {logs / (name + '.log')}\n"
                f"{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
            )
        return result

    return run


@pytest.fixture(scope="session")
def installed(cluster: E2ECluster, readme: ReadmeRunner, shell_env: dict[str, str]) -> None:
    """The images where the nodes find them, the chart installed, the operator Ready: the
    README's e2e:install block on the local cluster; helm alone on the current one (e2e/run.sh
    loaded the images)."""
    if cluster.local is not None:
        readme("install")
        return
    cluster.ensure_namespace(SYSTEM_NAMESPACE)
    values = []
    for key, component in (
        ("operator.image", "kubetune-operator"),
        ("trainer.automodel.image", "trainer-automodel"),
        ("trainer.unsloth.image", "trainer-unsloth"),
    ):
        repository, tag = cluster.images[component].rsplit(":", 1)
        values += ["--set", f"{key}.repository={repository}", "--set", f"{key}.tag={tag}"]
    helm = subprocess.run(
        ["helm", "upgrade", "--install", "kubetune", "helm/kubetune", "--namespace", SYSTEM_NAMESPACE, *values,
         "--set", "operator.image.pullPolicy=IfNotPresent", "--set", "trainer.imagePullPolicy=IfNotPresent",
         "--wait", "--timeout", "5m"],
        cwd=REPO, env=shell_env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if helm.returncode != 0:
        raise AssertionError(f"helm install failed ({helm.returncode}):\n{helm.stdout[-2000:]}\n{helm.stderr[-3000:]}")


@pytest.fixture(scope="session")
def claims(cluster: E2ECluster, installed: None, readme: ReadmeRunner) -> Iterator[ClaimFiles]:
    """The team namespace with SmolLM2 and chat rows on its claims and the examples' entities
    applied: the README's e2e:seed block on the local cluster; on the current one, the same
    files put on the claims through the claims pod. Yields that pod."""
    files = ClaimFiles(cluster, NAMESPACE, CLAIMS)
    if cluster.local is not None:
        readme("seed")
        files.start()
    else:
        cluster.ensure_namespace(NAMESPACE)
        storage = Path(os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE)
        cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(storage))
        files.start()  # also binds the claims where the storage class waits for a first consumer
        model = subprocess.run(
            [sys.executable, "hack/smollm2.py"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        files.upload_dir(Path(model), "models", "smollm2-135m-instruct")
        for split in ("train", "validation"):
            files.upload_dir(REPO / "examples" / "demo" / "data" / split, "datasets", f"chat/{split}")
        cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(REPO / "examples" / "entities.yaml"))
    try:
        yield files
    finally:
        files.stop()
