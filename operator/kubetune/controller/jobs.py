"""The job and status passes: validate → resolve → build → create-or-get → write status once.

A job's pass (`_reconcile`) runs for its own watch event, for an event of its child,
pods or entities (children.py, entities.py), on a retry (retry.py) and on each resync.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from datetime import UTC, datetime
from functools import partial
from typing import Any, cast

from pydantic import ValidationError

from kubetune.api.resources import BY_KIND, spec_backend
from kubetune.controller import metrics
from kubetune.controller import status as st
from kubetune.controller.builders import (
    MAX_JOB_NAME,
    JobInputs,
    build_all,
    child_ref,
    output_format,
    stop_patch,
    total_gpus,
)
from kubetune.controller.children import ChildPasses
from kubetune.controller.entities import EntityPasses
from kubetune.controller.kubeclient import ApiError, object_path
from kubetune.controller.reconcile_state import PER_JOB_TABLES, JobKey, body_ref
from kubetune.controller.references import JobSpec, ReferenceProblem, resolve_references
from kubetune.controller.resume import ResumePoint, resolve_resume
from kubetune.controller.retry import REFUSED_RETRY_FIRST_S, REFUSED_RETRY_MAX_S, is_transient
from kubetune.memory import memory_risk, smallest_labelled_gpu_gb
from kubetune_api import constants as c
from kubetune_api.status import ChildRef, Condition, JobStatus, OutputRef

log = logging.getLogger("kubetune.operator")

RESYNC_CONCURRENCY = 16  # jobs a resync passes at once (the client has 32 connections)


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
        restarts=None,
    )


class _Conflict(Exception):
    pass


class _Leftover(Exception):
    """An object of the job's name left by an earlier job of the same name."""


LEFTOVER_RETRY_S = 2.0


class _Waiting:
    """A semaphore's slot, counted in kubetune_job_starts_waiting while it is waited for."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots = slots

    async def __aenter__(self) -> None:
        metrics.STARTS_WAITING.inc()
        try:
            await self._slots.acquire()
        finally:
            metrics.STARTS_WAITING.dec()

    async def __aexit__(self, *_: object) -> None:
        self._slots.release()


class JobPasses(ChildPasses, EntityPasses):
    """Job events, the resync, and the job's pass (`_reconcile`) with its status writes."""

    # Trust: a job's status is written by the operator AND by the trainer's per-job
    # identity (progress), so nothing in it steers a request. The child's kind and name
    # come from the builders, the generation last passed on from an annotation on the
    # child, and every field but `progress` is computed whole from the child on each pass,
    # so a forged phase, condition, child or output is overwritten by the next pass (which
    # the forging write itself triggers). The one fact read from status is that a job
    # without a child finished: its child is gone (deleted by hand, a TTL) and the
    # outcome stands (docs/OPERATOR.md, "What status is trusted").

    def forget_job(self, key: JobKey) -> None:
        retry = self._retries.pop(key, None)
        if retry is not None:
            retry.cancel()
        tables = self.tables()
        for name in PER_JOB_TABLES:
            table = cast(dict[JobKey, Any] | set[JobKey], tables[name])
            if isinstance(table, set):
                table.discard(key)
            else:
                table.pop(key, None)

    async def on_job(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        key = (body["kind"], meta["namespace"], meta["name"])
        async with self._lock(key):
            known = self.jobs.get(key)
            if known is not None and known["metadata"].get("uid") != meta.get("uid"):
                self.forget_job(key)  # deleted and re-created under the same name
            self.jobs[key] = dict(body)
            await self._guarded(key, partial(self._reconcile, key))
        await self._wake_resumers(key)

    async def _wake_resumers(self, source: JobKey) -> None:
        """Jobs waiting for a checkpoint of `source` (spec.resume_from) look again: a job's
        own events (its progress listing a new checkpoint) are all that changes for them.
        On every job event (each progress report), so: nothing at all while no job waits."""
        if not self.waiting:
            return
        for key in list(self.waiting):
            if key[:2] != source[:2] or key not in self.jobs:
                continue
            spec = self._spec(key)
            if isinstance(spec, str) or spec.resume_from is None or spec.resume_from.job != source[2]:
                continue
            async with self._lock(key):
                if key in self.jobs:
                    await self._guarded(key, partial(self._reconcile, key))

    async def resync(self, namespaces: Sequence[str]) -> int:
        """Level-based pass over every job, with the children listed afresh: a watch event
        that never arrived (a dropped stream, a child finished or deleted unseen) cannot
        leave a job behind. Costs one LIST per child kind and namespace, then work in
        memory; a job whose status is right is not written. Returns the jobs passed."""
        await self._read_gpu_sizes()
        listed, kinds = await self._list_children(namespaces)
        if self.child_kinds is not None and kinds - self.child_kinds:
            # A child kind installed after the start (the training-operator's PyTorchJob CRD):
            # kopf resolves the resources it watches once, so the operator must restart.
            self.on_new_child_kind(sorted(kinds - self.child_kinds))
            return 0
        keys = list(self.jobs)
        # Several jobs at a time: a pass mostly waits on the API server (a status write, an
        # Events list for a child without pods), and one job after another made a resync
        # over 1,200 jobs take minutes while the operator started (make bench).
        lanes = asyncio.Semaphore(RESYNC_CONCURRENCY)

        async def one(key: JobKey) -> None:
            async with lanes:
                if key not in self.jobs:
                    return  # deleted during the pass: taking its lock would make the lock again
                async with self._lock(key):
                    if key not in self.jobs:
                        return
                    cached = self.children.get(key)
                    if key in listed:
                        self.children[key] = listed[key]
                    elif cached is not None and cached.get("kind") in kinds:
                        del self.children[key]  # gone, and its DELETED event was missed
                    await self._guarded(key, partial(self._reconcile, key))

        # One job's error does not stop the others' passes; the first is raised after.
        errors = [e for e in await asyncio.gather(*(one(k) for k in keys), return_exceptions=True) if e]
        if errors:
            raise errors[0]
        return len(keys)

    async def _read_gpu_sizes(self) -> None:
        """The GPU size for the memory check, from the nodes GPU feature discovery labelled
        (a LIST the server filters by label: GPU nodes only, nothing on a cluster without
        it). --gpu-memory-gb, when given, wins and nothing is listed."""
        if self.settings.gpu_memory_gb is not None:
            return
        try:
            nodes = await self.client.list("/api/v1/nodes", label_selector=c.LABEL_GPU_MEMORY_MIB)
        except ApiError as err:
            log.warning("cannot list the nodes' GPU sizes (the memory check counts GPUs only): %s", err)
            return
        self.world.node_gpu_memory_gb = smallest_labelled_gpu_gb(nodes.get("items") or [])

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
            self.post_event(body_ref(written), kind, reason, message)
        told = {(r.get("pod"), r.get("time")) for r in current.get("restarts") or []}
        for restart in update.get("restarts") or []:
            if (restart["pod"], restart["time"]) not in told:  # each once, across operator restarts too
                message = (
                    f"pod {restart['pod']} stopped: {restart['message']}; the next pod resumes from the last checkpoint"
                )
                self.post_event(body_ref(written), "Warning", restart["failureClass"], message)
        # The warning conditions, present only while they hold: an Event when one appears.
        for type_ in (st.COND_STALLED, st.COND_MEMORY_RISK):
            cond = st.find_condition(update.get("conditions"), type_)
            if cond is not None and st.find_condition(current.get("conditions"), type_) is None:
                self.post_event(body_ref(written), "Warning", type_, str(cond["message"]))

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
        resume: ResumePoint | None = None
        if spec.resume_from is not None:
            source = self.jobs.get((key[0], key[1], spec.resume_from.job))
            found = resolve_resume(spec.resume_from, key[0], key[2], source, spec_backend(spec))
            if isinstance(found, ReferenceProblem):
                problems.append(found)
            else:
                resume = found
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
            resume=resume,
        )
        *support, child = build_all(inputs)
        uid = meta["uid"]
        async with self._start_slot():
            if self.jobs.get(key, {}).get("metadata", {}).get("uid") != uid:
                return  # deleted while it waited for a slot: creating its objects would only feed the GC
            await self._create_and_report(key, spec, support, child, resume, generation, now)

    def _start_slot(self) -> AbstractAsyncContextManager[Any]:
        """One of --start-limit slots for creating a job's objects. Without a bound, a burst of
        10,000 new jobs put 10,000 starts' requests in the client's 32-connection queue, where
        the 30 s timeout (which counts the wait) fired for most of them and every pass was
        retried: 11 jobs/s and 14.7 writes per job (bench/README.md, "Scale curve"). Waiting
        here costs no timeout, and passes of running jobs (status) do not wait at all."""
        if self._start_slots is None:
            return nullcontext()
        return _Waiting(self._start_slots)

    async def _create_and_report(
        self,
        key: JobKey,
        spec: JobSpec,
        support: list[dict[str, Any]],
        child: dict[str, Any],
        resume: ResumePoint | None,
        generation: int | None,
        now: str,
    ) -> None:
        """Create-or-get the job's objects, child last, then write the status they give."""
        body = self.jobs[key]
        current, uid = body.get("status") or {}, body["metadata"]["uid"]
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
        if resume is not None and self._own_child(key) is None:
            self.post_event(
                body_ref(body), "Normal", "ResumingFrom", f"starting from {key[0]} {resume.job}'s step {resume.step}"
            )
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
            self.post_event(body_ref(self.jobs[key]), "Warning", reason, why)
        self._retry_later(key, delay)

    async def _status_from_child(self, key: JobKey, spec: JobSpec, generation: int | None, now: str) -> JobStatus:
        """Every status field but the trainer's `progress`, from the child and its pods."""
        ref = child_ref(BY_KIND[key[0]], key[2], spec)
        child = self.children[key]
        current = self.jobs[key].get("status") or {}
        failures = st.with_listed_restarts(list((self.pod_failures.get(key) or {}).values()), current.get("restarts"))
        stopped = st.stopped_at(child)
        if stopped is not None:
            # The pods its controller stops after the operator stopped the child are no restarts.
            failures = [f for f in failures if not f.time or f.time <= stopped]
        state = st.child_state(child)
        if state.phase not in st.TERMINAL:
            why = st.out_of_retries(failures, spec.retries.disruptions, spec.retries.failures)
            if why is not None:
                child = await self._stop_child(key, spec, child, why, now)
                state = st.child_state(child)
        blocker = next(iter(sorted((self.blockers.get(key) or {}).values())), None)
        if state.phase == st.PENDING and blocker is None and not st.child_has_pods(child):
            blocker = await self._creation_refusal(key, child)
        else:
            self._pod_checks.pop(key, None)
        status = st.status_from_child(
            current,
            state,
            generation,
            now,
            blocker,
            f"created {ref['kind']} {ref['name']}",
            failures,
            self._memory_risk(key, spec),
            spec_backend(spec).out_of_memory_hint,
            await self._stalled(key, spec, state.phase, current.get("progress")),
        )
        status.observed_generation = generation
        status.gpus = total_gpus(spec)
        status.child = ChildRef.model_validate(ref)
        status.output = None
        if state.phase == st.SUCCEEDED:
            status.output = OutputRef(model=await self._create_output_model(key, spec), format=output_format(spec))
        return status

    async def _stalled(self, key: JobKey, spec: JobSpec, phase: str, progress: Mapping[str, Any] | None) -> str | None:
        """Why the running trainer counts as stalled, or None; while it does not yet, look
        again when it would (nothing else happens to a hung trainer's job to look)."""
        if phase != st.RUNNING:
            return None
        why, due = st.stall(progress, spec.stall_timeout_seconds, datetime.now(UTC))
        if due is not None:
            self._retry_later(key, due + 1)
        if why is not None and spec.restart_stalled and progress is not None:
            evicted = await self._evict_stalled(key, str(progress.get("updatedAt")))
            if evicted:
                why += f"; evicted {', '.join(evicted)} to resume from the last checkpoint (spec.restart_stalled)"
        return why

    async def _evict_stalled(self, key: JobKey, last_report: str) -> list[str]:
        """spec.restart_stalled: evict the pods that were there at the last progress report
        (through the Eviction API, so a PodDisruptionBudget is honoured and the pods are
        classed Preempted); their controller makes new ones, which resume."""
        selector = f"{c.LABEL_JOB_NAME}={key[2]},{c.LABEL_JOB_KIND}={key[0]}"
        pods = await self.client.list(f"/api/v1/namespaces/{key[1]}/pods", label_selector=selector)
        evicted = []
        for name in st.stalled_pods(pods.get("items") or [], last_report):
            eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": key[1]}}
            try:
                await self.client.request(
                    "POST", f"/api/v1/namespaces/{key[1]}/pods/{name}/eviction", eviction, "application/json"
                )
            except ApiError as err:
                if err.status in (404, 429):  # gone already; a disruption budget says not now (next pass)
                    continue
                raise
            evicted.append(name)
        if evicted:
            self.post_event(
                body_ref(self.jobs[key]),
                "Warning",
                "StalledRestart",
                f"evicted {', '.join(evicted)}: no progress report since {last_report}",
            )
        return evicted

    async def _stop_child(
        self, key: JobKey, spec: JobSpec, child: Mapping[str, Any], why: str, now: str
    ) -> Mapping[str, Any]:
        """Out of retries: stop the child (its failed pods and their logs stay) and say why
        on the child itself, where the job's outcome is computed from from now on."""
        child = await self._patch_child(key, spec, stop_patch(spec, why, now))
        log.info("%s %s/%s: stopped: %s", *key, why)
        return child

    def _memory_risk(self, key: JobKey, spec: JobSpec) -> str | None:
        """Why the job asks for less GPU memory than the seed's guideline for its model's
        size (the Model's spec.parameters) and method; None when it does not, or cannot be told."""
        meta = self.jobs[key]["metadata"]
        gb_per_gpu = self.settings.gpu_memory_gb or self.world.node_gpu_memory_gb
        stamp = (meta.get("uid"), meta.get("generation"), gb_per_gpu)
        cached = self._memory_risks.get(key)
        if cached is not None and cached[0] == stamp:
            # Decided once per spec generation and GPU size: resolving every reference again on each
            # status pass (each pod event) cost more than the check, and a pre-flight
            # check need not follow a Model edited after its job started.
            return cached[1]
        model = resolve_references(spec, key[1], self.world.lookup).entities.get("model")
        parameters = None
        if model is not None:
            parameters = model.spec.get("parameters") or self.world.downloaded_parameters(
                (model.kind, model.namespace, model.name)
            )
        risk = memory_risk(
            parameters if isinstance(parameters, int) else None,
            spec_backend(spec).memory_method(spec),
            total_gpus(spec),
            gb_per_gpu,
        )
        self._memory_risks[key] = (stamp, risk)
        return risk

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
