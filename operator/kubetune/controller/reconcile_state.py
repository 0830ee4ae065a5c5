"""The reconciler's memory: every table it keeps, by job or by entity, and the lock per
job. All of it can be rebuilt from the API server (children have fixed names and are
created with create-or-get; status is computed whole on each pass), so a restarted
operator loses nothing by starting empty.

The passes live in their own modules, one concern each, as mixins over this state
(retry.py, entities.py, children.py, jobs.py); reconciler.py puts them together.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sized
from dataclasses import dataclass
from typing import Any

from kubetune.controller.builders import OperatorSettings
from kubetune.controller.kubeclient import KubeClient
from kubetune.controller.references import JobSpec
from kubetune.controller.status import PodFailure
from kubetune.controller.world import World
from kubetune_api import constants as c

JobKey = tuple[str, str, str]  # kind, namespace, name
EventPoster = Callable[[Mapping[str, Any], str, str, str], None]  # body, type, reason, message

# The tables of tables() that hold an entry per job, dropped with the job (what tests and
# make bench check through kubetune_tracked_entries).
PER_JOB_TABLES = (
    "jobs",
    "children",
    "blockers",
    "pod_failures",
    "waiting",
    "locks",
    "failures",
    "retries",
    "specs",
    "refusals",
    "outputs_made",
    "pod_checks",
    "memory_risks",
)


@dataclass(frozen=True)
class PodCheck:
    """The last look at a pod-less child's Events: for which child, when to look again,
    the interval that led there, and what was found."""

    uid: str
    due: float
    interval: float
    found: tuple[str, str] | None


def body_ref(body: Mapping[str, Any]) -> dict[str, Any]:
    """The job as an Event names it (kopf.event takes a body): its kind, name and uid."""
    meta = body["metadata"]
    return {
        "apiVersion": body.get("apiVersion", c.API_VERSION),
        "kind": body["kind"],
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid")},
    }


class ReconcilerState(ABC):
    """The tables every pass reads and writes, and `_reconcile`, the one pass every
    concern starts (for a watch event, a retry or a resync); jobs.py defines it."""

    def __init__(
        self, client: KubeClient, settings: OperatorSettings, post_event: EventPoster, start_limit: int = 0
    ) -> None:
        self.client = client
        self.settings = settings
        self.post_event = post_event
        self.world = World()
        self.jobs: dict[JobKey, dict[str, Any]] = {}  # latest body seen or written
        self.children: dict[JobKey, Mapping[str, Any]] = {}
        self.blockers: dict[JobKey, dict[str, tuple[str, str]]] = {}  # pod name -> blocker
        # pod uid -> why that pod stopped before the job was done (a PyTorchJob's pod made
        # again keeps its name, so the uid tells the two apart)
        self.pod_failures: dict[JobKey, dict[str, PodFailure]] = {}
        self.waiting: set[JobKey] = set()
        # What the entity's status says now: ready, and the Ready condition's reason and message.
        self.entity_ready: dict[tuple[str, str, str], tuple[bool, str, str]] = {}
        # Entities with spec.source: the initializer Job made (or found) for the current version.
        self.initializers: dict[tuple[str, str, str], str] = {}
        self._locks: dict[JobKey, asyncio.Lock] = {}
        self._failures: dict[JobKey, int] = {}
        self._retries: dict[JobKey, asyncio.Task[None]] = {}
        self._specs: dict[JobKey, tuple[tuple[Any, Any], JobSpec | str]] = {}
        self._refusals: dict[JobKey, int] = {}  # refusals in a row (quota, admission), for the backoff
        self.child_kinds: set[str] | None = None  # the child kinds installed when the operator started
        self.on_new_child_kind: Callable[[list[str]], None] = lambda kinds: None
        self._outputs_made: dict[JobKey, str] = {}  # output Model created (or found) by this process
        self._pod_checks: dict[JobKey, PodCheck] = {}  # Events looked at for a child without pods
        # namespace -> (when listed, that listing in flight or done): its FailedCreate Events by
        # involved uid, one LIST shared by every pod-less child of the namespace (children.py)
        self._failed_creates: dict[str, tuple[float, asyncio.Future[dict[str, list[Mapping[str, Any]]]]]] = {}
        self._memory_risks: dict[JobKey, tuple[tuple[Any, ...], str | None]] = {}  # per generation, GPU size
        # Job starts creating objects at once (--start-limit; 0: no limit), see JobPasses._start.
        self._start_slots = asyncio.Semaphore(start_limit) if start_limit else None

    def _lock(self, key: JobKey) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def tables(self) -> dict[str, Sized]:
        """Every in-memory table, by name, for the metrics: the PER_JOB_TABLES must empty
        when the jobs are deleted; the world's follow the entities, claims and volumes."""
        return {
            "jobs": self.jobs,
            "children": self.children,
            "blockers": self.blockers,
            "pod_failures": self.pod_failures,
            "waiting": self.waiting,
            "locks": self._locks,
            "failures": self._failures,
            "retries": self._retries,
            "specs": self._specs,
            "refusals": self._refusals,
            "outputs_made": self._outputs_made,
            "pod_checks": self._pod_checks,
            "memory_risks": self._memory_risks,
            "entity_ready": self.entity_ready,
            "initializers": self.initializers,
            "entities": self.world.entities,
            "claims": self.world.claims,
            "claim_volumes": self.world.claim_volumes,
            "volumes": self.world.volumes,
            "producers": self.world.producers,
            "versions": self.world.versions,
            "downloads": self.world.downloads,
            "initializer_names": self.world.initializer_names,
            "initializers_stopped": self.world.initializers_stopped,
            "uids": self.world.uids,
        }

    def job_phases(self) -> list[tuple[str, str]]:
        return [(key[0], (body.get("status") or {}).get("phase") or "New") for key, body in self.jobs.items()]

    @abstractmethod
    async def _reconcile(self, key: JobKey) -> None:
        """One level-based pass over the job: validate, resolve, build, create-or-get, write status."""
