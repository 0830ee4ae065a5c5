"""The children and pods passes: the child workload (a batch Job or a PyTorchJob) and its
pods, as the watches and the resync's lists deliver them; passing `suspend` on to the
child; why a child has no pods; and the output Model a finished child leaves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from kubetune.api.resources import BY_KIND
from kubetune.controller import metrics
from kubetune.controller import status as st
from kubetune.controller.builders import (
    JobInputs,
    build_output_model,
    child_ref,
    fallback_output_model_name,
    output_model_name,
    suspend_patch,
)
from kubetune.controller.kubeclient import PLURALS, ApiError, object_path
from kubetune.controller.reconcile_state import JobKey, PodCheck, body_ref
from kubetune.controller.references import JobSpec, resolve_references
from kubetune.controller.retry import RetryPasses
from kubetune_api import constants as c

log = logging.getLogger("kubetune.operator")

# A child without pods is looked at again this often, for a refused pod creation.
POD_CREATION_CHECK_S = 10.0
POD_CREATION_CHECK_MAX_S = 160.0
# A namespace's FailedCreate Events are listed at most this often, for all its children.
FAILED_CREATE_LIST_S = 5.0


def job_key_of(child: Mapping[str, Any]) -> JobKey | None:
    """The job a child or pod belongs to, from the labels the builders put on it (an
    unknown kind label is nobody's: it would name no resource)."""
    meta = child.get("metadata") or {}
    labels = meta.get("labels") or {}
    name, kind, namespace = labels.get(c.LABEL_JOB_NAME), labels.get(c.LABEL_JOB_KIND), meta.get("namespace")
    return (kind, namespace, name) if name and kind in BY_KIND and namespace else None


class ChildPasses(RetryPasses):
    """Child and pod events, `suspend` passed on, a refused pod creation, the output Model."""

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
        name, uid = pod["metadata"]["name"], str(pod["metadata"].get("uid") or pod["metadata"]["name"])
        if deleted and key not in self.jobs:
            # The job is gone (its pods go after it): what its pods told is needed no more.
            for table, pod_key in ((self.pod_failures, uid), (self.blockers, name)):
                pods = table.get(key)
                if pods is not None:
                    pods.pop(pod_key, None)
                    if not pods:
                        del table[key]
            return
        new_failure = self._note_failure(key, uid, pod)
        blocker = None if deleted else st.pod_blocker(pod)
        pods = self.blockers.get(key) or {}
        if pods.get(name) == blocker and not new_failure:
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

    def _note_failure(self, key: JobKey, uid: str, pod: Mapping[str, Any]) -> bool:
        """Keep why the pod stopped, if it did (kept after the pod is deleted: a preempted
        pod is gone by the time its job is looked at); True when that is new."""
        failure = st.pod_failure(pod)
        known = self.pod_failures.get(key) or {}
        if failure is None or uid in known:
            return False
        # The step the trainer had reported (a failure first seen before an operator
        # restart keeps the step its listed entry has: status.with_listed_restarts).
        step = (((self.jobs.get(key) or {}).get("status") or {}).get("progress") or {}).get("step")
        known[uid] = replace(failure, step=step if isinstance(step, int) else None)
        self.pod_failures[key] = known
        metrics.POD_FAILURES.labels(key[0], failure.failure_class.value).inc()
        return True

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

    def _own_child(self, key: JobKey) -> Mapping[str, Any] | None:
        """The cached child, if it belongs to this job (not to an earlier job of the name)."""
        child = self.children.get(key)
        if child is None:
            return None
        uid = self.jobs[key]["metadata"].get("uid")
        owners = (child.get("metadata") or {}).get("ownerReferences") or []
        return child if any(o.get("uid") == uid for o in owners) else None

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
        if passed is None:
            # Made by a version that did not record it: adopt the child as it is.
            patch: dict[str, Any] = {"metadata": {"annotations": {c.ANNOTATION_SPEC_GENERATION: str(generation)}}}
        else:
            patch = suspend_patch(spec, generation)
        await self._patch_child(key, spec, patch)

    async def _patch_child(self, key: JobKey, spec: JobSpec, patch: Mapping[str, Any]) -> Mapping[str, Any]:
        """Merge-patch the job's child and keep what the API server returned as the cached
        child, with the apiVersion and kind the builders name it by (what the cache is read with)."""
        ref = child_ref(BY_KIND[key[0]], key[2], spec)
        path = object_path({**ref, "metadata": {"namespace": key[1], "name": ref["name"]}})
        patched = await self.client.merge_patch(path, patch)
        self.children[key] = {**patched, "apiVersion": ref["apiVersion"], "kind": ref["kind"]}
        return self.children[key]

    async def _creation_refusal(self, key: JobKey, child: Mapping[str, Any]) -> tuple[str, str] | None:
        """A child without pods: did its controller's pod creation get refused (a quota,
        Pod Security, a webhook)? Only its Events say so, and nothing is watched that
        changes when one is posted, so look again in POD_CREATION_CHECK_S while the
        child still has no pods."""
        uid = (child.get("metadata") or {}).get("uid")
        if not uid:
            return None
        now = time.monotonic()
        last = self._pod_checks.get(key)
        if last is not None and last.uid == uid and now < last.due:
            return last.found  # every event of the child would otherwise list Events again
        # Looked at again after 10 s, then less and less often: a burst of 1,000 jobs leaves
        # many children without pods for a while (the Job controller's own pace), and a
        # fixed 10 s made their Events LISTs most of the operator's requests.
        interval = POD_CREATION_CHECK_S if last is None or last.uid != uid else last.interval * 2
        interval = min(interval, POD_CREATION_CHECK_MAX_S)
        self._retry_later(key, interval)
        found: tuple[str, str] | None = None
        try:
            refused = await self._failed_creates_in(key[1])
        except ApiError as err:
            log.warning("%s %s/%s: cannot list the child's events: %s", *key, err)
        else:
            found = st.creation_refusal(child, refused.get(uid, []))
        self._pod_checks[key] = PodCheck(uid, now + interval, interval, found)
        return found

    async def _failed_creates_in(self, namespace: str) -> dict[str, list[Mapping[str, Any]]]:
        """The namespace's FailedCreate Events by involved object uid, listed at most every
        FAILED_CREATE_LIST_S and shared by all its pod-less children. A field selector does
        not index Events: each LIST costs the API server every Event of the namespace, so one
        LIST per child made 1,000 jobs in one namespace quadratic (the API server spent the
        burst on these LISTs and timed the operator's writes out)."""
        now = time.monotonic()
        cached = self._failed_creates.get(namespace)
        if cached is not None and now - cached[0] < FAILED_CREATE_LIST_S:
            return await asyncio.shield(cached[1])
        # Listings of namespaces no child asked about for a while go; the rest are small.
        for stale in [ns for ns, (when, _) in self._failed_creates.items() if now - when > POD_CREATION_CHECK_MAX_S]:
            del self._failed_creates[stale]
        listing = asyncio.ensure_future(self._list_failed_creates(namespace))
        self._failed_creates[namespace] = (now, listing)
        try:
            return await asyncio.shield(listing)
        except Exception:
            if self._failed_creates.get(namespace, (0.0, None))[1] is listing:
                del self._failed_creates[namespace]  # the next child asks again
            raise

    async def _list_failed_creates(self, namespace: str) -> dict[str, list[Mapping[str, Any]]]:
        events = await self.client.list(f"/api/v1/namespaces/{namespace}/events", field_selector="reason=FailedCreate")
        by_uid: dict[str, list[Mapping[str, Any]]] = {}
        for event in events.get("items") or []:
            uid = (event.get("involvedObject") or {}).get("uid")
            if uid:
                by_uid.setdefault(str(uid), []).append(event)
        return by_uid

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
                body_ref(body),
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
