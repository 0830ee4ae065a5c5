"""Operator benchmarks on the local control plane, each with its baseline in the same run.

1. reconcile latency: N AutomodelJobs (1 GPU) created at once; job ADDED → child Job
   ADDED, from one watch. Baselines: N batch/v1 Jobs → their pod (kube-controller-manager's
   Job controller), N PyTorchJobs → their pod (training-operator).
2. throughput: M AutomodelJobs at once → all children, and → every job's status naming
   its child (the operator's start done); jobs/s, the operator's peak RSS and CPU seconds
   per job (counted to the second).
3. status latency: child Job Complete → our job Succeeded (same watch).
4. API cost: requests per job over its whole life, from the API server's
   apiserver_request_total deltas for the resources only the operator writes.
5. resync cost: the operator restarted with every job of 1-4 still there (1,200 at the
   default sizes); the time of one periodic resync over all of them, from its /metrics.
6. memory under churn: W waves of K jobs created, finished and deleted; the operator's
   RSS after each wave, and its per-job tables (kubetune_tracked_entries) back to empty.

Times come from one watcher's clock (time.perf_counter on receipt), so both ends of
a latency see the same delays. Usage: python bench/operator_bench.py --out FILE.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import ssl
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from localcluster import LocalCluster, free_port

ROOT = Path(__file__).resolve().parents[1]
# tests/ for the operator-process helpers the cluster tier uses too (support.kube); the
# localcluster package and the operator come from PYTHONPATH (hack/run-in-venv.sh).
sys.path[:0] = [str(ROOT / "tests")]

from kubetune.controller.reconciler import PER_JOB_TABLES  # noqa: E402
from support.kube import Metrics, OperatorProcess, grant_operator, install_crds  # noqa: E402
from support.kube import scrape as scrape_now  # noqa: E402

EXAMPLES = ROOT / "examples"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class Seen:
    """First time the watcher saw each object, and each condition, by (kind, name)."""

    added: dict[tuple[str, str], float] = field(default_factory=dict)
    done: dict[tuple[str, str], float] = field(default_factory=dict)
    # A job's status names its child: the operator's whole start (creates, status write) is done.
    named: dict[tuple[str, str], float] = field(default_factory=dict)
    owner_of: dict[tuple[str, str], str] = field(default_factory=dict)


WATCHED = {  # kind -> (API prefix, plural)
    "AutomodelJob": ("/apis/kubetune.io/v1alpha1", "automodeljobs"),
    "Job": ("/apis/batch/v1", "jobs"),
    "PyTorchJob": ("/apis/kubeflow.org/v1", "pytorchjobs"),
    "Pod": ("/api/v1", "pods"),
}


class Watcher:
    """Watches one namespace, or every namespace (namespace None: names must then be
    unique across namespaces, as the scale run's are)."""

    def __init__(
        self, server: str, ssl_ctx: ssl.SSLContext, namespace: str | None, kinds: tuple[str, ...] = tuple(WATCHED)
    ) -> None:
        self.server, self.ssl_ctx, self.namespace, self.kinds = server, ssl_ctx, namespace, kinds
        self.seen = Seen()
        self.tasks: list[asyncio.Task[None]] = []
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl_ctx, limit=64))
        scope = f"/namespaces/{self.namespace}" if self.namespace else ""
        for kind in self.kinds:
            prefix, plural = WATCHED[kind]
            self.tasks.append(asyncio.create_task(self._watch(kind, f"{prefix}{scope}/{plural}")))
        await asyncio.sleep(1.0)

    async def _watch(self, kind: str, path: str) -> None:
        assert self.session is not None
        while True:
            try:
                async with self.session.get(
                    self.server + path,
                    params={"watch": "1", "timeoutSeconds": "3600"},
                    timeout=aiohttp.ClientTimeout(total=None),
                ) as resp:
                    if resp.status != 200:  # e.g. 429 while a new CRD's storage initialises
                        await asyncio.sleep(0.5)
                        continue
                    while line := await resp.content.readuntil(b"\n"):
                        now = time.perf_counter()
                        event = json.loads(line)
                        if "object" in event:
                            self._record(kind, event["type"], event["object"], now)
            except (TimeoutError, aiohttp.ClientError, asyncio.IncompleteReadError, ValueError) as err:
                print(f"watch {kind}: {err!r}; reconnecting", file=sys.stderr)
                await asyncio.sleep(0.2)

    def _record(self, kind: str, type_: str, obj: dict[str, Any], now: float) -> None:
        meta = obj["metadata"]
        key = (kind, meta["name"])
        if type_ == "ADDED" and key not in self.seen.added:
            self.seen.added[key] = now
            labels = meta.get("labels") or {}
            owner = (
                labels.get("kubetune.io/job-name")
                or labels.get("job-name")
                or labels.get("training.kubeflow.org/job-name")
            )
            if kind == "Pod" and owner:
                self.seen.owner_of[key] = owner
        status = obj.get("status") or {}
        # A Job's outcome is known at SuccessCriteriaMet (Complete follows once pods finish):
        # the operator acts on the first, so status latency starts there.
        finished = status.get("phase") == "Succeeded" or any(
            c.get("type") in ("Complete", "SuccessCriteriaMet", "Succeeded") and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        if finished and key not in self.seen.done:
            self.seen.done[key] = now
        if status.get("child") and key not in self.seen.named:
            self.seen.named[key] = now

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.session:
            await self.session.close()


async def create_all(session: aiohttp.ClientSession, server: str, path: str, bodies: list[dict[str, Any]]) -> None:
    sem = asyncio.Semaphore(32)

    async def one(body: dict[str, Any]) -> None:
        async with sem, session.post(server + path, json=body) as resp:
            if resp.status >= 300:
                raise RuntimeError(f"create {body['metadata']['name']}: {resp.status} {await resp.text()}")

    await asyncio.gather(*(one(b) for b in bodies))


async def delete_all(session: aiohttp.ClientSession, server: str, path: str) -> int:
    """Delete every object of a namespaced collection, one DELETE each, 32 at a time.

    Not one deletecollection: the API server does a collection's deletes in that one
    request, which on 2 cores ran past its 60 s timeout for 1,000 jobs under load (the
    churn rows of 2026-12-02 failed so). Not kubectl delete either: one object at a time.
    """
    names: list[str] = []
    token = ""
    while True:
        query = "?limit=500" + (f"&continue={token}" if token else "")
        async with session.get(server + path + query) as resp:
            assert resp.status == 200, await resp.text()
            page = await resp.json()
        names += [item["metadata"]["name"] for item in page["items"]]
        token = page["metadata"].get("continue", "")
        if not token:
            break
    sem = asyncio.Semaphore(32)

    async def one(name: str) -> None:
        async with sem, session.delete(f"{server}{path}/{name}") as resp:
            if resp.status not in (200, 202, 404):
                raise RuntimeError(f"delete {name}: {resp.status} {await resp.text()}")

    await asyncio.gather(*(one(n) for n in names))
    return len(names)


def gpu_pod_template(name: str, container: str = "trainer", restart: str = "Never") -> dict[str, Any]:
    return {
        "metadata": {"labels": {"bench": name}},
        "spec": {
            "restartPolicy": restart,
            "containers": [
                {
                    "name": container,
                    "image": "bench/none:1",
                    "resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}},
                }
            ],
        },
    }


def amj(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AutomodelJob",
        "metadata": {"name": name},
        "spec": {"model": "smollm2-135m", "dataset": {"training": "chat-train"}},
    }


def batch_job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": 2, "template": gpu_pod_template(name)},
    }


def pytorchjob(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {
            "pytorchReplicaSpecs": {
                "Master": {"replicas": 1, "restartPolicy": "Never", "template": gpu_pod_template(name, "pytorch")}
            }
        },
    }


OPERATOR: list[OperatorProcess] = []


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for proc in OPERATOR:
            proc.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.2)


def latencies(seen: Seen, parent_kind: str, names: list[str], child_of: Any) -> list[float]:
    out = []
    for name in names:
        start = seen.added.get((parent_kind, name))
        child = child_of(name)
        if start is not None and child is not None:
            out.append(child - start)
    return out


def first_pod(seen: Seen, owner: str) -> float | None:
    times = [t for (kind, pod), t in seen.added.items() if kind == "Pod" and seen.owner_of.get((kind, pod)) == owner]
    return min(times) if times else None


class ProcSampler:
    """Peak RSS and CPU seconds of one process, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_rss = pid, 0
        self.task: asyncio.Task[None] | None = None

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    async def _loop(self) -> None:
        while True:
            self.peak_rss = max(self.peak_rss, self.rss())
            await asyncio.sleep(0.1)

    def start(self) -> None:
        self.peak_rss = self.rss()
        self.task = asyncio.create_task(self._loop())

    def stop(self) -> None:
        if self.task:
            self.task.cancel()


METRIC = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$")
OPERATOR_ONLY = {  # (resource, subresource, verb): in the bench namespace only the operator does these
    ("configmaps", "", "POST"),
    ("serviceaccounts", "", "POST"),
    ("roles", "", "POST"),
    ("rolebindings", "", "POST"),
    ("jobs", "", "POST"),
    ("models", "", "POST"),
    ("automodeljobs", "status", "PATCH"),
    ("automodeljobs", "", "PATCH"),
    ("models", "status", "PATCH"),
}


async def request_counts(session: aiohttp.ClientSession, server: str) -> Counter[tuple[str, str, str]]:
    async with session.get(server + "/metrics") as resp:
        text = await resp.text()
    counts: Counter[tuple[str, str, str]] = Counter()
    for line in text.splitlines():
        m = METRIC.match(line)
        if not m:
            continue
        labels = dict(kv.split("=", 1) for kv in re.findall(r'\w+="[^"]*"', m["labels"]))
        labels = {k: v.strip('"') for k, v in labels.items()}
        counts[(labels.get("resource", ""), labels.get("subresource", ""), labels.get("verb", ""))] += int(
            float(m["value"])
        )
    return counts


def summary(name: str, values: list[float], unit: str = "s") -> list[dict[str, Any]]:
    return [
        {"name": f"{name} p50", "value": round(statistics.median(values), 4), "unit": unit, "n": len(values)},
        {"name": f"{name} p95", "value": round(percentile(values, 0.95), 4), "unit": unit, "n": len(values)},
        {"name": f"{name} p99", "value": round(percentile(values, 0.99), 4), "unit": unit, "n": len(values)},
    ]


def with_baseline(rows: list[dict[str, Any]], base: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    out = []
    for row, b in zip(rows, base, strict=True):
        out.append(
            {
                **row,
                "baseline": label,
                "baseline_value": b["value"],
                "ratio": round(row["value"] / b["value"], 3) if b["value"] else None,
            }
        )
    return out


RESYNC_S = 15
ROWS: list[dict[str, Any]] = []


async def scrape(port: int) -> Metrics:
    return await asyncio.to_thread(scrape_now, port)  # urllib: off the loop the watchers use


async def scrape_when_up(port: int, timeout: float = 120) -> Metrics:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await scrape(port)
        except OSError:  # URLError included: the operator is still starting
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def tracked(metrics: Metrics, table: str) -> float:
    return metrics.get(("kubetune_tracked_entries", (("table", table),)), 0.0)


_last_check = [0.0]


def namespace_has_workloads(cluster: LocalCluster, namespace: str) -> bool:
    """Jobs or pods left in the namespace (asked at most every 5 s: kubectl is slow)."""
    if time.monotonic() - _last_check[0] < 5:
        return True
    _last_check[0] = time.monotonic()
    return bool(cluster.kubectl("get", "jobs,pods", "-n", namespace, "-o", "name").stdout.strip())


async def resync_cost(port: int) -> list[dict[str, Any]]:
    """The time of a resync after the first one since the restart (the first meets the
    start-up's own passes), over every job the operator tracks."""
    count = ("kubetune_resync_duration_seconds_count", ())
    total = ("kubetune_resync_duration_seconds_sum", ())
    await scrape_when_up(port)
    # Started with 1,200 jobs, the operator first works through a flood of start-up events
    # (every job, child and pod listed), and a resync queues behind them job by job: the
    # steady-state figure is a later one.
    deadline = time.monotonic() + 40 * RESYNC_S

    async def after(resyncs: float) -> Metrics:
        while (metrics := await scrape(port)).get(count, 0) < resyncs:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {resyncs:.0f} resyncs in forty periods")
            await asyncio.sleep(1)
        return metrics

    first = await after(1)
    now = await after(first[count] + 1)
    jobs = int(now[("kubetune_resync_jobs", ())])
    samples = now[count] - first[count]
    mean = (now[total] - first[total]) / samples
    return [
        {
            "name": f"resync over every job ({jobs} jobs, children listed afresh)",
            "unit": "ms",
            "value": round(1000 * mean, 1),
            "per_job_ms": round(1000 * mean / max(jobs, 1), 3),
            "settings": {"period_s": RESYNC_S, "resyncs_averaged": int(samples)},
        }
    ]


async def churn(
    session: aiohttp.ClientSession,
    server: str,
    operator: OperatorProcess,
    port: int,
    watcher: Watcher,
    waves: int,
    size: int,
) -> list[dict[str, Any]]:
    """Waves of jobs created, finished and deleted in one namespace: RSS after each wave,
    once the operator's per-job tables are back where they were before the wave."""
    assert operator.proc is not None
    sampler = ProcSampler(operator.proc.pid)
    path = f"/apis/kubetune.io/v1alpha1/namespaces/{watcher.namespace}/automodeljobs"
    before = await scrape(port)
    base = {t: tracked(before, t) for t in PER_JOB_TABLES}  # the other namespaces' jobs stay
    rss: list[float] = []
    for wave in range(waves):
        names = [f"c{wave}-{i:04d}" for i in range(size)]
        await create_all(session, server, path, [amj(n) for n in names])
        await wait_until(
            lambda names=names: all(("AutomodelJob", n) in watcher.seen.done for n in names),
            900,
            f"churn wave {wave}: every job Succeeded",
        )
        await delete_all(session, server, path)
        deadline = time.monotonic() + 300
        while True:
            metrics = await scrape(port)
            left = {t: tracked(metrics, t) - base[t] for t in PER_JOB_TABLES if tracked(metrics, t) > base[t]}
            if not left:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"churn wave {wave}: per-job state left after deletion: {left}")
            await asyncio.sleep(1)
        rss.append(sampler.rss() / 1e6)
    await watcher.stop()
    growth = (rss[-1] - rss[0]) / max(waves - 1, 1)
    return [
        {
            "name": f"operator RSS after each of {waves} waves of {size} jobs created, finished and deleted",
            "unit": "MB",
            "value": round(rss[-1], 1),
            "per_wave": [round(r, 1) for r in rss],
        },
        {
            "name": "operator RSS growth per churn wave (after the first)",
            "unit": "MB",
            "value": round(growth, 2),
            "target": "about 0 (memory stays flat)",
        },
    ]


async def run(n_latency: int, n_throughput: int, workdir: Path, waves: int = 5, wave_size: int = 100) -> dict[str, Any]:
    cluster = LocalCluster(workdir / "cluster")
    cluster.up()
    rows = ROWS  # module-level, so that main() writes the rows measured before a failure
    operator: OperatorProcess | None = None
    try:
        install_crds(cluster)
        kubeconfig = grant_operator(cluster)
        operator = OperatorProcess(kubeconfig, workdir / "operator.log", ["--all-namespaces"]).start()
        OPERATOR.append(operator)
        ctx = cluster._ssl_context(client=True)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=64))
        server = cluster.server

        async def namespace(name: str) -> Watcher:
            cluster.create_namespace(name)
            cluster.kubectl(
                "apply", "-n", name, "-f", str(EXAMPLES / "storage.yaml"), "-f", str(EXAMPLES / "entities.yaml")
            )
            watcher = Watcher(server, ctx, name)
            await watcher.start()
            return watcher

        # 1. reconcile latency, with both baselines in the same run.
        names = [f"l{i:04d}" for i in range(n_latency)]
        w_amj = await namespace("bench-amj")
        await asyncio.sleep(3)  # the operator has seen the entities and claims
        before = await request_counts(session, server)
        await create_all(
            session, server, "/apis/kubetune.io/v1alpha1/namespaces/bench-amj/automodeljobs", [amj(n) for n in names]
        )
        await wait_until(
            lambda: all(("Job", f"{n}-automodel") in w_amj.seen.added for n in names), 600, "every AutomodelJob's child"
        )
        ours = latencies(w_amj.seen, "AutomodelJob", names, lambda n: w_amj.seen.added.get(("Job", f"{n}-automodel")))
        # 3. status latency, as the children complete (kwok: 1 s after Running, 16 GPUs in all).
        await wait_until(
            lambda: all(("AutomodelJob", n) in w_amj.seen.done for n in names), 900, "every AutomodelJob Succeeded"
        )
        after = await request_counts(session, server)
        status = [
            w_amj.seen.done[("AutomodelJob", n)] - w_amj.seen.done[("Job", f"{n}-automodel")]
            for n in names
            if ("Job", f"{n}-automodel") in w_amj.seen.done
        ]

        w_job = await namespace("bench-job")
        await create_all(session, server, "/apis/batch/v1/namespaces/bench-job/jobs", [batch_job(n) for n in names])
        await wait_until(lambda: all(first_pod(w_job.seen, n) for n in names), 600, "every Job's pod")
        jobs = latencies(w_job.seen, "Job", names, lambda n: first_pod(w_job.seen, n))

        w_pj = await namespace("bench-pj")
        await create_all(
            session, server, "/apis/kubeflow.org/v1/namespaces/bench-pj/pytorchjobs", [pytorchjob(n) for n in names]
        )
        await wait_until(lambda: all(first_pod(w_pj.seen, n) for n in names), 900, "every PyTorchJob's pod")
        pjs = latencies(w_pj.seen, "PyTorchJob", names, lambda n: first_pod(w_pj.seen, n))

        job_rows = summary(f"baseline: Job → pod, {n_latency} at once (kube-controller-manager)", jobs)
        rows += job_rows
        rows += summary(f"baseline: PyTorchJob → pod, {n_latency} at once (training-operator)", pjs)
        rows += with_baseline(
            summary(f"AutomodelJob → child Job, {n_latency} at once", ours),
            job_rows,
            "Job → pod (kube-controller-manager)",
        )
        rows += summary("status latency: child Complete → AutomodelJob Succeeded", status)
        delta = {k: after[k] - before[k] for k in OPERATOR_ONLY if after[k] - before[k]}
        per_job = sum(delta.values()) / n_latency
        events = json.loads(cluster.kubectl("get", "events", "-n", "bench-amj", "-o", "json").stdout)["items"]
        ours_events = [e for e in events if (e.get("source") or {}).get("component") == "kopf"]
        event_writes = sum(1 for _ in ours_events) / n_latency
        rows.append(
            {
                "name": "API writes per AutomodelJob (whole life, excluding events)",
                "value": round(per_job, 2),
                "unit": "requests",
                "breakdown": {
                    f"{v} {r}{'/' + s if s else ''}": round(c / n_latency, 2) for (r, s, v), c in sorted(delta.items())
                },
            }
        )
        rows.append({"name": "Events posted per AutomodelJob", "value": round(event_writes, 2), "unit": "events"})
        for w in (w_amj, w_job, w_pj):
            await w.stop()

        # 2. throughput at scale, with the operator's memory and CPU.
        w_big = await namespace("bench-scale")
        await asyncio.sleep(3)
        assert operator.proc is not None
        sampler = ProcSampler(operator.proc.pid)
        sampler.start()
        cpu0 = sampler.cpu_seconds()
        big = [f"s{i:04d}" for i in range(n_throughput)]
        t0 = time.perf_counter()
        await create_all(
            session, server, "/apis/kubetune.io/v1alpha1/namespaces/bench-scale/automodeljobs", [amj(n) for n in big]
        )
        await wait_until(
            lambda: all(("Job", f"{n}-automodel") in w_big.seen.added for n in big), 1800, "every child at scale"
        )
        t1 = max(w_big.seen.added[("Job", f"{n}-automodel")] for n in big)
        # As in the scale curve: the start is done when the job's status names its child.
        await wait_until(
            lambda: all(("AutomodelJob", n) in w_big.seen.named for n in big), 1800, "every status at scale"
        )
        t2 = max(w_big.seen.named[("AutomodelJob", n)] for n in big)
        cpu = sampler.cpu_seconds() - cpu0
        sampler.stop()
        rows.append(
            {
                "name": f"throughput: {n_throughput} AutomodelJobs at once → all children",
                "unit": "jobs/s",
                "value": round(n_throughput / (t1 - t0), 2),
                "target": ">= 50",
            }
        )
        rows.append(
            {
                "name": f"throughput: {n_throughput} AutomodelJobs at once → every status names its child",
                "unit": "jobs/s",
                "value": round(n_throughput / (t2 - t0), 2),
                "target": ">= 100",
            }
        )
        rows.append(
            {
                "name": "operator peak RSS during the throughput run",
                "unit": "MB",
                "value": round(sampler.peak_rss / 1e6, 1),
                "target": "<= 250",
            }
        )
        rows.append(
            {
                "name": "operator CPU per job (throughput run, until every status names its child)",
                "unit": "ms",
                "value": round(1000 * cpu / n_throughput, 2),
            }
        )
        left = [n for n in big if ("Job", f"{n}-automodel") not in w_big.seen.added]
        rows.append({"name": "jobs left without a child", "unit": "jobs", "value": len(left)})
        await w_big.stop()

        # 5 and 6, with an operator that serves /metrics and resyncs often.
        operator.stop()
        port = free_port()
        operator = OperatorProcess(
            operator.kubeconfig,
            workdir / "operator-churn.log",
            ["--all-namespaces", "--resync-seconds", str(RESYNC_S), "--metrics-port", str(port)],
        ).start()
        OPERATOR[:] = [operator]
        try:
            rows += await resync_cost(port)
        except (TimeoutError, OSError, aiohttp.ClientError) as err:
            rows.append({"name": "resync over every job", "error": repr(err)})
        # The churn's jobs must not queue behind the throughput run's for kwok's 16 GPUs.
        await delete_all(session, server, "/apis/kubetune.io/v1alpha1/namespaces/bench-scale/automodeljobs")
        await wait_until(lambda: not namespace_has_workloads(cluster, "bench-scale"), 900, "bench-scale cleaned up")
        try:
            rows += await churn(session, server, operator, port, await namespace("bench-churn"), waves, wave_size)
        except (TimeoutError, OSError, aiohttp.ClientError) as err:
            rows.append({"name": "operator RSS under churn", "error": repr(err)})
        await session.close()
    finally:
        if operator is not None:
            operator.stop()
        cluster.down(remove_state=False)
    return {"rows": rows}


def tenants(names: list[str]) -> dict[str, Any]:
    """The namespaces and, in each, the claims and entities of examples/ (one List)."""
    docs = [d for f in ("storage.yaml", "entities.yaml") for d in yaml.safe_load_all((EXAMPLES / f).read_text()) if d]
    items: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in names]
    for namespace in names:
        for doc in docs:
            items.append({**doc, "metadata": {**doc["metadata"], "namespace": namespace}})
    return {"apiVersion": "v1", "kind": "List", "items": items}


def tenants_settled(cluster: LocalCluster) -> int:
    """Claims Bound plus entities Ready, over every namespace (asked at most every 5 s)."""
    if time.monotonic() - _last_check[0] < 5:
        return 0
    _last_check[0] = time.monotonic()
    objects = json.loads(cluster.kubectl("get", "pvc,models,filesets", "-A", "-o", "json").stdout)["items"]
    return sum(
        (o.get("status") or {}).get("phase") == "Bound"
        or any(
            cond.get("type") == "Ready" and cond.get("status") == "True"
            for cond in (o.get("status") or {}).get("conditions") or []
        )
        for o in objects
    )


async def create_spread(session: aiohttp.ClientSession, server: str, names: list[str], namespaces: list[str]) -> None:
    """AutomodelJobs named `names`, dealt round-robin over the namespaces, 32 requests at a time."""
    sem = asyncio.Semaphore(32)

    async def one(i: int, name: str) -> None:
        path = f"/apis/kubetune.io/v1alpha1/namespaces/{namespaces[i % len(namespaces)]}/automodeljobs"
        async with sem, session.post(server + path, json=amj(name)) as resp:
            if resp.status >= 300:
                raise RuntimeError(f"create {name}: {resp.status} {await resp.text()}")

    await asyncio.gather(*(one(i, n) for i, n in enumerate(names)))


async def scale_point(size: int, n_namespaces: int, workdir: Path) -> list[dict[str, Any]]:
    """One point of the scale curve, on a fresh cluster and operator: `size` AutomodelJobs
    created at once across `n_namespaces` namespaces; throughput to the last child, job ADDED
    -> child ADDED latency, the operator's peak RSS and CPU per job."""
    cluster = LocalCluster(workdir / f"cluster-{size}")
    cluster.up()
    operator: OperatorProcess | None = None
    watcher: Watcher | None = None
    session: aiohttp.ClientSession | None = None
    try:
        install_crds(cluster)
        kubeconfig = grant_operator(cluster)
        namespaces = [f"tenant-{i:03d}" for i in range(n_namespaces)]
        cluster.kubectl("apply", "-f", "-", input=json.dumps(tenants(namespaces)))
        operator = OperatorProcess(kubeconfig, workdir / f"operator-{size}.log", ["--all-namespaces"]).start()
        OPERATOR[:] = [operator]
        ctx = cluster._ssl_context(client=True)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=64))
        watcher = Watcher(cluster.server, ctx, None, ("AutomodelJob", "Job"))
        await watcher.start()
        # Every claim bound and every entity Ready before the clock starts: otherwise the
        # operator's entity passes and the volume provisioning of 100 namespaces run inside
        # the measured window (seen: 0.6 Model status patches per job in it).
        expected = len(tenants(namespaces)["items"]) - len(namespaces)
        await wait_until(lambda: tenants_settled(cluster) >= expected, 900, "every claim Bound, every entity Ready")
        # One job through: the operator is up and has listed every entity and claim.
        await create_spread(session, cluster.server, ["warm"], namespaces)
        seen = watcher.seen
        await wait_until(lambda: ("Job", "warm-automodel") in seen.added, 300, "the warm-up job's child")
        assert operator.proc is not None
        sampler = ProcSampler(operator.proc.pid)
        sampler.start()
        cpu0 = sampler.cpu_seconds()
        # Where the cores go: every component of the control plane shares them with the operator.
        components = {"kubetune operator": sampler, **{n: ProcSampler(pr.pid) for n, pr in cluster.procs.items()}}
        busy0 = {n: s.cpu_seconds() for n, s in components.items()}
        requests0 = await request_counts(session, cluster.server)
        names = [f"j{i:05d}" for i in range(size)]
        t0 = time.perf_counter()
        await create_spread(session, cluster.server, names, namespaces)
        await wait_until(
            lambda: all(("Job", f"{n}-automodel") in seen.added for n in names), 3600, f"the children of {size} jobs"
        )
        t1 = max(seen.added[("Job", f"{n}-automodel")] for n in names)
        # The work is counted to where every job's status names its child, not to the last
        # child: a start's status write (and its Event) comes after its child, so counting to
        # the last child favoured an operator that makes every child first and writes every
        # status after the clock stopped (seen with --start-limit, bench/README.md).
        await wait_until(
            lambda: all(("AutomodelJob", n) in seen.named for n in names), 3600, f"the statuses of {size} jobs"
        )
        t2 = max(seen.named[("AutomodelJob", n)] for n in names)
        cpu = sampler.cpu_seconds() - cpu0
        busy = {n: round(s.cpu_seconds() - busy0[n], 1) for n, s in components.items()}
        requests = await request_counts(session, cluster.server)
        sampler.stop()
        per_job = {
            f"{verb} {resource}{'/' + sub if sub else ''}": round((n - requests0[(resource, sub, verb)]) / size, 2)
            for (resource, sub, verb), n in requests.items()
            if verb not in ("GET", "LIST", "WATCH") and n - requests0[(resource, sub, verb)] >= size / 20
        }
        latency = latencies(seen, "AutomodelJob", names, lambda n: seen.added.get(("Job", f"{n}-automodel")))
        named = latencies(seen, "AutomodelJob", names, lambda n: seen.named.get(("AutomodelJob", n)))
        settings = {"jobs": size, "namespaces": n_namespaces}
        return [
            {
                "name": f"scale {size}: throughput",
                "unit": "jobs/s",
                "value": round(size / (t1 - t0), 2),
                "settings": settings,
            },
            {
                "name": f"scale {size}: throughput until every job's status names its child",
                "unit": "jobs/s",
                "value": round(size / (t2 - t0), 2),
                "settings": settings,
            },
            *(
                {**r, "name": f"scale {size}: {r['name']}", "settings": settings}
                for r in summary("job → child Job", latency)
            ),
            *(
                {**r, "name": f"scale {size}: {r['name']}", "settings": settings}
                for r in summary("job → its status names the child", named)
            ),
            {
                "name": f"scale {size}: operator peak RSS",
                "unit": "MB",
                "value": round(sampler.peak_rss / 1e6, 1),
                "settings": settings,
            },
            {
                "name": f"scale {size}: operator CPU per job",
                "unit": "ms",
                "value": round(1000 * cpu / size, 2),
                "settings": settings,
            },
            {
                "name": f"scale {size}: CPU seconds of the whole control plane until every status names its child",
                "unit": "s",
                "value": round(sum(busy.values()), 1),
                "wall_s": round(t2 - t0, 1),
                "by_component": dict(sorted(busy.items(), key=lambda kv: -kv[1])),
                "settings": settings,
            },
            {
                "name": f"scale {size}: API writes per job until every status names its child (every client)",
                "unit": "requests",
                "value": round(sum(per_job.values()), 2),
                "breakdown": dict(sorted(per_job.items(), key=lambda kv: -kv[1])),
                "settings": settings,
            },
        ]
    finally:
        if watcher is not None:
            await watcher.stop()
        if session is not None:
            await session.close()
        if operator is not None:
            operator.stop()
        cluster.down()


async def scale(sizes: list[int], n_namespaces: int, workdir: Path) -> dict[str, Any]:
    for size in sizes:
        ROWS.extend(await scale_point(size, n_namespaces, workdir))
    return {"rows": ROWS}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--scale",
        help="comma-separated job counts, e.g. 1000,3000,10000: measure only the scale curve, "
        "each size on a fresh cluster",
    )
    parser.add_argument("--scale-namespaces", type=int, default=100)
    parser.add_argument("--latency-jobs", type=int, default=200)
    parser.add_argument("--throughput-jobs", type=int, default=1000)
    parser.add_argument("--churn-waves", type=int, default=5)
    parser.add_argument("--churn-jobs", type=int, default=100, help="jobs per churn wave")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    # A timeout's SIGTERM must still stop the cluster and the operator (the finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.scale:
            sizes = [int(n) for n in args.scale.split(",")]
            result = asyncio.run(scale(sizes, args.scale_namespaces, workdir))
        else:
            result = asyncio.run(
                run(args.latency_jobs, args.throughput_jobs, workdir, args.churn_waves, args.churn_jobs)
            )
    except BaseException as err:
        # What was measured before the failure is kept, with the failure as a row.
        result = {"rows": [*ROWS, {"name": "operator bench", "error": repr(err)}]}
        result["logs"] = str(workdir)
        args.out.write_text(json.dumps(result, indent=2))
        raise
    result["logs"] = str(workdir)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
