"""Fixtures of the end-to-end tier (`bash hack/test.sh e2e`): the user's path on the local
cluster's real node, with no fakes between `helm install` and a trained adapter.

`cluster` (session): a LocalCluster with the real node alone and untainted
(`make cluster-up NODES=real-only`): kubelet, containerd, kube-proxy, CoreDNS and the node's
registry; no kwok nodes, so every pod really runs. Started in a temporary directory and
stopped at the end, also on failure; KUBETUNE_TEST_CLUSTER_DIR reuses a running one.

`readme` (session): runs a block of the README marked `<!-- e2e:NAME -->`, exactly as
written, with the cluster's KUBECONFIG and the cached helm on PATH, so the README's
commands are the ones tested.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from localcluster import ClusterError, LocalCluster, read_versions

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
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
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
def shell_env(cluster: LocalCluster) -> dict[str, str]:
    helm_dir = cluster.cache / "bin" / f"helm-{read_versions()['HELM_VERSION']}"
    if not (helm_dir / "helm").is_file():
        raise ClusterError(f"{helm_dir / 'helm'} is missing; run `bash hack/cluster/build.sh helm`")
    env = dict(os.environ)
    env["KUBECONFIG"] = str(cluster.kubeconfig)
    # The README's `localcluster` commands find the cluster here (default: .cluster).
    env["KUBETUNE_CLUSTER_DIR"] = str(cluster.base_dir)
    env["PATH"] = f"{helm_dir}:{env['PATH']}"
    return env


@pytest.fixture(scope="session")
def readme(
    shell_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], subprocess.CompletedProcess[str]]:
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
