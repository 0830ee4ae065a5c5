"""Thin kopf handlers: each watch event goes to the reconciler.

Raw event handlers (`on.event`), not kopf's create/update handlers, on purpose:
the reconciler is idempotent and level-based, so it needs no per-handler
progress bookkeeping — which kopf would otherwise store with an extra PATCH of
every job, costing API requests and a status field the user never asked for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import kopf
from aiohttp import web

from kubetune.api.resources import FILESET, JOB_RESOURCES, MODEL
from kubetune.controller import metrics
from kubetune.controller.builders import OperatorSettings
from kubetune.controller.kubeclient import KubeClient, without_managed_fields
from kubetune.controller.leader import LeaderElection
from kubetune.controller.reconciler import Reconciler, job_key_of
from kubetune_api import constants as c

registry = kopf.OperatorRegistry()
_reconciler: Reconciler | None = None


def _rec() -> Reconciler:
    if _reconciler is None:
        raise RuntimeError("the operator is not started")
    return _reconciler


def _post_event(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    kopf.event(cast(Any, dict(body)), type=type_, reason=reason, message=message[:1024])


_MANAGED = {c.LABEL_MANAGED_BY: c.MANAGED_BY}


def _start_resync_once() -> None:
    """Started from the first job event's handler, so that the task inherits kopf's
    per-event context: its passes post Events through kopf.event, which needs it.
    (No job yet means nothing to resync.)"""
    period = float(_resync.get("period") or 0)
    if period > 0 and "task" not in _resync:
        _resync["task"] = asyncio.create_task(resync_forever(_rec(), _resync["namespaces"], period))


def _count(body: kopf.Body, type: str | None) -> None:
    resource = str(body.get("kind", ""))
    metrics.WATCH_EVENTS.labels(resource, type or "LISTED").inc()
    lag = metrics.event_lag(body, type, time.time())
    if lag is not None:
        metrics.WATCH_LAG_SECONDS.labels(resource).observe(lag)


async def on_job_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    _count(body, type)
    _start_resync_once()
    meta = body["metadata"]
    if type == "DELETED":
        _rec().forget_job((body["kind"], meta["namespace"], meta["name"]))
        return
    await _rec().on_job(without_managed_fields(body))


async def on_child_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    _count(body, type)
    if c.LABEL_ENTITY_KIND in (body.get("metadata", {}).get("labels") or {}):
        await _rec().on_initializer_job(without_managed_fields(body), deleted=type == "DELETED")
        return
    key = job_key_of(body)
    if key is not None:
        await _rec().on_child(key, without_managed_fields(body), deleted=type == "DELETED")


async def on_pod_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    _count(body, type)
    key = job_key_of(body)
    if key is not None:
        await _rec().on_pod(key, dict(body), deleted=type == "DELETED")  # read, never cached: no copy to slim


async def on_entity_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    _count(body, type)
    await _rec().on_entity(without_managed_fields(body), deleted=type == "DELETED")


async def on_claim_event(body: kopf.Body, type: str | None, namespace: str | None, name: str, **_: Any) -> None:
    _count(body, type)
    if namespace is None:
        return
    phase = None if type == "DELETED" else (body.get("status") or {}).get("phase", "Pending")
    await _rec().on_claim(namespace, name, phase, (body.get("spec") or {}).get("volumeName"))


async def on_volume_event(body: kopf.Body, type: str | None, name: str, **_: Any) -> None:
    _count(body, type)
    await _rec().on_volume(name, None if type == "DELETED" else dict(body.get("spec") or {}))


# Explicit ids, so that a rename of a function never changes what kopf calls it.
for _res in JOB_RESOURCES:
    kopf.on.event(c.GROUP, c.VERSION, _res.plural, registry=registry, id=f"{_res.plural}-event")(on_job_event)
for _group, _version, _plural in (("batch", "v1", "jobs"), ("kubeflow.org", "v1", "pytorchjobs")):
    kopf.on.event(_group, _version, _plural, labels=_MANAGED, registry=registry, id=f"{_plural}-child-event")(
        on_child_event
    )
kopf.on.event("", "v1", "pods", labels=_MANAGED, registry=registry, id="pods-event")(on_pod_event)
for _res in (MODEL, FILESET):
    kopf.on.event(c.GROUP, c.VERSION, _res.plural, registry=registry, id=f"{_res.plural}-event")(on_entity_event)
kopf.on.event("", "v1", "persistentvolumeclaims", registry=registry, id="claims-event")(on_claim_event)
kopf.on.event("", "v1", "persistentvolumes", registry=registry, id="volumes-event")(on_volume_event)


@kopf.on.login(registry=registry, id="login")
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # A registry of our own does not get kopf's default login handlers: use the same two.
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf's diff base for handlers that never read a diff.

    kopf builds an "essence" of every object on every watch event (a deep copy of the whole
    body) and diffs it against the last one, for its change handlers' old/new/diff. Every
    handler here is a raw event handler, which never sees them: the copy was 13-18 % of the
    operator's CPU in the 1,000-job profile (bench/README.md). So the essence is empty, and
    nothing is stored on the objects.
    """

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


# What run_operator asks of kopf's per-object workers (configure reads it at start-up).
_queueing: dict[str, int] = {}

# What run_operator asks of the resync loop, and the loop's task once kopf has started it.
_resync: dict[str, Any] = {}


@kopf.on.startup(registry=registry, id="settings")
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our own events carry the news; kopf's per-handler INFO events would double the API traffic.
    settings.posting.level = logging.WARNING
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    settings.persistence.diffbase_storage = NoDiffBase()
    if limit := _queueing.get("worker_limit", 0):
        # kopf runs one worker per object with pending events; a burst of 1,000 jobs is 1,000
        # passes in flight, each holding its objects and requests. A worker keeps its slot
        # while it idles for more events of its object (5 s by default): at 64 slots that
        # capped a burst at 12 jobs/s, hence the short idle time.
        settings.queueing.worker_limit = limit
        settings.queueing.idle_timeout = 0.5
    settings.networking.error_backoffs = [1, 2, 5, 10]
    # Server-side filters: without them the pod watch carried every pod of the cluster
    # (decoded, then dropped by the handler's client-side label filter). Claims carry no
    # label of ours (users make them), so their watch stays unfiltered.
    managed = f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY}"
    for selector in ("pods", "batch/jobs", "kubeflow.org/pytorchjobs"):
        settings.watching.label_selectors[selector] = managed


async def resync_forever(reconciler: Reconciler, namespaces: Sequence[str], period: float) -> None:
    log = logging.getLogger("kubetune.operator")
    while True:
        await asyncio.sleep(period)
        started = time.monotonic()
        try:
            count = await reconciler.resync(namespaces)
        except Exception as err:  # the next period tries again; the watches go on meanwhile
            log.warning("resync failed: %s", err)
            continue
        took = time.monotonic() - started
        metrics.RESYNC_SECONDS.observe(took)
        metrics.RESYNC_JOBS.set(count)
        log.info("resync: %d jobs in %.0f ms", count, took * 1000)


async def _serve_health(port: int) -> web.AppRunner:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"leader": False, "waiting": "for the leader lease"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


@dataclass(frozen=True)
class Leadership:
    """--leader-elect: where the Lease lives and how long a silent leader keeps it."""

    namespace: str
    lease_seconds: float = 15.0


async def run_operator(
    settings: OperatorSettings,
    namespaces: Sequence[str],
    health_port: int,
    stop_flag: asyncio.Event | None = None,
    resync_seconds: float = 300.0,
    worker_limit: int = 0,
    start_limit: int = 0,
    leadership: Leadership | None = None,
    metrics_port: int = 0,
) -> None:
    global _reconciler
    client = KubeClient.from_environment()
    _reconciler = Reconciler(client, settings, _post_event, start_limit=start_limit)
    metrics.track(metrics.TableCollector(_reconciler.tables, _reconciler.job_phases))
    metrics.LEADER.set(0 if leadership is not None else 1)
    # Served from the start, by a waiting replica too (it reports kubetune_leader 0).
    serving = await metrics.serve(metrics_port) if metrics_port else None
    _resync.update(namespaces=list(namespaces), period=resync_seconds)
    _queueing["worker_limit"] = worker_limit
    stop = stop_flag or asyncio.Event()
    new_kinds: list[str] = []

    def restart_for(kinds: list[str]) -> None:
        if new_kinds:
            return  # already stopping (kopf takes a moment; resync passes may come meanwhile)
        logging.getLogger("kubetune.operator").warning(
            "%s installed after the operator started: restarting to watch it", ", ".join(kinds)
        )
        new_kinds.extend(kinds)
        stop.set()

    _reconciler.on_new_child_kind = restart_for
    election: LeaderElection | None = None
    holding: asyncio.Task[None] | None = None
    try:
        if leadership is not None:
            identity = os.environ.get("POD_ID") or f"{socket.gethostname()}-{os.getpid()}"
            election = LeaderElection(
                client,
                leadership.namespace,
                identity,
                lease_seconds=leadership.lease_seconds,
                renew_deadline_seconds=leadership.lease_seconds * 2 / 3,
                retry_seconds=max(0.5, leadership.lease_seconds / 7),
            )
            # A candidate watches nothing until it leads, but answers its liveness probe meanwhile
            # (kopf serves /healthz only once it runs), or the kubelet would restart it in a loop.
            waiting = await _serve_health(health_port) if health_port else None
            try:
                await election.acquire()
            finally:
                if waiting is not None:
                    await waiting.cleanup()
            holding = asyncio.create_task(election.hold(stop))
            metrics.LEADER.set(1)
        await _reconciler.prime_children(namespaces)
        await kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=not namespaces,
            namespaces=list(namespaces),
            liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz" if health_port else None,
            stop_flag=stop,
        )
    finally:
        task = _resync.pop("task", None)
        if isinstance(task, asyncio.Task):
            task.cancel()
        if holding is not None:
            holding.cancel()
        metrics.LEADER.set(0)
        if serving is not None:
            await serving.cleanup()
        await client.close()
    if election is not None and election.lost:
        # Another replica may lead now: stop at once, and let the restart be a candidate again.
        raise SystemExit("kubetune operator: lost the leader lease; exiting so that a restart waits its turn")
    if new_kinds:
        # The same process, started afresh (a pod keeps its name, its restart count stays 0).
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
