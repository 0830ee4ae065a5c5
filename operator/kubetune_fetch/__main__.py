"""The initializer: `python -m kubetune_fetch`, what the operator's initializer Job runs.

Downloads one entity's `spec.source` into the mounted claim with the library, and reports
to the entity's status (`status.download`: files and bytes done of total, the rate; then
Complete with what the marker resolved, or Failed with the typed cause). The operator
reads that report and sets the entity's Ready condition; this process writes nothing else.

The source comes from the Job's arguments, not from the entity read now: the operator
pinned it when it made the Job, so a spec edited meanwhile cannot change what this Job
downloads (a new version gets its own Job). The entity is read once, to stop at once when
it is gone or no longer wants this version.

Exit codes: 0 done (or nothing to do); 1 the download failed (the Job retries it with
backoff); 2 bad arguments.

Talks to the API server with the pod's ServiceAccount token and the stdlib only, as the
trainer's progress reporter does: the identity may get and patch this entity's status, nothing more.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune_api import constants as c
from kubetune_api.entities import DownloadPhase, DownloadStatus
from kubetune_fetch.errors import FetchError
from kubetune_fetch.layout import Marker, parse_source, version_name
from kubetune_fetch.transfer import Progress, fetch_source
from kubetune_fetch.weights import safetensors_parameters

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
REPORT_EVERY_S = 2.0  # progress patches at most this often (a watch event per patch for the operator)
TIMEOUT_S = 10.0
PLURALS = {c.KIND_MODEL: "models", c.KIND_FILESET: "filesets"}


def resolved_summary(marker: Marker) -> str:
    """What the marker pinned, in a line: the commit, or the objects and a digest of their ETags."""
    if marker.resolved.get("revision"):
        return f"commit {marker.resolved['revision']}"
    etags = marker.resolved.get("etags") or {}
    digest = hashlib.sha256(json.dumps(etags, sort_keys=True).encode()).hexdigest()[:12]
    return f"{len(etags)} objects, ETags {digest}"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def download_status(
    version: str,
    phase: DownloadPhase,
    progress: Progress | None,
    *,
    resolved: str | None = None,
    reason: str | None = None,
    message: str | None = None,
) -> DownloadStatus:
    """The `status.download` this process writes; pure, for the tests."""
    status = DownloadStatus(version=version, phase=phase, updated_at=_now(), resolved=resolved)
    if progress is not None:
        status.files_done, status.files_total = progress.files_done, progress.files_total
        status.bytes_done, status.bytes_total = progress.bytes_done, progress.bytes_total
        status.bytes_per_second = round(progress.bytes_per_second, 1)
        status.summary = progress.summary[:256]
    # Set even when None: a merge patch of null clears a failure of an earlier attempt.
    status.reason = reason
    status.message = message[:4096] if message else None
    return status


@dataclass
class EntityApi:
    """The entity's status subresource, with a bearer token (stdlib urllib)."""

    url: str  # .../namespaces/<ns>/<plural>/<name>/status
    token_file: Path
    context: ssl.SSLContext | None

    @classmethod
    def connect(
        cls, kind: str, namespace: str, name: str, api_server: str | None, account: Path = SERVICE_ACCOUNT_DIR
    ) -> EntityApi:
        if api_server is None:
            host = os.environ.get("KUBERNETES_SERVICE_HOST")
            if not host:
                raise SystemExit("kubetune_fetch: not in a pod (KUBERNETES_SERVICE_HOST unset): give --api-server")
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            api_server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        ca = account / "ca.crt"
        context = None
        if api_server.startswith("https://"):
            context = ssl.create_default_context(cafile=str(ca) if ca.exists() else None)
        path = f"/apis/{c.API_VERSION}/namespaces/{namespace}/{PLURALS[kind]}/{name}/status"
        return cls(api_server.rstrip("/") + path, account / "token", context)

    def _call(self, method: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url, data=data, method=method)
        # Read on each call: the kubelet rotates a projected token file, and a download may outlast a token.
        request.add_header("Authorization", f"Bearer {self.token_file.read_text().strip()}")
        request.add_header("Accept", "application/json")
        if body is not None:
            request.add_header("Content-Type", "application/merge-patch+json")
        with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=self.context) as response:
            result: dict[str, Any] = json.loads(response.read())
            return result

    def get(self) -> dict[str, Any] | None:
        """The entity (the status subresource answers with the whole object); None when it is gone."""
        try:
            return self._call("GET")
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise

    def report(self, status: DownloadStatus) -> bool:
        """Patch status.download; a failed patch is logged, never fatal (the download matters more)."""
        patch = {"status": {"download": status.model_dump(mode="json", by_alias=True, exclude_unset=True)}}
        try:
            self._call("PATCH", patch)
            return True
        except (urllib.error.URLError, OSError, ValueError) as err:
            print(f"kubetune_fetch: status patch failed: {err}", file=sys.stderr)
            return False


class Reporter:
    """Progress callbacks to throttled status patches: the first at once, then at most one
    every REPORT_EVERY_S (the library calls back per chunk, from several threads)."""

    def __init__(self, send: Callable[[DownloadStatus], object], version: str, every: float = REPORT_EVERY_S):
        self.send, self.version, self.every = send, version, every
        self.last_sent = 0.0
        self.last: Progress | None = None
        self.lock = threading.Lock()

    def __call__(self, progress: Progress) -> None:
        self.last = progress
        now = time.monotonic()
        with self.lock:
            if now - self.last_sent < self.every:
                return
            self.last_sent = now
        self.send(download_status(self.version, "Downloading", progress))


def _credentials_note() -> str:
    given = [k for k in (c.ENV_HF_TOKEN, *c.AWS_CREDENTIAL_KEYS) if os.environ.get(k)]
    return ", ".join(given) or "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune_fetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", required=True, choices=sorted(PLURALS))
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--uid", default="", help="the entity's uid: stop when the entity of this name is another")
    parser.add_argument("--source", required=True, help="the entity's spec.source as JSON, pinned by the operator")
    parser.add_argument("--root", type=Path, default=Path(c.FETCH_MOUNT), help="where the claim is mounted")
    parser.add_argument("--api-server", help="default: the in-cluster address")
    parser.add_argument("--service-account-dir", type=Path, default=SERVICE_ACCOUNT_DIR)
    args = parser.parse_args(argv)
    try:
        source = parse_source(args.kind, args.source)
        version = version_name(source)
    except (ValueError, FetchError) as err:
        print(f"kubetune_fetch: --source: {err}", file=sys.stderr)
        return 2
    api = EntityApi.connect(args.kind, args.namespace, args.name, args.api_server, args.service_account_dir)
    where = f"{args.kind} {args.namespace}/{args.name}"

    entity = api.get()
    if entity is None or (args.uid and entity["metadata"].get("uid") != args.uid):
        print(f"kubetune_fetch: {where} is gone (or re-created): nothing to do")
        return 0
    current = (entity.get("spec") or {}).get("source")
    if current is None or version_name(parse_source(args.kind, current)) != version:
        print(f"kubetune_fetch: {where} no longer asks for version {version}: nothing to do")
        return 0

    print(f"kubetune_fetch: {where}: {version} into {args.root} (credentials: {_credentials_note()})", flush=True)
    reporter = Reporter(api.report, version)
    try:
        result = fetch_source(source, args.root, progress=reporter)
    except FetchError as err:
        print(f"kubetune_fetch: {err.reason}: {err}", file=sys.stderr)
        api.report(download_status(version, "Failed", reporter.last, reason=err.reason, message=str(err)))
        return 1
    done = Progress(result.marker.files, result.marker.files, result.marker.bytes, result.marker.bytes, 0.0)
    if reporter.last is not None and result.downloaded:
        done = Progress(
            done.files_done, done.files_total, done.bytes_done, done.bytes_total, reporter.last.bytes_per_second
        )
    what = "downloaded" if result.downloaded else "already complete (the marker matches): nothing downloaded"
    print(f"kubetune_fetch: {where}: {result.path}: {what}; {done.summary}", flush=True)
    status = download_status(version, "Complete", done, resolved=resolved_summary(result.marker))
    if args.kind == c.KIND_MODEL:
        status.parameters = safetensors_parameters(result.path)
    # The one report that must arrive: without it the entity never becomes Ready.
    for attempt in range(5):
        if api.report(status):
            return 0
        time.sleep(2**attempt)
    return 1


if __name__ == "__main__":
    sys.exit(main())
