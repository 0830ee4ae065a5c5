"""The reconciler: validate → resolve → build → create-or-get → write status once.

The handlers (handlers.py) feed it watch events; it keeps no state it could not
rebuild from the API server: children have fixed names and are created with
create-or-get, and every status write is computed whole from what the job, its
entities and its child say now. So a killed operator resumes where it left off
and never makes a second child.
"""

from __future__ import annotations

import asyncio
import json
import logging
import posixpath
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence, Sized
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, cast

import aiohttp
from pydantic import ValidationError

from kubetune.api.resources import BY_KIND
from kubetune.controller import metrics
from kubetune.controller import status as st
from kubetune.controller.builders import (
    MAX_JOB_NAME,
    JobInputs,
    OperatorSettings,
    build_all,
    build_output_model,
    child_ref,
    default_output_model_name,
    fallback_output_model_name,
    output_format,
    output_model_name,
    suspend_patch,
    total_gpus,
)
from kubetune.controller.kubeclient import PLURALS, ApiError, KubeClient, object_path
from kubetune.controller.references import EntityRecord, JobSpec, ReferenceProblem, resolve_references
from kubetune_api import constants as c
from kubetune_api.entities import EntityStatus
from kubetune_api.status import ChildRef, Condition, ConditionType, JobStatus, OutputRef

log = logging.getLogger("kubetune.operator")

JobKey = tuple[str, str, str]  # kind, namespace, name
EventPoster = Callable[[Mapping[str, Any], str, str, str], None]  # body, type, reason, message


def entity_record(kind: str, namespace: str, name: str, spec: Mapping[str, Any], pvc_phase: str | None) -> EntityRecord:
    """An entity is ready in a cluster when its claim exists and is bound."""
    pvc = (spec.get("storage") or {}).get("pvc")
    problem: tuple[str, str] | None = None
    if not pvc:
        problem = ("NoClusterStorage", "it has no spec.storage.pvc (localPath is for `kubetune run` only)")
    elif pvc_phase is None:
        problem = ("ClaimNotFound", f"PersistentVolumeClaim {pvc['claimName']} not found in namespace {namespace}")
    elif pvc_phase != "Bound":
        problem = ("ClaimNotBound", f"PersistentVolumeClaim {pvc['claimName']} is {pvc_phase}")
    return EntityRecord.judged(kind, namespace, name, spec, problem)


@dataclass
class World:
    """What the watches know: entity specs and claim phases, by namespace and name."""

    entities: dict[tuple[str, str, str], Mapping[str, Any]] = field(default_factory=dict)
    claims: dict[tuple[str, str], str] = field(default_factory=dict)
    # Model (namespace, name) -> uid of the job that produced it (label), "" for one made by hand.
    producers: dict[tuple[str, str], str] = field(default_factory=dict)
    claim_volumes: dict[tuple[str, str], str] = field(default_factory=dict)  # claim -> PersistentVolume
    volumes: dict[str, tuple[str, ...] | None] = field(default_factory=dict)  # PersistentVolume -> backing

    def backing(self, namespace: str, claim: str) -> tuple[str, ...] | None:
        """What the claim's volume stores its files on; None if unbound or not comparable."""
        volume = self.claim_volumes.get((namespace, claim))
        return self.volumes.get(volume) if volume else None

    def lookup(self, kind: str, namespace: str, name: str) -> EntityRecord | None:
        spec = self.entities.get((kind, namespace, name))
        if spec is None:
            return None
        pvc = (spec.get("storage") or {}).get("pvc") or {}
        return entity_record(kind, namespace, name, spec, self.claims.get((namespace, pvc.get("claimName", ""))))


def volume_backing(spec: Mapping[str, Any]) -> tuple[str, ...] | None:
    """A PersistentVolume's storage, comparable across volumes: two claims bound to volumes
    with the same backing see the same files. None for kinds we cannot compare."""
    if csi := spec.get("csi"):
        return ("csi", str(csi.get("driver", "")), str(csi.get("volumeHandle", "")))
    if nfs := spec.get("nfs"):
        return ("nfs", str(nfs.get("server", "")), posixpath.normpath(str(nfs.get("path", "/"))))
    if host := spec.get("hostPath"):
        return ("hostPath", posixpath.normpath(str(host.get("path", "/"))))
    if local := spec.get("local"):
        # The same path on another node is another disk: the node affinity is part of it.
        affinity = json.dumps(spec.get("nodeAffinity"), sort_keys=True)
        return ("local", posixpath.normpath(str(local.get("path", "/"))), affinity)
    return None


def describe_backing(backing: tuple[str, ...] | None) -> str:
    if backing is None:
        return "a volume kubetune cannot compare (CSI, NFS, hostPath and local volumes can be)"
    kind, *rest = backing
    return {
        "csi": lambda: f"CSI driver {rest[0]}, volume handle {rest[1]}",
        "nfs": lambda: f"NFS {rest[0]}:{rest[1]}",
        "hostPath": lambda: f"host path {rest[0]}",
        "local": lambda: f"local path {rest[0]}",
    }[kind]()


def job_key_of(child: Mapping[str, Any]) -> JobKey | None:
    """The job a child or pod belongs to, from the labels the builders put on it (an
    unknown kind label is nobody's: it would name no resource)."""
    meta = child.get("metadata") or {}
    labels = meta.get("labels") or {}
    name, kind, namespace = labels.get(c.LABEL_JOB_NAME), labels.get(c.LABEL_JOB_KIND), meta.get("namespace")
    return (kind, namespace, name) if name and kind in BY_KIND and namespace else None


def _pending_status(conditions: list[Condition], generation: int | None) -> JobStatus:
    """A job with no child: nothing of a child's (or a forger's) may remain in its status."""
    return JobStatus(
        phase=st.PENDING,
        conditions=conditions,
        observed_generation=generation,
        child=None,
        output=None,
        start_time=None,
        completion_time=None,
    )


def _body_ref(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "apiVersion": body.get("apiVersion", c.API_VERSION),
        "kind": body["kind"],
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid")},
    }


class Reconciler:
    def __init__(self, client: KubeClient, settings: OperatorSettings, post_event: EventPoster) -> None:
        self.client = client
        self.settings = settings
        self.post_event = post_event
        self.world = World()
        self.jobs: dict[JobKey, dict[str, Any]] = {}  # latest body seen or written
        self.children: dict[JobKey, Mapping[str, Any]] = {}
        self.blockers: dict[JobKey, dict[str, tuple[str, str]]] = {}  # pod name -> blocker
        # pod name -> (finishedAt, the trainer's reason) of pods that failed
        self.trainer_exits: dict[JobKey, dict[str, tuple[str, str]]] = {}
        self.waiting: set[JobKey] = set()
        self.entity_ready: dict[tuple[str, str, str], bool] = {}  # what the entity's status says now
        self._locks: dict[JobKey, asyncio.Lock] = {}
        self._failures: dict[JobKey, int] = {}
        self._retries: dict[JobKey, asyncio.Task[None]] = {}
        self._specs: dict[JobKey, tuple[tuple[Any, Any], JobSpec | str]] = {}
        self._refusals: dict[JobKey, int] = {}  # refusals in a row (quota, admission), for the backoff
        self.child_kinds: set[str] | None = None  # the child kinds installed when the operator started
        self.on_new_child_kind: Callable[[list[str]], None] = lambda kinds: None
        self._outputs_made: dict[JobKey, str] = {}  # output Model created (or found) by this process

    def _lock(self, key: JobKey) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    # --- transient failures ---------------------------------------------------------------
    # A watch event is delivered once: a request that times out or meets a busy API server
    # must not lose the job. Such a pass is retried for that job alone, with backoff
    # (0.5 s doubling to 60 s), and kopf never sees the error.

    async def _guarded(self, key: JobKey, step: Callable[[], Awaitable[None]]) -> None:
        started = time.monotonic()
        try:
            await step()
        except Exception as err:
            metrics.RECONCILE_SECONDS.labels(key[0]).observe(time.monotonic() - started)
            transient = is_transient(err)
            metrics.RECONCILE_PASSES.labels(key[0], "retry" if transient else "error").inc()
            if not transient:
                raise
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (failures - 1))
            # str() of a timeout is empty: name its type instead.
            log.warning("%s %s/%s: %s; retrying in %.1f s", *key, str(err) or type(err).__name__, delay)
            self._retry_later(key, delay)
        else:
            metrics.RECONCILE_SECONDS.labels(key[0]).observe(time.monotonic() - started)
            metrics.RECONCILE_PASSES.labels(key[0], "ok").inc()
            self._failures.pop(key, None)

    def _retry_later(self, key: JobKey, delay: float) -> None:
        if key in self._retries:
            return

        async def retry() -> None:
            await asyncio.sleep(delay)
            self._retries.pop(key, None)
            if key not in self.jobs:
                return
            async with self._lock(key):
                if key in self.jobs:
                    await self._guarded(key, partial(self._reconcile, key))

        self._retries[key] = asyncio.create_task(retry())

    # --- jobs -------------------------------------------------------------------------
    # Trust: a job's status is written by the operator AND by the trainer's per-job
    # identity (progress), so nothing in it steers a request. The child's kind and name
    # come from the builders, the generation last passed on from an annotation on the
    # child, and every field but `progress` is computed whole from the child on each pass,
    # so a forged phase, condition, child or output is overwritten by the next pass (which
    # the forging write itself triggers). The one fact read from status is that a job
    # without a child finished: its child is gone (deleted by hand, a TTL) and the
    # outcome stands (docs/OPERATOR.md, "What status is trusted").

    def forget_job(self, key: JobKey) -> None:
        for table in (
            self.jobs,
            self.children,
            self.blockers,
            self.trainer_exits,
            self._locks,
            self._failures,
            self._specs,
            self._refusals,
        ):
            table.pop(key, None)
        self.waiting.discard(key)
        self._outputs_made.pop(key, None)
        retry = self._retries.pop(key, None)
        if retry is not None:
            retry.cancel()

    def tables(self) -> dict[str, Sized]:
        """Every in-memory table, by name, for the metrics: the per-job ones must empty
        when the jobs are deleted; the world's follow the entities, claims and volumes."""
        return {
            "jobs": self.jobs,
            "children": self.children,
            "blockers": self.blockers,
            "trainer_exits": self.trainer_exits,
            "waiting": self.waiting,
            "locks": self._locks,
            "failures": self._failures,
            "retries": self._retries,
            "specs": self._specs,
            "refusals": self._refusals,
            "outputs_made": self._outputs_made,
            "entity_ready": self.entity_ready,
            "entities": self.world.entities,
            "claims": self.world.claims,
            "claim_volumes": self.world.claim_volumes,
            "volumes": self.world.volumes,
            "producers": self.world.producers,
        }

    def job_phases(self) -> list[tuple[str, str]]:
        return [(key[0], (body.get("status") or {}).get("phase") or "New") for key, body in self.jobs.items()]

    async def on_job(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        key = (body["kind"], meta["namespace"], meta["name"])
        async with self._lock(key):
            known = self.jobs.get(key)
            if known is not None and known["metadata"].get("uid") != meta.get("uid"):
                self.forget_job(key)  # deleted and re-created under the same name
            self.jobs[key] = dict(body)
            await self._guarded(key, partial(self._reconcile, key))

    async def retry_waiting(self) -> None:
        for key in list(self.waiting):
            if key not in self.jobs:
                continue  # deleted meanwhile: taking its lock would make the lock again
            async with self._lock(key):
                if key in self.jobs:
                    await self._guarded(key, partial(self._reconcile, key))

    async def prime_children(self, namespaces: Sequence[str]) -> None:
        """Before the watches start: list the children that exist, so that a job's first
        pass knows its child without trusting status (and makes no create request for a
        child that is already there). Children the watches deliver later update this."""
        listed, kinds = await self._list_children(namespaces)
        self.children.update(listed)
        self.child_kinds = kinds

    async def _list_children(self, namespaces: Sequence[str]) -> tuple[dict[JobKey, dict[str, Any]], set[str]]:
        """Every child of ours, by job, and the child kinds that could be listed (a kind
        whose CRD is not installed is left out)."""
        children: dict[JobKey, dict[str, Any]] = {}
        kinds: set[str] = set()
        for kind, collection in (("Job", "/apis/batch/v1"), ("PyTorchJob", f"/apis/{c.PYTORCHJOB_API_VERSION}")):
            plural = PLURALS[kind]
            targets: list[str | None] = [*namespaces] or [None]
            try:
                for namespace in targets:
                    where = f"{collection}/namespaces/{namespace}/{plural}" if namespace else f"{collection}/{plural}"
                    listed = await self.client.list(where, label_selector=f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY}")
                    for item in listed.get("items") or []:
                        # List items of built-in kinds carry no apiVersion or kind of their own.
                        item = {**item, "apiVersion": listed.get("apiVersion"), "kind": kind}
                        key = job_key_of(item)
                        if key is not None:
                            children[key] = item
            except ApiError as err:
                if err.status == 404:  # the kind is not installed (yet)
                    continue
                raise
            kinds.add(kind)
        return children, kinds

    async def resync(self, namespaces: Sequence[str]) -> int:
        """Level-based pass over every job, with the children listed afresh: a watch event
        that never arrived (a dropped stream, a child finished or deleted unseen) cannot
        leave a job behind. Costs one LIST per child kind and namespace, then work in
        memory; a job whose status is right is not written. Returns the jobs passed."""
        listed, kinds = await self._list_children(namespaces)
        if self.child_kinds is not None and kinds - self.child_kinds:
            # A child kind installed after the start (the training-operator's PyTorchJob CRD):
            # kopf resolves the resources it watches once, so the operator must restart.
            self.on_new_child_kind(sorted(kinds - self.child_kinds))
            return 0
        keys = list(self.jobs)
        for key in keys:
            if key not in self.jobs:
                continue  # deleted during the pass: taking its lock would make the lock again
            async with self._lock(key):
                if key not in self.jobs:
                    continue
                cached = self.children.get(key)
                if key in listed:
                    self.children[key] = listed[key]
                elif cached is not None and cached.get("kind") in kinds:
                    del self.children[key]  # gone, and its DELETED event was missed
                await self._guarded(key, partial(self._reconcile, key))
        return len(keys)

    def _spec(self, key: JobKey) -> JobSpec | str:
        """The validated spec, once per generation (pydantic on every pod event adds up)."""
        meta = self.jobs[key]["metadata"]
        stamp = (meta.get("uid"), meta.get("generation"))
        cached = self._specs.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        resource = BY_KIND[key[0]]
        try:
            spec: JobSpec | str = cast(JobSpec, resource.spec_model.model_validate(self.jobs[key].get("spec") or {}))
        except ValidationError as err:
            spec = "; ".join(f"spec.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        self._specs[key] = (stamp, spec)
        return spec

    def _own_child(self, key: JobKey) -> Mapping[str, Any] | None:
        """The cached child, if it belongs to this job (not to an earlier job of the name)."""
        child = self.children.get(key)
        if child is None:
            return None
        uid = self.jobs[key]["metadata"].get("uid")
        owners = (child.get("metadata") or {}).get("ownerReferences") or []
        return child if any(o.get("uid") == uid for o in owners) else None

    async def _write_status(self, key: JobKey, status: JobStatus) -> None:
        body = self.jobs[key]
        current = body.get("status") or {}
        update = st.status_patch(status)
        if not st.changed(current, update):
            return
        resource = BY_KIND[key[0]]
        path = f"/apis/{c.API_VERSION}/namespaces/{key[1]}/{resource.plural}/{key[2]}/status"
        try:
            written = await self.client.merge_patch(path, {"status": update})
        except ApiError as err:
            if err.status == 404:  # deleted meanwhile
                self.forget_job(key)
                return
            raise
        self.jobs[key] = written
        old_phase, new_phase = current.get("phase"), update.get("phase")
        if new_phase and new_phase != old_phase:
            reason, message = self._phase_reason(update)
            kind = (
                "Warning"
                if new_phase == st.FAILED or (new_phase == st.PENDING and reason not in ("Created",))
                else "Normal"
            )
            self.post_event(_body_ref(written), kind, reason, message)

    @staticmethod
    def _phase_reason(update: Mapping[str, Any]) -> tuple[str, str]:
        phase = update["phase"]
        cond_type = {st.SUCCEEDED: st.COND_SUCCEEDED, st.FAILED: st.COND_FAILED, st.SUSPENDED: st.COND_SUSPENDED}.get(
            phase, st.COND_RUNNING
        )
        for conds_key in (cond_type, st.COND_REFERENCES):
            cond = st.find_condition(update.get("conditions"), conds_key)
            if cond is not None and (cond["status"] == "True" or phase == st.PENDING):
                return str(cond["reason"]), f"{phase}: {cond['message']}"
        return phase, phase

    async def _reconcile(self, key: JobKey) -> None:
        body = self.jobs[key]
        meta, current = body["metadata"], body.get("status") or {}
        if meta.get("deletionTimestamp"):
            self.waiting.discard(key)
            return
        generation = meta.get("generation")
        now = st.now_rfc3339()
        spec = self._spec(key)
        if isinstance(spec, str):
            # The API server's schema should have refused this; say why instead of crash-looping.
            await self._fail(key, "InvalidSpec", spec, generation, now)
            return
        if len(key[2]) > MAX_JOB_NAME:
            await self._fail(
                key,
                "NameTooLong",
                f"metadata.name must be at most {MAX_JOB_NAME} characters (child names add a suffix)",
                generation,
                now,
            )
            return
        child = self._own_child(key)
        if child is None:
            if current.get("phase") in st.TERMINAL:
                self.waiting.discard(key)
                return
            await self._start(key, spec, generation, now)
            return
        await self._pass_suspend(key, spec, child, generation)
        await self._write_status(key, await self._status_from_child(key, spec, generation, now))

    async def _start(self, key: JobKey, spec: JobSpec, generation: int | None, now: str) -> None:
        """Resolve the references and create the job's objects (create-or-get)."""
        if self._refusals.get(key) and key in self._retries:
            return  # refused and waiting for its slow retry: events (our own writes too) do not hurry it
        body = self.jobs[key]
        meta, current = body["metadata"], body.get("status") or {}
        resolution = resolve_references(spec, key[1], self.world.lookup)
        problems = list(resolution.problems) + self._claim_problems(key[1], resolution.entities)
        output_model, output_problem = self._output_model_name(key, spec, meta["uid"])
        if output_problem is not None:
            problems.append(output_problem)
        if problems:
            self.waiting.add(key)
            await self._write_status(key, self._pending(current, problems, generation, now))
            return
        self.waiting.discard(key)
        inputs = JobInputs(
            resource=BY_KIND[key[0]],
            name=key[2],
            namespace=key[1],
            uid=meta["uid"],
            spec=spec,
            entities=resolution.entities,
            settings=self.settings,
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
            generation=generation,
            output_model=output_model,
        )
        *support, child = build_all(inputs)
        uid = meta["uid"]
        try:
            # Two round trips instead of five: the pod needs its ConfigMap and ServiceAccount
            # before the child exists, and a RoleBinding needs its Role first.
            await asyncio.gather(*(self._create_or_get(o, uid) for o in support if o["kind"] != "RoleBinding"))
            *_, made = await asyncio.gather(
                *(self._create_or_get(o, uid) for o in [*(o for o in support if o["kind"] == "RoleBinding"), child])
            )
        except _Leftover as err:
            # Deleted and applied again: the garbage collector is still removing the
            # earlier job's objects. Wait for it instead of failing.
            problem = ReferenceProblem("metadata.name", "PreviousJobCleanup", str(err), waiting=True)
            await self._write_status(key, self._pending(current, [problem], generation, now))
            self._retry_later(key, LEFTOVER_RETRY_S)
            return
        except _Conflict as err:
            await self._fail(key, "ChildNameTaken", str(err), generation, now)
            return
        except ApiError as err:
            if err.refusal is not None:
                # A quota or a policy said no: that may change (quota frees, an admin edits
                # the policy), so the job shows why and asks again on a slow backoff.
                await self._refused(key, err.refusal, err.message, generation, now)
                return
            if err.status == 404 and child["kind"] == "PyTorchJob":
                message = (
                    f"the PyTorchJob kind ({c.PYTORCHJOB_API_VERSION}) is not installed: install the Kubeflow "
                    "training-operator; the operator notices it within --resync-seconds and restarts to watch it"
                )
                await self._refused(key, "PyTorchJobNotInstalled", message, generation, now)
                return
            if is_transient(err):
                raise
            # The API server found what we built invalid: no retry will fix it.
            await self._fail(key, "WorkloadRejected", str(err), generation, now)
            return
        self._refusals.pop(key, None)
        # Fold in what the child says now (just created, or already there), so that its
        # first watch event finds nothing to change: one status write, not two.
        if self._own_child(key) is None:
            self.children[key] = {**made, "apiVersion": child["apiVersion"], "kind": child["kind"]}
        await self._pass_suspend(key, spec, self.children[key], generation)
        await self._write_status(key, await self._status_from_child(key, spec, generation, now))

    async def _refused(self, key: JobKey, reason: str, why: str, generation: int | None, now: str) -> None:
        refusals = self._refusals[key] = self._refusals.get(key, 0) + 1
        delay = min(REFUSED_RETRY_MAX_S, REFUSED_RETRY_FIRST_S * 2 ** (refusals - 1))
        current = self.jobs[key].get("status") or {}
        message = f"{why} (asking again in {delay:.0f} s)"
        conditions = st.owned_conditions(
            current.get("conditions"),
            [
                (st.COND_REFERENCES, True, "Resolved", "every reference resolved"),
                (st.COND_CREATED, False, reason, message),
            ],
            generation,
            now,
        )
        await self._write_status(key, _pending_status(conditions, generation))
        log.warning("%s %s/%s: %s", *key, message)
        if refusals == 1 and key in self.jobs:
            self.post_event(_body_ref(self.jobs[key]), "Warning", reason, why)
        self._retry_later(key, delay)

    async def _status_from_child(self, key: JobKey, spec: JobSpec, generation: int | None, now: str) -> JobStatus:
        """Every status field but the trainer's `progress`, from the child and its pods."""
        ref = child_ref(BY_KIND[key[0]], key[2], spec)
        child = self.children[key]
        state = st.child_state(child)
        blocker = next(iter(sorted((self.blockers.get(key) or {}).values())), None)
        if state.phase == st.PENDING and blocker is None and not st.child_has_pods(child):
            blocker = await self._creation_refusal(key, child)
        current = self.jobs[key].get("status") or {}
        status = st.status_from_child(
            current,
            state,
            generation,
            now,
            blocker,
            f"created {ref['kind']} {ref['name']}",
            max((self.trainer_exits.get(key) or {}).values(), default=(None, None))[1],
        )
        status.observed_generation = generation
        status.gpus = total_gpus(spec)
        status.child = ChildRef.model_validate(ref)
        status.output = None
        if state.phase == st.SUCCEEDED:
            status.output = OutputRef(model=await self._create_output_model(key, spec), format=output_format(spec))
        return status

    async def _creation_refusal(self, key: JobKey, child: Mapping[str, Any]) -> tuple[str, str] | None:
        """A child without pods: did its controller's pod creation get refused (a quota,
        Pod Security, a webhook)? Only its Events say so, and nothing is watched that
        changes when one is posted, so look again in POD_CREATION_CHECK_S while the
        child still has no pods."""
        uid = (child.get("metadata") or {}).get("uid")
        if not uid:
            return None
        self._retry_later(key, POD_CREATION_CHECK_S)
        try:
            events = await self.client.list(
                f"/api/v1/namespaces/{key[1]}/events", field_selector=f"involvedObject.uid={uid},reason=FailedCreate"
            )
        except ApiError as err:
            log.warning("%s %s/%s: cannot list the child's events: %s", *key, err)
            return None
        return st.creation_refusal(child, events.get("items") or [])

    async def _pass_suspend(self, key: JobKey, spec: JobSpec, child: Mapping[str, Any], generation: int | None) -> None:
        """After the child exists only `suspend` may change (CEL): pass a new generation on,
        once. Edge-triggered on purpose: Kueue suspends and resumes the child itself, and a
        level-based copy of spec.suspend would undo its admission decisions."""
        annotations = (child.get("metadata") or {}).get("annotations") or {}
        passed = annotations.get(c.ANNOTATION_SPEC_GENERATION)
        if passed == str(generation):
            return
        if st.child_state(child).phase in st.TERMINAL:
            return  # nothing left to suspend or resume
        ref = child_ref(BY_KIND[key[0]], key[2], spec)
        path = object_path({**ref, "metadata": {"namespace": key[1], "name": ref["name"]}})
        if passed is None:
            # Made by a version that did not record it: adopt the child as it is.
            patch: dict[str, Any] = {"metadata": {"annotations": {c.ANNOTATION_SPEC_GENERATION: str(generation)}}}
        else:
            patch = suspend_patch(spec, generation)
        patched = await self.client.merge_patch(path, patch)
        self.children[key] = {**patched, "apiVersion": ref["apiVersion"], "kind": ref["kind"]}

    def _claim_problems(self, namespace: str, entities: Mapping[str, EntityRecord]) -> list[ReferenceProblem]:
        problems = []
        claims = {self.settings.output_claim: "the output claim (operator setting --output-claim)"}
        for role, record in entities.items():
            if record.namespace != namespace:
                claim = record.spec["storage"]["pvc"]["claimName"]
                claims.setdefault(claim, f"the claim of {record.kind} {record.namespace}/{record.name} ({role})")
        for claim, what in claims.items():
            if (namespace, claim) not in self.world.claims:
                problems.append(
                    ReferenceProblem(
                        "spec",
                        "ClaimNotFound",
                        f"PersistentVolumeClaim {claim} not found in namespace {namespace}: it is {what}; pods mount "
                        "claims of their own namespace only",
                        waiting=True,
                    )
                )
        for role, record in entities.items():
            claim = record.spec["storage"]["pvc"]["claimName"]
            if record.namespace == namespace or (namespace, claim) not in self.world.claims:
                continue
            # Consent is given for the entity's files, not for whatever claim of that name
            # this namespace has: mount it only through a claim on the same volume.
            theirs, mine = self.world.backing(record.namespace, claim), self.world.backing(namespace, claim)
            if theirs is not None and mine == theirs:
                continue
            where = f"{record.kind} {record.namespace}/{record.name} ({role}) is on {describe_backing(theirs)}"
            state = "is not bound to a volume yet" if mine is None else "is bound to another volume"
            problems.append(
                ReferenceProblem(
                    "spec",
                    "ClaimNotShared",
                    f"PersistentVolumeClaim {claim} in namespace {namespace} {state}: {where}; a job mounts another "
                    f"namespace's entity only through a claim on the same volume, so bind {claim} here to a "
                    "PersistentVolume with that backing",
                    waiting=True,
                )
            )
        return problems

    def _pending(
        self, current: Mapping[str, Any], problems: list[ReferenceProblem], generation: int | None, now: str
    ) -> JobStatus:
        first = problems[0]
        message = "; ".join(p.message for p in problems)
        conditions = st.owned_conditions(
            current.get("conditions"), [(st.COND_REFERENCES, False, first.reason, message)], generation, now
        )
        return _pending_status(conditions, generation)

    async def _fail(self, key: JobKey, reason: str, message: str, generation: int | None, now: str) -> None:
        self.waiting.discard(key)
        current = self.jobs[key].get("status") or {}
        conditions = st.owned_conditions(
            current.get("conditions"), [(st.COND_FAILED, True, reason, message)], generation, now
        )
        await self._write_status(
            key,
            JobStatus(
                phase=st.FAILED,
                conditions=conditions,
                observed_generation=generation,
                completion_time=current.get("completionTime") or now,
                child=None,
                output=None,
            ),
        )

    async def _create_or_get(self, obj: Mapping[str, Any], owner_uid: str) -> Mapping[str, Any]:
        try:
            return await self.client.create(obj)
        except ApiError as err:
            if err.status != 409:
                raise
        existing = await self.client.get(object_path(obj))
        owners = existing.get("metadata", {}).get("ownerReferences") or []
        if any(o.get("uid") == owner_uid for o in owners):
            return existing
        labels, ours = existing.get("metadata", {}).get("labels") or {}, obj["metadata"]["labels"]
        same_job = all(labels.get(k) == ours[k] for k in (c.LABEL_JOB_NAME, c.LABEL_JOB_KIND, c.LABEL_MANAGED_BY))
        # Owned by a job of this kind and name with another uid: that job is gone (names are
        # unique), so the garbage collector will remove it. An orphan would stay forever.
        if same_job and owners and all(o.get("kind") == ours[c.LABEL_JOB_KIND] for o in owners):
            raise _Leftover(
                f"{obj['kind']} {obj['metadata']['name']} of an earlier {ours[c.LABEL_JOB_KIND]} of this name still "
                "exists; waiting for the garbage collector to remove it"
            )
        raise _Conflict(f"{obj['kind']} {obj['metadata']['name']} already exists and belongs to something else")

    def _output_model_name(self, key: JobKey, spec: JobSpec, uid: str) -> tuple[str | None, ReferenceProblem | None]:
        """The output Model's name if not the default, or why the job must wait: a Model
        of the name that this job did not make is never overwritten or shared."""
        name = default_output_model_name(key[2], spec)
        producer = self.world.producers.get((key[1], name))
        if (c.KIND_MODEL, key[1], name) not in self.world.entities or producer == uid:
            return None, None
        if spec.output.name:
            return None, ReferenceProblem(
                "spec.output.name",
                "OutputNameTaken",
                f"spec.output.name: Model {name} already exists in namespace {key[1]} and was not made by this job; "
                "choose another spec.output.name, or delete that Model",
                waiting=True,
            )
        return fallback_output_model_name(name, uid), None

    # --- children and pods ------------------------------------------------------------------

    async def on_child(self, key: JobKey, child: Mapping[str, Any], deleted: bool = False) -> None:
        if key not in self.jobs:
            # No lock for a job not (or no longer) known: a lock made here would outlive the
            # job. The child is still cached (at start-up it may come before its job); its
            # DELETED event, which garbage collection brings, removes it again.
            self._note_child(key, child, deleted)
            return
        async with self._lock(key):
            self._note_child(key, child, deleted)
            if key in self.jobs:
                # A deleted child of a job that has not finished is made again: the trainer
                # resumes from its checkpoint on the output claim.
                await self._guarded(key, partial(self._reconcile, key))

    def _note_child(self, key: JobKey, child: Mapping[str, Any], deleted: bool) -> None:
        if deleted:
            cached = self.children.get(key)
            if cached is not None and cached["metadata"].get("uid") == child["metadata"].get("uid"):
                del self.children[key]
        else:
            self.children[key] = child

    async def on_pod(self, key: JobKey, pod: Mapping[str, Any], deleted: bool) -> None:
        name = pod["metadata"]["name"]
        if deleted and key not in self.jobs:
            # The job is gone (its pods go after it): what its pods told is needed no more.
            for table in (self.trainer_exits, self.blockers):
                pods = table.get(key)
                if pods is not None:
                    pods.pop(name, None)
                    if not pods:
                        del table[key]
            return
        exit_ = st.trainer_exit(pod)
        exits = self.trainer_exits.setdefault(key, {})
        # Kept after the pod is deleted: the reason outlives a pod cleaned up by a retry.
        new_exit = exit_ is not None and exits.get(name) != exit_
        if exit_ is not None:
            exits[name] = exit_
        elif not exits:
            self.trainer_exits.pop(key, None)
        blocker = None if deleted else st.pod_blocker(pod)
        pods = self.blockers.get(key) or {}
        if pods.get(name) == blocker and not new_exit:
            return  # nothing new (also: a pod that never had a blocker and has none now)
        if blocker is None:
            pods.pop(name, None)
        else:
            pods[name] = blocker
        if pods:
            self.blockers[key] = pods
        else:
            self.blockers.pop(key, None)
        if key not in self.jobs:
            return  # cached for a job whose event is still to come (start-up); no lock for it
        async with self._lock(key):
            if key in self.jobs and key in self.children:
                await self._guarded(key, partial(self._reconcile, key))

    async def _create_output_model(self, key: JobKey, spec: JobSpec) -> str:
        """The output Model's name, created once per process (every later pass of a finished
        job, resyncs included, only looks it up here)."""
        made = self._outputs_made.get(key)
        if made is not None:
            return made
        body = self.jobs[key]
        resolution = resolve_references(spec, key[1], self.world.lookup)
        annotations = (self.children[key].get("metadata") or {}).get("annotations") or {}
        inputs = JobInputs(
            resource=BY_KIND[key[0]],
            name=key[2],
            namespace=key[1],
            uid=body["metadata"]["uid"],
            spec=spec,
            entities=resolution.entities,
            settings=self.settings,
            output_model=annotations.get(c.ANNOTATION_OUTPUT_MODEL),
        )
        made = await self._create_model_once(inputs)
        if made is None:
            # Taken meanwhile by a Model this job did not make (two jobs finishing with one
            # name): keep the result under a name of its own rather than lose it.
            preferred = output_model_name(inputs)
            inputs = replace(inputs, output_model=fallback_output_model_name(preferred, inputs.uid))
            made = await self._create_model_once(inputs)
            if made is None:
                raise ApiError(409, {"message": f"Model {output_model_name(inputs)} is taken"}, "POST", "models")
            self.post_event(
                _body_ref(body),
                "Warning",
                "OutputNameTaken",
                f"Model {preferred} was made by another job meanwhile; the output is Model {made}",
            )
        self._outputs_made[key] = made
        return made

    async def _create_model_once(self, inputs: JobInputs) -> str | None:
        """Create the output Model; its name, or None when the name holds a Model of
        another producer (told by the kubetune.io/job-uid label)."""
        model = build_output_model(inputs)
        try:
            await self.client.create(model)
        except ApiError as err:
            if err.status != 409:
                raise
            existing = await self.client.get(object_path(model))
            if (existing.get("metadata", {}).get("labels") or {}).get(c.LABEL_JOB_UID) != inputs.uid:
                return None
        return str(model["metadata"]["name"])

    # --- entities and claims -----------------------------------------------------------------

    async def on_entity(self, body: Mapping[str, Any], deleted: bool) -> None:
        meta = body["metadata"]
        ekey = (body["kind"], meta["namespace"], meta["name"])
        if deleted:
            self.world.entities.pop(ekey, None)
            self.world.producers.pop((meta["namespace"], meta["name"]), None)
            self.entity_ready.pop(ekey, None)
        else:
            self.world.entities[ekey] = body.get("spec") or {}
            if body["kind"] == c.KIND_MODEL:
                producer = (meta.get("labels") or {}).get(c.LABEL_JOB_UID, "")
                self.world.producers[(meta["namespace"], meta["name"])] = producer
            ready = (body.get("status") or {}).get("ready")
            if ready is not None:
                self.entity_ready[ekey] = bool(ready)
            await self._write_entity_status(body["kind"], meta["namespace"], meta["name"], body.get("status"))
        await self.retry_waiting()

    async def on_volume(self, name: str, spec: Mapping[str, Any] | None) -> None:
        if spec is None:
            self.world.volumes.pop(name, None)
        else:
            backing = volume_backing(spec)
            if name in self.world.volumes and self.world.volumes[name] == backing:
                return
            self.world.volumes[name] = backing
        await self.retry_waiting()

    async def on_claim(self, namespace: str, name: str, phase: str | None, volume: str | None = None) -> None:
        if phase is None:
            self.world.claims.pop((namespace, name), None)
            self.world.claim_volumes.pop((namespace, name), None)
        else:
            self.world.claims[(namespace, name)] = phase
            if volume:
                self.world.claim_volumes[(namespace, name)] = volume
            else:
                self.world.claim_volumes.pop((namespace, name), None)
        for (kind, ns, ename), spec in list(self.world.entities.items()):
            pvc = (spec.get("storage") or {}).get("pvc") or {}
            if ns == namespace and pvc.get("claimName") == name:
                await self._write_entity_status(kind, ns, ename, None)
        await self.retry_waiting()

    async def _write_entity_status(
        self, kind: str, namespace: str, name: str, current: Mapping[str, Any] | None
    ) -> None:
        record = self.world.lookup(kind, namespace, name)
        if record is None or self.entity_ready.get((kind, namespace, name)) == record.ready:
            return
        now = st.now_rfc3339()
        reason = "Ready" if record.ready else record.not_ready_reason
        conditions = st.set_condition(
            (current or {}).get("conditions"),
            ConditionType.READY,
            record.ready,
            reason,
            record.not_ready_message or "its files can be mounted",
            None,
            now,
        )
        path = f"/apis/{c.API_VERSION}/namespaces/{namespace}/{BY_KIND[kind].plural}/{name}/status"
        try:
            status = EntityStatus(ready=record.ready, conditions=conditions)
            await self.client.merge_patch(path, {"status": st.status_patch(status)})
        except Exception as err:
            # Display only (jobs read readiness from the claims, not from here): the next
            # event of the entity or its claim writes it again.
            if isinstance(err, ApiError) and err.status == 404:
                return
            if not is_transient(err):
                raise
            log.warning("%s %s/%s status: %s", kind, namespace, name, err)
            return
        self.entity_ready[(kind, namespace, name)] = record.ready


class _Conflict(Exception):
    pass


class _Leftover(Exception):
    """An object of the job's name left by an earlier job of the same name."""


LEFTOVER_RETRY_S = 2.0


RETRY_FIRST_S = 0.5
RETRY_MAX_S = 60.0
# A refusal (quota, admission policy) changes only when someone acts: ask less often.
REFUSED_RETRY_FIRST_S = 5.0
REFUSED_RETRY_MAX_S = 600.0
# A child without pods is looked at again this often, for a refused pod creation.
POD_CREATION_CHECK_S = 10.0


def is_transient(err: BaseException) -> bool:
    """Worth retrying: the network, a timeout, a busy or failing API server, or RBAC
    that an administrator may still grant."""
    if isinstance(err, aiohttp.ClientError | asyncio.TimeoutError):
        return True
    if not isinstance(err, ApiError):
        return False
    return err.status >= 500 or err.status == 429 or (err.status == 403 and err.refusal is None)
