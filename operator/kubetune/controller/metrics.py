"""The operator's Prometheus metrics, served at GET /metrics on --metrics-port.

prometheus_client (the Prometheus project's own library) rather than hand-written
exposition text: it gets the text format, histogram buckets and the process
collector (resident memory, CPU, open files) right, and Prometheus and its
ServiceMonitor scrape it unchanged.

A registry of our own, not the library's global one: what the operator exposes is
exactly what is listed here, and a second import (tests, `kubetune run`) registers
nothing twice. The scrape is answered on the operator's event loop, so the
collectors that read the reconciler's tables never race with it.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Mapping, Sized
from datetime import datetime
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes: "memory stays flat" is read here
PlatformCollector(registry=REGISTRY)

RECONCILE_SECONDS = Histogram(
    "kubetune_reconcile_duration_seconds",
    "Time of one reconcile pass of a job, API requests included.",
    ["kind"],
    registry=REGISTRY,
)
RECONCILE_PASSES = Counter(
    "kubetune_reconcile_passes_total",
    "Reconcile passes of jobs by outcome: ok; retry (a transient error, the pass is retried "
    "with backoff); error (anything else, logged).",
    ["kind", "outcome"],
    registry=REGISTRY,
)
POD_FAILURES = Counter(
    "kubetune_pod_failures_total",
    "Trainer pods that stopped before their job was done, by job kind and failure class "
    "(Preempted, OutOfMemory, TrainerError, NodeFailure; docs/FAILURES.md).",
    ["kind", "failure_class"],
    registry=REGISTRY,
)
WATCH_EVENTS = Counter(
    "kubetune_watch_events_total",
    "Watch events handled, by resource and event type.",
    ["resource", "type"],
    registry=REGISTRY,
)
WATCH_LAG_SECONDS = Histogram(
    "kubetune_watch_event_lag_seconds",
    "From the change on the API server (the newest managedFields time; creationTimestamp for ADDED) to "
    "the operator handling its watch event, by resource. The server's timestamps have one-second "
    "resolution, so a value is up to 1 s high; what it shows is the operator falling behind its watches.",
    ["resource"],
    buckets=(1, 2, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
API_SECONDS = Histogram(
    "kubetune_api_request_duration_seconds",
    "Latency of the operator's own API requests (not kopf's watches), by verb and status code.",
    ["verb", "code"],
    registry=REGISTRY,
)
STARTS_WAITING = Gauge(
    "kubetune_job_starts_waiting",
    "Job starts waiting for one of --start-limit slots (a burst of new jobs queues here, not in "
    "the client's connection pool, where requests time out).",
    registry=REGISTRY,
)
RESYNC_SECONDS = Histogram(
    "kubetune_resync_duration_seconds",
    "Time of one periodic resync over every job (children listed afresh).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
RESYNC_JOBS = Gauge("kubetune_resync_jobs", "Jobs passed by the last resync.", registry=REGISTRY)
LEADER = Gauge(
    "kubetune_leader",
    "1 while this replica leads (or runs without --leader-elect), 0 while it waits for the Lease.",
    registry=REGISTRY,
)


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()  # "2026-12-02T06:00:00Z": 3.11 reads the Z
    except ValueError:
        return None


def event_lag(body: Mapping[str, Any], type: str | None, now: float) -> float | None:
    """Seconds from the change an ADDED or MODIFIED watch event tells of to `now`; None for
    the initial listing (old objects, no lag to speak of), deletions, and objects that carry
    no time (a DELETED event's object has no newer write)."""
    meta = body.get("metadata") or {}
    if type == "ADDED":
        changed = _timestamp(meta.get("creationTimestamp"))
    elif type == "MODIFIED":
        times = [_timestamp(entry.get("time")) for entry in meta.get("managedFields") or ()]
        changed = max((t for t in times if t is not None), default=None)
    else:
        return None
    return None if changed is None else max(0.0, now - changed)


class TableCollector(Collector):
    """Sizes of the operator's in-memory tables, read at scrape time.

    `tables` gives each table by name; `phases` gives each tracked job's (kind, phase).
    kubetune_tracked_entries going back to 0 after the jobs are deleted is how a test
    (and an operator of kubetune) sees that no per-job state outlives its job."""

    def __init__(
        self,
        tables: Callable[[], Mapping[str, Sized]],
        phases: Callable[[], Iterable[tuple[str, str]]],
    ) -> None:
        self._tables = tables
        self._phases = phases

    def collect(self) -> Iterable[Any]:
        entries = GaugeMetricFamily(
            "kubetune_tracked_entries", "Entries in each of the operator's in-memory tables.", labels=["table"]
        )
        for name, table in sorted(self._tables().items()):
            entries.add_metric([name], len(table))
        yield entries
        jobs = GaugeMetricFamily(
            "kubetune_jobs", "Jobs the operator tracks, by kind and phase.", labels=["kind", "phase"]
        )
        for (kind, phase), count in sorted(Tally(self._phases()).items()):
            jobs.add_metric([kind, phase], count)
        yield jobs


_tables: list[TableCollector] = []


def track(collector: TableCollector) -> None:
    """Expose one reconciler's tables (a new operator run in the same process replaces the old)."""
    for old in _tables:
        REGISTRY.unregister(old)
    _tables[:] = [collector]
    REGISTRY.register(collector)


async def serve(port: int, host: str = "0.0.0.0") -> web.AppRunner:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
