"""The entity, claim and volume passes: keep the `World` (world.py) current from the
watches, write each entity's `Ready` status, make the initializer of an entity with
spec.source (initializer.py), and retry the jobs that wait on them.
Also the checks a job's start makes against the World: claims its pods cannot mount,
and an output Model name taken by something this job did not make.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from kubetune.api.resources import BY_KIND
from kubetune.controller import status as st
from kubetune.controller.builders import default_output_model_name, fallback_output_model_name
from kubetune.controller.initializer import EntityRef, build_initializer, initializer_name
from kubetune.controller.kubeclient import ApiError, object_path
from kubetune.controller.reconcile_state import JobKey
from kubetune.controller.references import EntityRecord, JobSpec, ReferenceProblem
from kubetune.controller.retry import RetryPasses, is_transient
from kubetune.controller.world import describe_backing, source_version, volume_backing
from kubetune_api import constants as c
from kubetune_api.entities import EntityStatus
from kubetune_api.status import ConditionType
from kubetune_fetch.errors import FetchError

log = logging.getLogger("kubetune.operator")

INITIALIZER_RETRY_S = 10.0  # an initializer the API server could not take (busy, quota): asked again after


def entity_message(record: EntityRecord) -> str:
    """The entity's own Ready message. While downloading, without the progress figures that
    the waiting jobs' messages carry: they are in status.download, and a condition rewritten
    on every progress report would be a status write (and a watch event) per report."""
    if record.ready:
        return "its files can be mounted"
    if record.not_ready_reason == "Downloading":
        return record.not_ready_message.rsplit(": ", 1)[0] + ": progress in status.download"
    return record.not_ready_message


class EntityPasses(RetryPasses):
    """Entity, claim and volume events; the checks against the World a job's start makes."""

    async def on_entity(self, body: Mapping[str, Any], deleted: bool) -> None:
        meta = body["metadata"]
        ekey = (body["kind"], meta["namespace"], meta["name"])
        if deleted:
            self.world.entities.pop(ekey, None)
            self.world.producers.pop((meta["namespace"], meta["name"]), None)
            self.world.versions.pop(ekey, None)
            self.world.downloads.pop(ekey, None)
            self.world.initializer_names.pop(ekey, None)
            self.world.uids.pop(ekey, None)
            self.entity_ready.pop(ekey, None)
            self.initializers.pop(ekey, None)
        else:
            spec = body.get("spec") or {}
            status = body.get("status") or {}
            self.world.entities[ekey] = spec
            self.world.uids[ekey] = str(meta.get("uid", ""))
            if body["kind"] == c.KIND_MODEL:
                producer = (meta.get("labels") or {}).get(c.LABEL_JOB_UID, "")
                self.world.producers[(meta["namespace"], meta["name"])] = producer
            self._note_source(ekey, str(meta.get("uid", "")), spec, status.get("download"))
            if status.get("ready") is not None:
                cond = st.find_condition(status.get("conditions"), ConditionType.READY) or {}
                self.entity_ready[ekey] = (
                    bool(status["ready"]),
                    str(cond.get("reason", "")),
                    str(cond.get("message", "")),
                )
            await self._write_entity_status(body["kind"], meta["namespace"], meta["name"], status)
            await self._ensure_initializer(ekey)
        await self.retry_waiting()

    def _note_source(self, ekey: tuple[str, str, str], uid: str, spec: Mapping[str, Any], download: Any) -> None:
        try:
            version = source_version(ekey[0], spec)
        except (ValidationError, FetchError) as err:
            # The CRD's schema should have refused it; the entity stays without a version (not ready).
            log.warning("%s %s/%s: spec.source: %s", *ekey, err)
            version = ""
        if version:
            self.world.versions[ekey] = version
            entity = EntityRef(kind=ekey[0], namespace=ekey[1], name=ekey[2], uid=uid, spec=spec)
            self.world.initializer_names[ekey] = initializer_name(entity)
        else:
            self.world.versions.pop(ekey, None)
            self.world.initializer_names.pop(ekey, None)
        if isinstance(download, Mapping):
            self.world.downloads[ekey] = download
        else:
            self.world.downloads.pop(ekey, None)

    async def _ensure_initializer(self, ekey: tuple[str, str, str]) -> None:
        """Create-or-get the entity's initializer (identity, then Job) while its source's
        current version is not downloaded. One Job per version, shared by every job that
        names the entity; a complete download (an operator restart, a re-created entity
        whose status says so) makes none."""
        record = self.world.lookup(*ekey)
        if record is None or not record.version or record.not_ready_reason in ("NoClusterStorage", "ClaimNotFound"):
            return
        if record.ready:
            return
        uid = self.world.uids.get(ekey, "")
        entity = EntityRef(kind=ekey[0], namespace=ekey[1], name=ekey[2], uid=uid, spec=record.spec)
        job_name = initializer_name(entity)
        if self.initializers.get(ekey) == job_name:
            return
        objects = build_initializer(entity, self.settings.initializer)
        try:
            *identity, job = objects
            await asyncio.gather(*(self._create_or_get_owned(o) for o in identity if o["kind"] != "RoleBinding"))
            await asyncio.gather(*(self._create_or_get_owned(o) for o in [*identity[2:], job]))
        except Exception as err:
            if isinstance(err, ApiError) and err.status == 404:
                return  # the namespace or the entity is gone
            if not is_transient(err) and not (isinstance(err, ApiError) and err.refusal is not None):
                raise
            # A busy API server, or a quota: ask again later (no watch event may come).
            log.warning("%s %s/%s: initializer: %s; retrying in %.0f s", *ekey, err, INITIALIZER_RETRY_S)
            asyncio.get_running_loop().call_later(
                INITIALIZER_RETRY_S, lambda: asyncio.ensure_future(self._ensure_initializer(ekey))
            )
            return
        self.initializers[ekey] = job_name
        log.info("%s %s/%s: initializer Job %s downloads %s", *ekey, job_name, record.version)

    async def on_initializer_job(self, job: Mapping[str, Any], deleted: bool) -> None:
        """An initializer Job that gave up (its retries ran out) shows on its entity and the
        jobs waiting for it; one deleted while its download is not done (by hand, to try
        again at once) is made again."""
        meta = job.get("metadata") or {}
        owner = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
        if owner is None:
            return
        namespace, name = str(meta.get("namespace")), str(meta.get("name"))
        ekey = (str(owner.get("kind")), namespace, str(owner.get("name")))
        conditions = (job.get("status") or {}).get("conditions") or []
        failed = next((x for x in conditions if x.get("type") == "Failed" and x.get("status") == "True"), None)
        stopped = None if deleted or failed is None else f"{failed.get('reason')}: {failed.get('message', '')}"
        if not deleted and stopped == self.world.initializers_stopped.get((namespace, name)):
            return
        if stopped is None:
            self.world.initializers_stopped.pop((namespace, name), None)
        else:
            self.world.initializers_stopped[(namespace, name)] = stopped
        if deleted and self.initializers.get(ekey) == name:
            del self.initializers[ekey]
            if ekey in self.world.entities:
                await self._ensure_initializer(ekey)
        if ekey in self.world.entities:
            await self._write_entity_status(*ekey, None)
            await self.retry_waiting()

    async def _create_or_get_owned(self, obj: Mapping[str, Any]) -> Mapping[str, Any]:
        try:
            return await self.client.create(obj)
        except ApiError as err:
            if err.status != 409:
                raise
        return await self.client.get(object_path(obj))

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
                await self._ensure_initializer((kind, ns, ename))  # a source waiting for its claim
        await self.retry_waiting()

    async def _write_entity_status(
        self, kind: str, namespace: str, name: str, current: Mapping[str, Any] | None
    ) -> None:
        record = self.world.lookup(kind, namespace, name)
        if record is None:
            return
        reason = "Ready" if record.ready else record.not_ready_reason
        message = entity_message(record)
        wanted = (record.ready, reason, message)
        if self.entity_ready.get((kind, namespace, name)) == wanted:
            return
        now = st.now_rfc3339()
        conditions = st.set_condition(
            (current or {}).get("conditions"), ConditionType.READY, record.ready, reason, message, None, now
        )
        path = f"/apis/{c.API_VERSION}/namespaces/{namespace}/{BY_KIND[kind].plural}/{name}/status"
        try:
            # Only ready and conditions: status.download is the initializer's to write.
            status = EntityStatus(ready=record.ready, conditions=conditions)
            await self.client.merge_patch(path, {"status": st.status_patch(status)})
        except Exception as err:
            # Display only (jobs read readiness from the World, not from here): the next
            # event of the entity or its claim writes it again.
            if isinstance(err, ApiError) and err.status == 404:
                return
            if not is_transient(err):
                raise
            log.warning("%s %s/%s status: %s", kind, namespace, name, err)
            return
        self.entity_ready[(kind, namespace, name)] = wanted

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
