"""Fixtures for tests against the local control plane (hack/cluster/localcluster).

`cluster` (session): a running LocalCluster. By default a fresh one is started in a
temporary directory and stopped when the session ends, also on failure. Set
KUBETUNE_TEST_CLUSTER_DIR to the directory of a cluster that is already running
(e.g. `.cluster` after `make cluster-up`) to reuse it; it is then left running. If
nothing runs there, a cluster is started in that directory and stopped at the end.
Either way the fixture fails, naming the component's log, when a component dies.

When any collected test is marked `real_node` (tests/cluster/test_real_node.py), or
KUBETUNE_REAL_NODE=1, the fresh cluster also starts the real node (a kubelet with
containerd; needs root and hack/cluster/node-deps.sh). A reused cluster without one
makes those tests fail, not skip.

`namespace` (function): a fresh namespace, ready for pods, deleted afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from localcluster import ClusterError, LocalCluster

REPO = Path(__file__).resolve().parents[2]

_session_cluster: list[LocalCluster] = []
_wants_real_node: list[bool] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)
        if item.get_closest_marker("real_node") is not None:
            _wants_real_node.append(True)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    reuse_dir = os.environ.get("KUBETUNE_TEST_CLUSTER_DIR")
    if reuse_dir:
        existing = LocalCluster(Path(reuse_dir))
        if existing.is_running():
            _session_cluster.append(existing)
            yield existing
            existing.check_alive()
            return
    base = Path(reuse_dir) if reuse_dir else tmp_path_factory.mktemp("cluster")
    # None defers to KUBETUNE_REAL_NODE; a real_node test in the session turns it on.
    instance = LocalCluster(base, real_node=True if _wants_real_node else None)
    _session_cluster.append(instance)
    try:
        instance.up()
        yield instance
        instance.check_alive()
    finally:
        # Logs stay in base for reading; every process is gone.
        instance.down(remove_state=False)
        _session_cluster.clear()


@pytest.fixture(autouse=True)
def _cluster_still_alive(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each cluster test, fail naming the log of any component that died."""
    yield
    if "cluster" in request.fixturenames and _session_cluster:
        _session_cluster[0].check_alive()


@pytest.fixture
def namespace(cluster: LocalCluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    cluster.create_namespace(name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and _session_cluster:
        cluster = _session_cluster[0]
        try:
            status = cluster.status()
        except (ClusterError, OSError) as err:
            status = f"(status unavailable: {err})"
        report.sections.append(("local cluster", f"{status}\nlogs: {cluster.logs_dir}"))
    return report
