"""--start-limit on the real API server: the reconciler runs in this process (not as the
operator's subprocess) so that a spy on its real client can see which jobs have creates in
flight at once, and hold one create open while the test looks. Every request goes to the
real API server; nothing is answered by the spy."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pytest

from kubetune.controller import metrics
from kubetune.controller.builders import OperatorSettings
from kubetune.controller.kubeclient import KubeClient
from kubetune.controller.reconciler import Reconciler
from kubetune_api import constants as c
from support.kube import LORA, install_crds, job, prepare


def _items(cluster: Any, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
    where = ["-n", namespace] if namespace else []
    return list(json.loads(cluster.kubectl("get", kind, *where, "-o", "json").stdout)["items"])


class _CreateSpy:
    """Wraps the client's create: counts the jobs with a create in flight (their peak), and
    can hold every create of one job until released."""

    def __init__(self, client: KubeClient, hold_job: str | None = None) -> None:
        self._create = client.create
        self.in_flight: Counter[str] = Counter()
        self.peak = 0
        self.hold_job = hold_job
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        client.create = self  # type: ignore[method-assign]

    async def __call__(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        owner = obj["metadata"]["labels"][c.LABEL_JOB_NAME]
        self.in_flight[owner] += 1
        self.peak = max(self.peak, sum(1 for n in self.in_flight.values() if n))
        try:
            if owner == self.hold_job:
                self.holding.set()
                await self.release.wait()
            return await self._create(obj)
        finally:
            self.in_flight[owner] -= 1


async def _reconciler_seeing(cluster: Any, namespace: str, start_limit: int) -> Reconciler:
    """A reconciler fed what the operator's watches would list first: volumes, claims, entities."""
    reconciler = Reconciler(KubeClient.from_environment(), OperatorSettings(), lambda *_: None, start_limit=start_limit)
    for volume in _items(cluster, "pv"):
        await reconciler.on_volume(volume["metadata"]["name"], volume["spec"])
    for claim in _items(cluster, "pvc", namespace):
        status, spec = claim.get("status") or {}, claim["spec"]
        await reconciler.on_claim(namespace, claim["metadata"]["name"], status.get("phase"), spec.get("volumeName"))
    for kind in ("models", "filesets"):
        for entity in _items(cluster, kind, namespace):
            await reconciler.on_entity(entity, deleted=False)
    return reconciler


def _apply_jobs(cluster: Any, namespace: str, names: list[str]) -> list[dict[str, Any]]:
    install_crds(cluster)
    prepare(cluster, namespace)
    cluster.kubectl("wait", "--for=jsonpath={.status.phase}=Bound", "pvc", "--all", "-n", namespace, "--timeout=60s")
    text = "\n---\n".join(job("AutomodelJob", name, LORA) for name in names)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=text)
    return _items(cluster, "automodeljobs", namespace)


def _children(cluster: Any, namespace: str) -> set[str]:
    return {j["metadata"]["labels"][c.LABEL_JOB_NAME] for j in _items(cluster, "jobs.batch", namespace)}


def test_start_limit_one_starts_jobs_one_at_a_time_and_skips_a_job_deleted_while_it_waits(
    cluster: Any, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    names = [f"burst{i}" for i in range(8)]
    bodies = {b["metadata"]["name"]: b for b in _apply_jobs(cluster, namespace, names)}

    async def scenario() -> tuple[_CreateSpy, float | None]:
        reconciler = await _reconciler_seeing(cluster, namespace, start_limit=1)
        spy = _CreateSpy(reconciler.client, hold_job="burst0")
        try:
            first = asyncio.create_task(reconciler.on_job(bodies["burst0"]))
            await asyncio.wait_for(spy.holding.wait(), 30)  # burst0 holds the one slot
            rest = [asyncio.create_task(reconciler.on_job(bodies[n])) for n in names[1:]]
            for _ in range(100):  # until every other start waits for the slot
                await asyncio.sleep(0.01)
                if metrics.REGISTRY.get_sample_value("kubetune_job_starts_waiting") == len(names) - 1:
                    break
            waiting = metrics.REGISTRY.get_sample_value("kubetune_job_starts_waiting")
            reconciler.forget_job(("AutomodelJob", namespace, "burst7"))  # what a DELETED event does
            spy.release.set()
            await asyncio.wait_for(asyncio.gather(first, *rest), 120)
        finally:
            await reconciler.client.close()
        return spy, waiting

    spy, waiting = asyncio.run(scenario())
    assert waiting == len(names) - 1, "the other starts should wait for the one slot, counted in the gauge"
    assert spy.peak == 1, f"{spy.peak} jobs created objects at once under --start-limit 1"
    assert _children(cluster, namespace) == set(names[:-1]), "every job but the deleted one has its child"
    made = {cm["metadata"]["name"] for cm in _items(cluster, "configmaps", namespace)}
    assert not any(name.startswith("burst7") for name in made), f"the deleted job got objects: {sorted(made)}"
    assert metrics.REGISTRY.get_sample_value("kubetune_job_starts_waiting") == 0


def test_without_a_start_limit_a_burst_creates_for_many_jobs_at_once(
    cluster: Any, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control for the test above: the spy does see starts overlap when nothing bounds them."""
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    names = [f"free{i}" for i in range(8)]
    bodies = _apply_jobs(cluster, namespace, names)

    async def scenario() -> _CreateSpy:
        reconciler = await _reconciler_seeing(cluster, namespace, start_limit=0)
        spy = _CreateSpy(reconciler.client)
        try:
            await asyncio.wait_for(asyncio.gather(*(reconciler.on_job(b) for b in bodies)), 120)
        finally:
            await reconciler.client.close()
        return spy

    spy = asyncio.run(scenario())
    assert spy.peak > 1, "with no limit the starts of a burst should overlap"
    assert _children(cluster, namespace) == set(names)
