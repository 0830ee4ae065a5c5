"""Leader election on a coordination.k8s.io Lease, so that `replicas: 2` is safe: one
operator works, the others wait to take over.

Why not kopf's peering: kopf pauses *all* operators of the same priority (so two equal
replicas would both stop), needs its own CRDs, and would not stop our resync loop, which
runs beside kopf's watches. A Lease is what kube-controller-manager and every
controller-runtime operator use, needs no CRD, and a candidate does nothing at all
(no watches, no cache) until it holds it.

Expiry is judged by this process's own clock: a lease is taken over when its record
has not changed for leaseDurationSeconds *as observed here* (as client-go does), so a
clock skew between replicas cannot make two leaders.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

from kubetune.controller.kubeclient import ApiError, KubeClient

log = logging.getLogger("kubetune.leader")


def _micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class LeaderElection:
    client: KubeClient
    namespace: str
    identity: str
    name: str = "kubetune-operator"
    lease_seconds: float = 15.0  # a silent leader is replaced after this long
    renew_deadline_seconds: float = 10.0  # a leader that cannot renew for this long stops
    retry_seconds: float = 2.0
    _observed: tuple[str, float] | None = field(default=None, init=False)  # (record, when first seen here)
    lost: bool = field(default=False, init=False)  # set when hold() gave the lease up

    @property
    def path(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{self.name}"

    def _spec(self, previous: dict[str, Any] | None) -> dict[str, Any]:
        now = _micro_time()
        taken = previous is None or previous.get("holderIdentity") != self.identity
        transitions = int((previous or {}).get("leaseTransitions") or 0)
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.lease_seconds),
            "acquireTime": now if taken else (previous or {}).get("acquireTime", now),
            "renewTime": now,
            "leaseTransitions": transitions + 1 if taken and previous is not None else transitions,
        }

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this process holds the lease afterwards."""
        try:
            lease = await self.client.get(self.path)
        except ApiError as err:
            if err.status != 404:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(None),
            }
            try:
                await self.client.create(body)
            except ApiError as create_err:
                if create_err.status == 409:  # another candidate was quicker
                    return False
                raise
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        record = f"{holder}/{spec.get('renewTime')}"
        now = time.monotonic()
        if self._observed is None or self._observed[0] != record:
            self._observed = (record, now)
        expired = now - self._observed[1] > float(spec.get("leaseDurationSeconds") or self.lease_seconds)
        if holder and holder != self.identity and not expired:
            return False
        lease["spec"] = self._spec(spec)
        try:
            # PUT with the resourceVersion we read: of two candidates, one wins (409 for the other).
            await self.client.replace(self.path, lease)
        except ApiError as err:
            if err.status == 409:
                return False
            raise
        return True

    async def acquire(self) -> None:
        """Wait until this process leads."""
        announced = False
        while True:
            try:
                if await self.try_acquire_or_renew():
                    log.info("%s leads (lease %s/%s)", self.identity, self.namespace, self.name)
                    return
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as err:
                log.warning("leader election: %s", err)
            if not announced:
                log.info("%s waits for lease %s/%s", self.identity, self.namespace, self.name)
                announced = True
            await asyncio.sleep(self.retry_seconds)

    async def hold(self, lost: asyncio.Event) -> None:
        """Renew until it fails for renew_deadline_seconds (or another holds it): then set `lost`."""
        last_renewed = time.monotonic()
        while True:
            await asyncio.sleep(self.retry_seconds)
            try:
                if await self.try_acquire_or_renew():
                    last_renewed = time.monotonic()
                    continue
                log.error("%s lost lease %s/%s to another holder", self.identity, self.namespace, self.name)
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as err:
                if time.monotonic() - last_renewed < self.renew_deadline_seconds:
                    log.warning("leader election: renewing failed (%s); retrying", err)
                    continue
                log.error("%s could not renew lease %s/%s: %s", self.identity, self.namespace, self.name, err)
            self.lost = True
            lost.set()
            return
