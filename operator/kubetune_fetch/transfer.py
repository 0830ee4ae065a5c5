"""The download itself, the same for every kind of source: list once, then move each file
into place only when complete, keeping partial files and a journal so that a killed
download resumes (partial files are continued, finished ones are not fetched again).

A kind of source (huggingface.py, s3.py) only lists its files and opens a byte range of
one; everything about directories, resuming, progress and the marker is here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from kubetune_fetch.errors import FetchError
from kubetune_fetch.layout import (
    LOCK_SUFFIX,
    PARTIAL_SUFFIX,
    Marker,
    Source,
    marker_path,
    read_marker,
    safe_relative_path,
    source_identity,
    version_name,
    write_json_atomically,
)

CHUNK = 1 << 20
# In-process retries of one file after a network failure, each resuming from its partial file.
ATTEMPTS = 3


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative to the destination, `/`-separated
    size: int
    etag: str  # the content's version: a partial file is continued only for the same etag


class Listing(Protocol):
    """One source at one resolved version: its files and how to read them."""

    where: str  # for messages: "Hugging Face model repo a/b at revision main"
    resolved: dict[str, Any]  # what the marker records: {"revision": sha} or {"etags": {...}}
    files: list[RemoteFile]

    def open(self, file: RemoteFile, offset: int) -> AbstractContextManager[Iterator[bytes]]:
        """The file's bytes from `offset` on; raises FetchError."""
        ...


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None


@dataclass(frozen=True)
class Progress:
    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int
    bytes_per_second: float  # over this call's transfer, not counting what was already there

    @property
    def summary(self) -> str:
        return (
            f"{self.files_done}/{self.files_total} files, {_size(self.bytes_done)} of {_size(self.bytes_total)}, "
            f"{_size(self.bytes_per_second)}/s"
        )


ProgressCallback = Callable[[Progress], None]


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@dataclass(frozen=True)
class FetchResult:
    path: Path  # the directory holding the source's files
    marker: Marker
    downloaded: bool  # False when the marker was already there (nothing was fetched)
    bytes_transferred: int  # this call's network bytes (0 for a no-op)


@dataclass
class _Tracker:
    """Progress across worker threads; the callback runs under the lock, one at a time."""

    files_total: int
    bytes_total: int
    callback: ProgressCallback | None
    files_done: int = 0
    bytes_done: int = 0
    transferred: int = 0
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, *, files: int = 0, present: int = 0, transferred: int = 0) -> None:
        with self.lock:
            self.files_done += files
            self.bytes_done += present + transferred
            self.transferred += transferred
            if self.callback is not None:
                elapsed = max(time.monotonic() - self.started, 1e-6)
                self.callback(
                    Progress(
                        self.files_done, self.files_total, self.bytes_done, self.bytes_total, self.transferred / elapsed
                    )
                )


class _Journal:
    """Finished files of an interrupted download, one `etag<TAB>path` line each, appended:
    O(1) per file, and a line torn by a kill is just not trusted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.done: dict[str, str] = {}
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                etag, sep, name = line.partition("\t")
                if sep and name:
                    self.done[name] = etag

    def record(self, file: RemoteFile) -> None:
        with self.lock, self.path.open("a") as f:
            f.write(f"{file.etag}\t{file.path}\n")
            self.done[file.path] = file.etag


def _part_name(file: RemoteFile) -> str:
    # Flat, fixed-length names: a deep or long repository path cannot break the partial folder,
    # and a file whose content changed (another etag) never continues the old bytes.
    return (
        f"{hashlib.sha256(file.path.encode()).hexdigest()[:24]}.{hashlib.sha256(file.etag.encode()).hexdigest()[:12]}"
    )


def _download_one(
    listing: Listing, file: RemoteFile, dest: Path, parts: Path, journal: _Journal, tracker: _Tracker
) -> None:
    target = dest / safe_relative_path(file.path, listing.where)
    if journal.done.get(file.path) == file.etag and target.is_file() and target.stat().st_size == file.size:
        tracker.add(files=1, present=file.size)
        return
    part = parts / _part_name(file)
    have = part.stat().st_size if part.exists() else 0
    if have > file.size:  # not this file's bytes after all
        part.unlink()
        have = 0
    tracker.add(present=have)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            if have < file.size:
                with listing.open(file, have) as chunks, part.open("ab") as out:
                    for chunk in chunks:
                        out.write(chunk)
                        have += len(chunk)
                        tracker.add(transferred=len(chunk))
            else:
                part.touch()
            if have != file.size:
                raise FetchError(
                    "Unavailable",
                    f"{listing.where}: {file.path} ended after {have} of {file.size} bytes (the connection "
                    "closed early); run again to resume",
                )
            break
        except FetchError as err:
            if not err.retryable or attempt == ATTEMPTS:
                raise
            time.sleep(0.5 * 2**attempt)
            have = part.stat().st_size if part.exists() else 0
    target.parent.mkdir(parents=True, exist_ok=True)
    part.replace(target)
    journal.record(file)
    tracker.add(files=1)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as fd:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def _list(
    source: Source,
    pinned: dict[str, Any] | None,
    *,
    hf_token: str | None,
    hf_endpoint: str | None,
    s3_credentials: S3Credentials | None,
) -> Listing:
    # Imported here: a Hugging Face fetch does not need boto3, nor an S3 fetch huggingface_hub.
    if source.huggingface is not None:
        from kubetune_fetch.huggingface import list_huggingface

        return list_huggingface(source.huggingface, pinned, token=hf_token, endpoint=hf_endpoint)
    if source.s3 is not None:
        from kubetune_fetch.s3 import list_s3

        return list_s3(source.s3, credentials=s3_credentials)
    raise FetchError("Invalid", "the source names neither huggingface nor s3: give exactly one of them")


def fetch_source(
    source: Source,
    root: Path,
    *,
    progress: ProgressCallback | None = None,
    hf_token: str | None = None,
    hf_endpoint: str | None = None,
    s3_credentials: S3Credentials | None = None,
    workers: int = 4,
) -> FetchResult:
    """Download `source` into `root/<version_name(source)>`, or do nothing when its marker
    says that is already done. `hf_token` / `s3_credentials` None: the environment's
    (HF_TOKEN or the token file; AWS_* variables, ~/.aws, a pod identity, else anonymous).
    `hf_endpoint` None: HF_ENDPOINT, else huggingface.co."""
    root = Path(root)
    name = version_name(source)
    dest = root / name
    marker = read_marker(root, source)
    if marker is not None:
        return FetchResult(dest, marker, downloaded=False, bytes_transferred=0)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FetchError("Storage", f"cannot create {root}: {err}") from err
    with _exclusive(root / f"{name}{LOCK_SUFFIX}"):
        # Another process may have finished while this one waited for the lock.
        marker = read_marker(root, source)
        if marker is not None:
            return FetchResult(dest, marker, downloaded=False, bytes_transferred=0)
        state = root / f"{name}{PARTIAL_SUFFIX}"
        parts = state / "parts"
        try:
            parts.mkdir(parents=True, exist_ok=True)
            dest.mkdir(parents=True, exist_ok=True)
            return _fetch_locked(
                source,
                root,
                dest,
                state,
                progress=progress,
                hf_token=hf_token,
                hf_endpoint=hf_endpoint,
                s3_credentials=s3_credentials,
                workers=workers,
            )
        except OSError as err:
            raise FetchError("Storage", f"cannot write the download under {root}: {err}") from err


def _fetch_locked(
    source: Source,
    root: Path,
    dest: Path,
    state: Path,
    *,
    progress: ProgressCallback | None,
    hf_token: str | None,
    hf_endpoint: str | None,
    s3_credentials: S3Credentials | None,
    workers: int,
) -> FetchResult:
    # A branch is resolved once: a resumed download keeps the commit the first attempt saw.
    pinned_path = state / "resolved.json"
    pinned = json.loads(pinned_path.read_text()) if pinned_path.exists() else None
    listing = _list(source, pinned, hf_token=hf_token, hf_endpoint=hf_endpoint, s3_credentials=s3_credentials)
    if pinned is None:
        write_json_atomically(pinned_path, listing.resolved)
    for file in listing.files:
        safe_relative_path(file.path, listing.where)

    parts = state / "parts"
    wanted = {_part_name(f) for f in listing.files}
    for stale in parts.iterdir():
        if stale.name not in wanted:
            stale.unlink()
    journal = _Journal(state / "journal")
    tracker = _Tracker(len(listing.files), sum(f.size for f in listing.files), progress)
    tracker.add()  # a first report before any byte moves: the totals, and what is already there
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(listing.files)))) as pool:
        futures = [pool.submit(_download_one, listing, f, dest, parts, journal, tracker) for f in listing.files]
        errors = [e for e in (fut.exception() for fut in futures) if e is not None]
    if errors:
        raise errors[0]

    # The directory holds exactly the listing: a file left by an earlier listing of the same
    # version (an object replaced between a kill and the resume) is not part of it.
    listed = {str(safe_relative_path(f.path, listing.where)) for f in listing.files}
    for path in sorted(dest.rglob("*"), reverse=True):
        rel = path.relative_to(dest).as_posix()
        if path.is_file() and rel not in listed:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()

    marker = Marker(
        identity=source_identity(source),
        resolved=listing.resolved,
        files=len(listing.files),
        bytes=tracker.bytes_total,
        completed_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    write_json_atomically(marker_path(root, dest.name), marker.to_json())
    shutil.rmtree(state, ignore_errors=True)
    return FetchResult(dest, marker, downloaded=True, bytes_transferred=tracker.transferred)
