"""What the watches know of entities, claims and volumes (the `World`), and the pure
judgements made from it: is an entity's claim there and bound, and do two claims see
the same files. No API requests here; the reconciler's entity passes (entities.py)
keep the World current.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune.controller.references import EntityRecord


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
    # The smallest GPU the nodes' feature-discovery labels name, in GB (listed at each resync).
    node_gpu_memory_gb: float | None = None

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
