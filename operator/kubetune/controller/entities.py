"""The entity, claim and volume passes: keep the `World` (world.py) current from the
watches, write each entity's `Ready` status, and retry the jobs that wait on them.
Also the checks a job's start makes against the World: claims its pods cannot mount,
and an output Model name taken by something this job did not make.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from kubetune.api.resources import BY_KIND
from kubetune.controller import status as st
from kubetune.controller.builders import default_output_model_name, fallback_output_model_name
from kubetune.controller.kubeclient import ApiError
from kubetune.controller.reconcile_state import JobKey
from kubetune.controller.references import EntityRecord, JobSpec, ReferenceProblem
from kubetune.controller.retry import RetryPasses, is_transient
from kubetune.controller.world import describe_backing, volume_backing
from kubetune_api import constants as c
from kubetune_api.entities import EntityStatus
from kubetune_api.status import ConditionType

log = logging.getLogger("kubetune.operator")


class EntityPasses(RetryPasses):
    """Entity, claim and volume events; the checks against the World a job's start makes."""

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
