"""The reconciler: validate → resolve → build → create-or-get → write status once.

The handlers (handlers.py) feed it watch events; it keeps no state it could not
rebuild from the API server: children have fixed names and are created with
create-or-get, and every status write is computed whole from what the job, its
entities and its child say now. So a killed operator resumes where it left off
and never makes a second child.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import aiohttp
from pydantic import ValidationError

from kubetune import constants as c
from kubetune.api.resources import BY_KIND, Resource
from kubetune.controller import status as st
from kubetune.controller.builders import (
    MAX_JOB_NAME,
    JobInputs,
    OperatorSettings,
    build_all,
    build_output_model,
    child_names,
    output_format,
    output_model_name,
    total_gpus,
)
from kubetune.controller.kubeclient import ApiError, KubeClient, object_path
from kubetune.controller.references import EntityRecord, JobSpec, ReferenceProblem, resolve_references

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

    def lookup(self, kind: str, namespace: str, name: str) -> EntityRecord | None:
        spec = self.entities.get((kind, namespace, name))
        if spec is None:
            return None
        pvc = (spec.get("storage") or {}).get("pvc") or {}
        return entity_record(kind, namespace, name, spec, self.claims.get((namespace, pvc.get("claimName", ""))))


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
        self.waiting: set[JobKey] = set()
        self.entity_ready: dict[tuple[str, str, str], bool] = {}  # what the entity's status says now
        self._locks: dict[JobKey, asyncio.Lock] = {}
        self._failures: dict[JobKey, int] = {}
        self._retries: dict[JobKey, asyncio.Task[None]] = {}

    def _lock(self, key: JobKey) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    # --- transient failures ---------------------------------------------------------------
    # A watch event is delivered once: a request that times out or meets a busy API server
    # must not lose the job. Such a pass is retried for that job alone, with backoff
    # (0.5 s doubling to 60 s), and kopf never sees the error.

    async def _guarded(self, key: JobKey, step: Callable[[], Awaitable[None]]) -> None:
        try:
            await step()
        except Exception as err:
            if not is_transient(err):
                raise
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (failures - 1))
            log.warning("%s %s/%s: %s; retrying in %.1f s", *key, err or type(err).__name__, delay)
            self._retry_later(key, delay)
        else:
            self._failures.pop(key, None)

    def _retry_later(self, key: JobKey, delay: float) -> None:
        if key in self._retries:
            return

        async def retry() -> None:
            await asyncio.sleep(delay)
            self._retries.pop(key, None)
            async with self._lock(key):
                if key in self.jobs:
                    await self._guarded(key, partial(self._full_pass, key))

        self._retries[key] = asyncio.create_task(retry())

    async def _full_pass(self, key: JobKey) -> None:
        await self._reconcile(key)
        if key in self.children and key in self.jobs:
            await self._sync_child_status(key)

    # --- jobs -------------------------------------------------------------------------

    def forget_job(self, key: JobKey) -> None:
        for table in (self.jobs, self.children, self.blockers, self._locks, self._failures):
            table.pop(key, None)
        self.waiting.discard(key)
        retry = self._retries.pop(key, None)
        if retry is not None:
            retry.cancel()

    async def on_job(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        key = (body["kind"], meta["namespace"], meta["name"])
        async with self._lock(key):
            self.jobs[key] = dict(body)
            await self._guarded(key, partial(self._reconcile, key))

    async def retry_waiting(self) -> None:
        for key in list(self.waiting):
            async with self._lock(key):
                if key in self.jobs:
                    await self._guarded(key, partial(self._reconcile, key))

    async def _write_status(self, key: JobKey, update: Mapping[str, Any]) -> None:
        body = self.jobs[key]
        current = body.get("status") or {}
        if not st.changed(current, update):
            return
        resource = BY_KIND[key[0]]
        path = f"/apis/{c.API_VERSION}/namespaces/{key[1]}/{resource.plural}/{key[2]}/status"
        try:
            written = await self.client.merge_patch(path, {"status": dict(update)})
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
        if meta.get("deletionTimestamp") or current.get("phase") in st.TERMINAL:
            self.waiting.discard(key)
            return
        resource = BY_KIND[key[0]]
        generation = meta.get("generation")
        now = st.now_rfc3339()
        try:
            spec = cast(JobSpec, resource.spec_model.model_validate(body.get("spec") or {}))
        except ValidationError as err:
            # The API server's schema should have refused this; say why instead of crash-looping.
            message = "; ".join(f"spec.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            await self._fail(key, "InvalidSpec", message, generation, now)
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
        if current.get("child"):
            await self._sync_started(key, resource, spec, generation, now)
            return

        resolution = resolve_references(spec, key[1], self.world.lookup)
        problems = list(resolution.problems) + self._claim_problems(key[1], resolution.entities)
        if problems:
            self.waiting.add(key)
            await self._write_status(key, self._pending(current, problems, generation, now))
            return
        self.waiting.discard(key)
        inputs = JobInputs(
            resource,
            key[2],
            key[1],
            meta["uid"],
            spec,
            resolution.entities,
            self.settings,
            dict(meta.get("labels") or {}),
            dict(meta.get("annotations") or {}),
        )
        *support, child = build_all(inputs)
        uid = meta["uid"]
        try:
            # Two round trips instead of five: the pod needs its ConfigMap and ServiceAccount
            # before the child exists, and a RoleBinding needs its Role first.
            await asyncio.gather(*(self._create_or_get(o, uid) for o in support if o["kind"] != "RoleBinding"))
            await asyncio.gather(
                *(self._create_or_get(o, uid) for o in [*(o for o in support if o["kind"] == "RoleBinding"), child])
            )
        except _Conflict as err:
            await self._fail(key, "ChildNameTaken", str(err), generation, now)
            return
        except ApiError as err:
            if is_transient(err):
                raise
            # The API server refused what we built (an admission webhook, a quota): say so.
            await self._fail(key, "WorkloadRejected", str(err), generation, now)
            return
        names = child_names(resource, key[2])
        child_kind = child["kind"]
        conditions = st.set_condition(
            current.get("conditions"), st.COND_REFERENCES, True, "Resolved", "every reference resolved", generation, now
        )
        conditions = st.set_condition(
            conditions, st.COND_CREATED, True, "Created", f"created {child_kind} {names.child}", generation, now
        )
        # Fold in what the child says now (just created, or already seen), so that its
        # first watch event finds nothing to change: one status write, not two.
        seen = self.children.get(key, child)
        state = st.pytorchjob_state(seen) if child_kind == "PyTorchJob" else st.batch_job_state(seen)
        blocker = next(iter(sorted((self.blockers.get(key) or {}).values())), None)
        update: dict[str, Any] = {
            **st.status_from_child({**current, "conditions": conditions}, state, generation, now, blocker),
            "observedGeneration": generation,
            "gpus": total_gpus(spec),
            "child": {"apiVersion": child["apiVersion"], "kind": child_kind, "name": names.child},
        }
        if state.phase == st.SUCCEEDED:
            update["output"] = await self._create_output_model(key)
        await self._write_status(key, update)

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
        return problems

    def _pending(
        self, current: Mapping[str, Any], problems: list[ReferenceProblem], generation: int | None, now: str
    ) -> dict[str, Any]:
        first = problems[0]
        message = "; ".join(p.message for p in problems)
        conditions = st.set_condition(
            current.get("conditions"), st.COND_REFERENCES, False, first.reason, message, generation, now
        )
        return {"phase": st.PENDING, "conditions": conditions, "observedGeneration": generation}

    async def _fail(self, key: JobKey, reason: str, message: str, generation: int | None, now: str) -> None:
        self.waiting.discard(key)
        current = self.jobs[key].get("status") or {}
        conditions = st.set_condition(current.get("conditions"), st.COND_FAILED, True, reason, message, generation, now)
        await self._write_status(
            key,
            {
                "phase": st.FAILED,
                "conditions": conditions,
                "observedGeneration": generation,
                "completionTime": current.get("completionTime") or now,
            },
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
        raise _Conflict(f"{obj['kind']} {obj['metadata']['name']} already exists and belongs to something else")

    async def _sync_started(self, key: JobKey, resource: Resource, spec: Any, generation: int | None, now: str) -> None:
        """After the child exists, only `suspend` may change: pass it on."""
        current = self.jobs[key].get("status") or {}
        if current.get("observedGeneration") == generation:
            return
        child = current["child"]
        path = object_path(
            {
                "apiVersion": child["apiVersion"],
                "kind": child["kind"],
                "metadata": {"namespace": key[1], "name": child["name"]},
            }
        )
        patch = (
            {"spec": {"runPolicy": {"suspend": spec.suspend}}}
            if child["kind"] == "PyTorchJob"
            else {"spec": {"suspend": spec.suspend}}
        )
        await self.client.merge_patch(path, patch)
        await self._write_status(key, {"observedGeneration": generation})

    # --- children and pods ------------------------------------------------------------------

    async def on_child(self, key: JobKey, child: Mapping[str, Any]) -> None:
        async with self._lock(key):
            self.children[key] = child
            if key in self.jobs:
                await self._guarded(key, partial(self._sync_child_status, key))

    async def on_pod(self, key: JobKey, pod: Mapping[str, Any], deleted: bool) -> None:
        name = pod["metadata"]["name"]
        blocker = None if deleted else st.pod_blocker(pod)
        pods = self.blockers.setdefault(key, {})
        if (pods.get(name) == blocker) or (blocker is None and name not in pods):
            return
        if blocker is None:
            pods.pop(name, None)
        else:
            pods[name] = blocker
        async with self._lock(key):
            if key in self.jobs and key in self.children:
                await self._guarded(key, partial(self._sync_child_status, key))

    async def _sync_child_status(self, key: JobKey) -> None:
        body = self.jobs[key]
        current = body.get("status") or {}
        if not current.get("child") or current.get("phase") in st.TERMINAL:
            return
        child = self.children[key]
        state = st.pytorchjob_state(child) if child.get("kind") == "PyTorchJob" else st.batch_job_state(child)
        blockers = self.blockers.get(key) or {}
        blocker = next(iter(sorted(blockers.values())), None)
        generation = body["metadata"].get("generation")
        update = st.status_from_child(current, state, generation, st.now_rfc3339(), blocker)
        if state.phase == st.SUCCEEDED:
            update["output"] = await self._create_output_model(key)
        await self._write_status(key, update)

    async def _create_output_model(self, key: JobKey) -> dict[str, str]:
        body = self.jobs[key]
        resource = BY_KIND[key[0]]
        spec = resource.spec_model.model_validate(body["spec"])
        resolution = resolve_references(spec, key[1], self.world.lookup)  # type: ignore[arg-type]
        inputs = JobInputs(
            resource,
            key[2],
            key[1],
            body["metadata"]["uid"],
            spec,  # type: ignore[arg-type]
            resolution.entities,
            self.settings,
        )
        model = build_output_model(inputs)
        try:
            await self.client.create(model)
        except ApiError as err:
            if err.status != 409:
                raise
        return {"model": output_model_name(inputs), "format": output_format(inputs.spec)}

    # --- entities and claims -----------------------------------------------------------------

    async def on_entity(self, body: Mapping[str, Any], deleted: bool) -> None:
        meta = body["metadata"]
        ekey = (body["kind"], meta["namespace"], meta["name"])
        if deleted:
            self.world.entities.pop(ekey, None)
            self.entity_ready.pop(ekey, None)
        else:
            self.world.entities[ekey] = body.get("spec") or {}
            ready = (body.get("status") or {}).get("ready")
            if ready is not None:
                self.entity_ready[ekey] = bool(ready)
            await self._write_entity_status(body["kind"], meta["namespace"], meta["name"], body.get("status"))
        await self.retry_waiting()

    async def on_claim(self, namespace: str, name: str, phase: str | None) -> None:
        if phase is None:
            self.world.claims.pop((namespace, name), None)
        else:
            self.world.claims[(namespace, name)] = phase
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
            "Ready",
            record.ready,
            reason,
            record.not_ready_message or "its files can be mounted",
            None,
            now,
        )
        path = f"/apis/{c.API_VERSION}/namespaces/{namespace}/{BY_KIND[kind].plural}/{name}/status"
        try:
            await self.client.merge_patch(path, {"status": {"ready": record.ready, "conditions": conditions}})
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


RETRY_FIRST_S = 0.5
RETRY_MAX_S = 60.0


def is_transient(err: BaseException) -> bool:
    """Worth retrying: the network, a timeout, a busy or failing API server, or RBAC
    that an administrator may still grant."""
    if isinstance(err, aiohttp.ClientError | asyncio.TimeoutError):
        return True
    return isinstance(err, ApiError) and (err.status >= 500 or err.status in (403, 429))
