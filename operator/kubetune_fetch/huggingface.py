"""A Hugging Face Hub repository as a listing: huggingface_hub speaks the Hub's protocol
(HF_ENDPOINT, the token from HF_TOKEN or the token file, the revision API, the Hub's error
codes); the bytes go through the shared transfer, which resumes partial files.

Why not `snapshot_download` for the bytes: since huggingface_hub 1.x it writes each file to a
process-unique temporary name (huggingface_hub PR #4228), so a download killed half way
starts every unfinished file again from byte 0 and leaves the old temporary behind. A 5 GB
shard cut at 4.9 GB would be fetched again in full; here it continues at 4.9 GB.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx2
from huggingface_hub import DatasetInfo, HfApi, ModelInfo, constants, get_session, hf_hub_url, hf_raise_for_status
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

# Public (huggingface_hub.utils exports them lazily at run time), but not re-exported for type checkers.
from huggingface_hub.utils import build_hf_headers, filter_repo_objects  # type: ignore[attr-defined]

from kubetune_api.entities import HuggingFaceSource
from kubetune_fetch.errors import FetchError
from kubetune_fetch.transfer import CHUNK, RemoteFile

TIMEOUT = 30.0


def _endpoint(explicit: str | None) -> str:
    # Read HF_ENDPOINT now, not when huggingface_hub was imported: a process that sets it late
    # (a test, a wrapper) still reaches the hub it names.
    return (explicit or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _error(err: Exception, where: str, source: HuggingFaceSource, endpoint: str) -> FetchError:
    """The Hub's failure, named for a person: which repository, what went wrong, what to do."""
    if isinstance(err, RevisionNotFoundError):
        return FetchError(
            "NotFound",
            f"{where}: revision {source.revision!r} does not exist (spec.source.huggingface.revision: "
            "give a branch, tag or commit of the repository)",
        )
    if isinstance(err, GatedRepoError):
        return FetchError(
            "Unauthorized",
            f"{where} is gated: accept its conditions on {endpoint} with the account whose token is in "
            "spec.source.huggingface.tokenSecret",
        )
    if isinstance(err, RepositoryNotFoundError):
        # The Hub answers 401/404 alike for a missing repository and a private one without a token.
        return FetchError(
            "NotFound",
            f"{where} was not found on {endpoint} (or it is private and no token with access was given: set "
            "spec.source.huggingface.tokenSecret; check repo and repoType)",
        )
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        if status in (401, 403):
            return FetchError(
                "Unauthorized",
                f"{where}: the Hub refused the token ({status}): the token in spec.source.huggingface.tokenSecret "
                "(or HF_TOKEN) is wrong, expired or has no read access to the repository",
            )
        if status == 404:
            return FetchError("NotFound", f"{where}: not found on {endpoint} ({err.server_message or status})")
        return FetchError("Unavailable", f"{where}: {endpoint} answered {status}; retrying later may help")
    if isinstance(err, httpx2.HTTPError):
        return FetchError("Unavailable", f"{where}: cannot reach {endpoint} ({type(err).__name__}: {err})")
    return FetchError("Unavailable", f"{where}: {type(err).__name__}: {err}")


@dataclass
class HuggingFaceListing:
    source: HuggingFaceSource
    endpoint: str
    token: str | None
    commit: str
    where: str
    files: list[RemoteFile]
    resolved: dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def open(self, file: RemoteFile, offset: int) -> Iterator[Iterator[bytes]]:
        url = hf_hub_url(
            self.source.repo, file.path, repo_type=self.source.repoType, revision=self.commit, endpoint=self.endpoint
        )
        headers = build_hf_headers(token=self.token, library_name="kubetune")
        headers["Accept-Encoding"] = "identity"  # the bytes as stored: sizes and ranges must mean the file
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            # httpx drops Authorization when a redirect leaves the Hub's host (e.g. to a CDN).
            with get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=TIMEOUT) as response:
                if response.status_code >= 400:
                    response.read()
                    hf_raise_for_status(response)
                skip = offset if offset and response.status_code == 200 else 0  # the server ignored Range
                yield _skipping(response.iter_bytes(CHUNK), skip)
        except FetchError:
            raise
        except (HfHubHTTPError, httpx2.HTTPError) as err:
            raise _error(err, f"{self.where}: {file.path}", self.source, self.endpoint) from err


def _skipping(chunks: Iterator[bytes], skip: int) -> Iterator[bytes]:
    for chunk in chunks:
        if skip >= len(chunk):
            skip -= len(chunk)
            continue
        yield chunk[skip:]
        skip = 0


def list_huggingface(
    source: HuggingFaceSource, pinned: dict[str, Any] | None, *, token: str | None, endpoint: str | None
) -> HuggingFaceListing:
    """Resolve the revision (or keep the commit an interrupted attempt resolved) and list the
    files it has that match allowPatterns, with their sizes and etags, in one API call."""
    hub = _endpoint(endpoint)
    where = f"Hugging Face {source.repoType} repository {source.repo!r}"
    revision = str(pinned["revision"]) if pinned and pinned.get("revision") else source.revision
    try:
        api = HfApi(endpoint=hub, library_name="kubetune")
        info: ModelInfo | DatasetInfo = (
            api.dataset_info(source.repo, revision=revision, files_metadata=True, token=token)
            if source.repoType == "dataset"
            else api.model_info(source.repo, revision=revision, files_metadata=True, token=token)
        )
    except Exception as err:
        raise _error(err, where, source, hub) from err
    if not info.sha or info.siblings is None:
        raise FetchError("Unavailable", f"{where}: {hub} did not say which commit {revision!r} is")
    by_name = {s.rfilename: s for s in info.siblings}
    names = list(filter_repo_objects(sorted(by_name), allow_patterns=source.allowPatterns))
    if not names:
        patterns = f" matching allowPatterns {source.allowPatterns}" if source.allowPatterns else ""
        raise FetchError(
            "NotFound",
            f"{where} at revision {source.revision!r} has no files{patterns} (spec.source.huggingface.allowPatterns)",
        )
    files = []
    for name in names:
        sibling = by_name[name]
        if sibling.size is None:
            raise FetchError("Unavailable", f"{where}: {hub} did not give the size of {name}")
        # The etag the Hub serves: the LFS sha256 for large files, the git blob id otherwise.
        etag = sibling.lfs.sha256 if sibling.lfs is not None else (sibling.blob_id or info.sha)
        files.append(RemoteFile(path=name, size=sibling.size, etag=etag))
    return HuggingFaceListing(
        source=source,
        endpoint=hub,
        token=token,
        commit=info.sha,
        where=f"{where} at revision {source.revision!r}",
        files=files,
        resolved={"revision": info.sha, "endpoint": hub},
    )
