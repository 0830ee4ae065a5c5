"""Where a version of a source lives on disk, and the marker that says it is complete.

Pure path and file logic (no network), so that the operator and `kubetune run` can compute
a source's directory without downloading anything (a dry run shows it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from kubetune_api.entities import FilesetSource, ModelSource
from kubetune_fetch.errors import FetchError

Source = ModelSource | FilesetSource

MARKER_SUFFIX = ".complete.json"
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
MARKER_FORMAT = 1


def parse_source(kind: str, raw: Any) -> Source:
    """An entity's `spec.source` (a mapping or its JSON) as the entity's kind reads it: a
    Fileset's Hub repository is a dataset by default, a Model's a model."""
    model = FilesetSource if kind == "Fileset" else ModelSource
    return model.model_validate_json(raw) if isinstance(raw, str | bytes) else model.model_validate(raw)


def describe_source(source: Source) -> str:
    """The source in a few words, for messages."""
    if source.huggingface is not None:
        hf = source.huggingface
        return f"Hugging Face {hf.repoType} {hf.repo}@{hf.revision}"
    if source.s3 is not None:
        return f"s3://{source.s3.bucket}/{source.s3.prefix}"
    return "nothing"


def source_identity(source: Source) -> dict[str, Any]:
    """What decides the files: the source less its credentials (a rotated Secret must not
    download again) and less the S3 region (where a bucket is, not what is in it)."""
    if source.huggingface is not None:
        hf = source.huggingface.model_dump(mode="json", exclude={"tokenSecret"})
        return {"huggingface": hf}
    if source.s3 is not None:
        s3 = source.s3.model_dump(mode="json", exclude={"credentialsSecret", "region"})
        return {"s3": s3}
    raise FetchError("Invalid", "the source names neither huggingface nor s3: give exactly one of them")


def version_name(source: Source) -> str:
    """The directory of this version of the source: readable, and new whenever the
    identity changes (a new revision, other patterns, another bucket or prefix), so that
    jobs started on the old directory keep it."""
    identity = source_identity(source)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    if source.huggingface is not None:
        revision = re.sub(r"[^A-Za-z0-9._-]", "_", source.huggingface.revision)[:40]
        return f"{revision}-{digest}"
    return f"s3-{digest}"


def cache_root(base: Path, source: Source) -> Path:
    """A per-source folder under a shared cache (`kubetune run`'s ~/.cache/kubetune/sources):
    entities naming the same repository or bucket share its versions."""
    if source.huggingface is not None:
        return base / "huggingface" / f"{source.huggingface.repoType}s" / source.huggingface.repo
    if source.s3 is not None:
        return base / "s3" / source.s3.bucket
    raise FetchError("Invalid", "the source names neither huggingface nor s3: give exactly one of them")


@dataclass(frozen=True)
class Marker:
    """The completion marker of one version: present and matching = nothing to download."""

    identity: dict[str, Any]
    resolved: dict[str, Any]  # {"revision": <commit sha>} or {"etags": {path: etag}}
    files: int
    bytes: int
    completed_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MARKER_FORMAT,
            "source": self.identity,
            "resolved": self.resolved,
            "files": self.files,
            "bytes": self.bytes,
            "completedAt": self.completed_at,
        }


def marker_path(root: Path, name: str) -> Path:
    return root / f"{name}{MARKER_SUFFIX}"


def read_marker(root: Path, source: Source) -> Marker | None:
    """The marker of this version of `source` under `root`, when it is there, readable and
    for this very source (a marker of another source, or a torn write, counts as absent)."""
    name = version_name(source)
    path = marker_path(root, name)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT:
        return None
    if data.get("source") != source_identity(source) or not (root / name).is_dir():
        return None
    return Marker(
        identity=data["source"],
        resolved=dict(data.get("resolved") or {}),
        files=int(data.get("files", 0)),
        bytes=int(data.get("bytes", 0)),
        completed_at=str(data.get("completedAt", "")),
    )


def write_json_atomically(path: Path, data: Any) -> None:
    """Write-then-rename: a reader (or a killed writer) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def safe_relative_path(name: str, where: str) -> PurePosixPath:
    """A listed file's path inside the destination; a path that would escape it (absolute,
    `..`) is refused rather than written outside the directory."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or any(part in ("..", ".", "") for part in name.split("/")):
        raise FetchError("Invalid", f"{where} lists the file {name!r}, whose path would leave the download directory")
    return path
