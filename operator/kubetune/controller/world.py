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
from kubetune_fetch.layout import parse_source, version_name


def download_problem(
    spec: Mapping[str, Any], version: str, download: Mapping[str, Any] | None, stopped: str | None = None
) -> tuple[str, str] | None:
    """Why an entity with spec.source is not ready yet, from what its initializer reported
    in status.download (for this version only: a report of an earlier revision says nothing
    of this one) and, once its Job gave up (`stopped`: the Job's Failed message), from that;
    None once the download of this version is complete."""
    claim = spec["storage"]["pvc"]["claimName"]
    what = f"{_describe(spec)} into PersistentVolumeClaim {claim}"
    mine = download if download and download.get("version") == version else None
    if mine is not None and mine.get("phase") == "Complete":
        return None
    retry = "the initializer tries again with backoff"
    if stopped is not None:
        retry = f"its initializer Job stopped trying ({stopped}): delete that Job to try again"
    if mine is not None and mine.get("phase") == "Failed":
        reason = str(mine.get("reason") or "Unavailable")
        cause = mine.get("message") or "no message"
        return f"Download{reason}", f"downloading {what} failed ({reason}): {cause}; {retry}"
    if stopped is not None:
        # It never reported a cause: the pod could not run it (an image, a mount), see the Job's pods.
        return "InitializerFailed", f"downloading {what}: {retry}"
    if mine is None:
        return "Downloading", f"downloading {what}: waiting for its initializer Job to start"
    return "Downloading", f"downloading {what}: {mine.get('summary') or 'starting'}"


def _describe(spec: Mapping[str, Any]) -> str:
    hf, s3 = spec["source"].get("huggingface"), spec["source"].get("s3")
    if hf is not None:
        return f"{hf['repo']}@{hf.get('revision', 'main')} from the Hugging Face Hub"
    return f"s3://{s3['bucket']}/{s3.get('prefix', '')}"


def source_version(kind: str, spec: Mapping[str, Any]) -> str:
    """The directory of the entity's source version under storage.pvc.path; "" without a source."""
    raw = spec.get("source")
    return version_name(parse_source(kind, raw)) if raw else ""


def entity_record(
    kind: str,
    namespace: str,
    name: str,
    spec: Mapping[str, Any],
    pvc_phase: str | None,
    version: str = "",
    download: Mapping[str, Any] | None = None,
    stopped: str | None = None,
) -> EntityRecord:
    """An entity is ready in a cluster when its claim exists and is bound, and, with a
    spec.source, when the source's current version is downloaded."""
    pvc = (spec.get("storage") or {}).get("pvc")
    problem: tuple[str, str] | None = None
    if not pvc:
        problem = ("NoClusterStorage", "it has no spec.storage.pvc (localPath is for `kubetune run` only)")
    elif pvc_phase is None:
        problem = ("ClaimNotFound", f"PersistentVolumeClaim {pvc['claimName']} not found in namespace {namespace}")
    elif version:
        # Before ClaimNotBound: a claim that binds on first use waits for the initializer's pod.
        problem = download_problem(spec, version, download, stopped)
    elif pvc_phase != "Bound":
        problem = ("ClaimNotBound", f"PersistentVolumeClaim {pvc['claimName']} is {pvc_phase}")
    return EntityRecord.judged(kind, namespace, name, spec, problem, version)


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
    # Entities with spec.source: the source's version, and status.download as the initializer wrote it.
    versions: dict[tuple[str, str, str], str] = field(default_factory=dict)
    downloads: dict[tuple[str, str, str], Mapping[str, Any]] = field(default_factory=dict)
    # The initializer Job of the entity's current version (its name), and the initializer Jobs
    # that gave up: (namespace, Job name) -> their Failed condition's reason and message.
    initializer_names: dict[tuple[str, str, str], str] = field(default_factory=dict)
    uids: dict[tuple[str, str, str], str] = field(default_factory=dict)  # entity -> metadata.uid
    initializers_stopped: dict[tuple[str, str], str] = field(default_factory=dict)

    def downloaded_parameters(self, key: tuple[str, str, str]) -> int | None:
        """The parameter count the entity's initializer read from the weights it downloaded,
        for the source's current version only (an old version's count is not this model's)."""
        download = self.downloads.get(key) or {}
        parameters = download.get("parameters")
        current = download.get("version") == self.versions.get(key)
        return parameters if current and type(parameters) is int and parameters > 0 else None

    def backing(self, namespace: str, claim: str) -> tuple[str, ...] | None:
        """What the claim's volume stores its files on; None if unbound or not comparable."""
        volume = self.claim_volumes.get((namespace, claim))
        return self.volumes.get(volume) if volume else None

    def lookup(self, kind: str, namespace: str, name: str) -> EntityRecord | None:
        spec = self.entities.get((kind, namespace, name))
        if spec is None:
            return None
        pvc = (spec.get("storage") or {}).get("pvc") or {}
        key = (kind, namespace, name)
        return entity_record(
            kind,
            namespace,
            name,
            spec,
            self.claims.get((namespace, pvc.get("claimName", ""))),
            self.versions.get(key, ""),
            self.downloads.get(key),
            self.initializers_stopped.get((namespace, self.initializer_names.get(key, ""))),
        )


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
