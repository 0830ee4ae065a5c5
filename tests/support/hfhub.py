"""A small Hugging Face Hub-compatible HTTP server on loopback, for the fetch tests.

Only what huggingface_hub's clients call to list and download a repository, answered the
way the Hub answers (checked against huggingface_hub itself in tests/unit/test_hfhub.py):
  GET  /api/{models,datasets}/<repo>/revision/<rev>[?blobs=true]   repo info: sha, siblings
  GET  /api/{models,datasets}/<repo>/tree/<rev>?recursive=true      the file listing (snapshot_download)
  HEAD /[datasets/]<repo>/resolve/<rev>/<path>                     X-Repo-Commit, ETag, size
  GET  /[datasets/]<repo>/resolve/<rev>/<path>                     bytes; Range -> 206
Errors carry the Hub's X-Error-Code / X-Error-Message headers (RepoNotFound,
RevisionNotFound, EntryNotFound, invalid credentials), which huggingface_hub turns into its
typed errors. Every request is logged, so a test can see what a client asked for.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import sys
import threading
from array import array
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

# Files at least this big are served as LFS files (sha256 etag, X-Linked-* headers), as the Hub does.
LFS_THRESHOLD = 64 * 1024


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> path -> bytes
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> sha


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    range: str | None
    authorization: str | None


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def etag_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() if len(data) >= LFS_THRESHOLD else git_blob_id(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client killed mid-download (the resume tests do it on purpose) resets its
        # connection; that is the test working, not a server error worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class HubServer:
    """`with HubServer(tokens={"good"}) as hub: hub.add_repo(...); hub.url`"""

    def __init__(self, tokens: set[str] | None = None, host: str = "127.0.0.1") -> None:
        """`host`: the address to serve on; the e2e tier uses the real node's bridge
        address, which its pods reach."""
        self.tokens = set(tokens or ())
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[LoggedRequest] = []
        self.lock = threading.Lock()
        self.host = host
        self._server = _Server((host, 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._server.server_address[1]}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        repo_type: str = "model",
        branch: str = "main",
        private: bool = False,
    ) -> str:
        """A new commit on `branch` holding exactly `files` (creating the repo); its sha."""
        with self.lock:
            repo = self.repos.setdefault((repo_type, repo_id), Repo(repo_id, repo_type, private))
            digest = hashlib.sha1(repr((sorted((p, etag_of(d)) for p, d in files.items()), len(repo.commits))).encode())
            sha = digest.hexdigest()
            repo.commits[sha] = dict(files)
            repo.refs[branch] = sha
            return sha

    def tag(self, repo_id: str, tag: str, sha: str, *, repo_type: str = "model") -> None:
        with self.lock:
            self.repos[(repo_type, repo_id)].refs[tag] = sha

    def downloads(self, filename: str) -> list[LoggedRequest]:
        """The GETs of a file's bytes."""
        return [
            r for r in self.requests if r.method == "GET" and "/resolve/" in r.path and r.path.endswith("/" + filename)
        ]


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the log is hub.requests
            pass

        def do_GET(self) -> None:
            self._route(body=True)

        def do_HEAD(self) -> None:
            self._route(body=False)

        # --- answers ---------------------------------------------------------------------

        def _send(self, status: int, headers: dict[str, str], payload: bytes, body: bool) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)

        def _error(self, status: int, message: str, body: bool, code: str | None = None) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, headers, json.dumps({"error": message}).encode(), body)

        # --- routing ---------------------------------------------------------------------

        def _route(self, body: bool) -> None:
            url = urlsplit(self.path)
            auth = self.headers.get("Authorization")
            with hub.lock:
                hub.requests.append(LoggedRequest(self.command, url.path, self.headers.get("Range"), auth))
            token = auth.removeprefix("Bearer ").strip() if auth else None
            if token is not None and token not in hub.tokens:
                # The Hub refuses a wrong token outright, whatever the repository.
                self._error(401, "Invalid credentials in Authorization header", body)
                return
            path = url.path
            if path.startswith("/api/"):
                self._repo_info(path.removeprefix("/api/"), body)
            elif "/resolve/" in path:
                self._resolve(path.lstrip("/"), body, authorized=token is not None)
            else:
                self._error(404, "Not found", body)

        def _find(self, repo_type: str, repo_id: str, authorized: bool, body: bool) -> Repo | None:
            repo = hub.repos.get((repo_type, repo_id))
            if repo is None or (repo.private and not authorized):
                # A private repository looks missing without a token (as on the Hub).
                status = 401 if repo is not None else 404
                self._error(status, "Repository not found", body, code="RepoNotFound")
                return None
            return repo

        def _commit(self, repo: Repo, revision: str, body: bool) -> str | None:
            sha = revision if revision in repo.commits else repo.refs.get(revision)
            if sha is None:
                self._error(404, f"Invalid rev id: {revision}", body, code="RevisionNotFound")
            return sha

        def _repo_info(self, rest: str, body: bool) -> None:
            kind, _, rest = rest.partition("/")
            repo_id, sep, revision = rest.rpartition("/revision/")
            if not sep:
                self._tree(kind, rest, body)
                return
            if kind not in ("models", "datasets"):
                self._error(404, "Not found", body)
                return
            repo = self._find(kind[:-1], unquote(repo_id), self.headers.get("Authorization") is not None, body)
            if repo is None:
                return
            sha = self._commit(repo, unquote(revision), body)
            if sha is None:
                return
            siblings = []
            for name, data in sorted(repo.commits[sha].items()):
                sibling: dict[str, Any] = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
                if len(data) >= LFS_THRESHOLD:
                    sibling["lfs"] = {"sha256": etag_of(data), "size": len(data), "pointerSize": 134}
                siblings.append(sibling)
            info = {"id": repo.repo_id, "sha": sha, "private": repo.private, "siblings": siblings}
            self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)

        def _tree(self, kind: str, rest: str, body: bool) -> None:
            # <repo>/tree/<rev>: every file, as a recursive listing (one page, no Link header).
            repo_id, sep, revision = rest.rpartition("/tree/")
            if kind not in ("models", "datasets") or not sep:
                self._error(404, "Not found", body)
                return
            repo = self._find(kind[:-1], unquote(repo_id), self.headers.get("Authorization") is not None, body)
            if repo is None:
                return
            sha = self._commit(repo, unquote(revision.split("/", 1)[0]), body)
            if sha is None:
                return
            entries = []
            for name, data in sorted(repo.commits[sha].items()):
                entry: dict[str, Any] = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": name}
                if len(data) >= LFS_THRESHOLD:
                    entry["lfs"] = {"oid": etag_of(data), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            self._send(200, {"Content-Type": "application/json"}, json.dumps(entries).encode(), body)

        def _resolve(self, rest: str, body: bool, authorized: bool) -> None:
            repo_type = "model"
            if rest.startswith("datasets/"):
                repo_type, rest = "dataset", rest.removeprefix("datasets/")
            repo_id, _, tail = rest.partition("/resolve/")
            revision, _, filename = tail.partition("/")
            repo = self._find(repo_type, unquote(repo_id), authorized, body)
            if repo is None:
                return
            sha = self._commit(repo, unquote(revision), body)
            if sha is None:
                return
            data = repo.commits[sha].get(unquote(filename))
            if data is None:
                self._error(404, "Entry not found", body, code="EntryNotFound")
                return
            etag = etag_of(data)
            headers = {
                "X-Repo-Commit": sha,
                "ETag": f'"{etag}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            if len(data) >= LFS_THRESHOLD:
                headers["X-Linked-Etag"] = f'"{etag}"'
                headers["X-Linked-Size"] = str(len(data))
            wanted = self.headers.get("Range")
            if wanted and wanted.startswith("bytes="):
                first, _, last = wanted.removeprefix("bytes=").partition("-")
                start, end = int(first), int(last) if last else len(data) - 1
                if start >= len(data):
                    self._send(416, {"Content-Range": f"bytes */{len(data)}"}, b"", body)
                    return
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                self._send(206, headers, data[start : end + 1], body)
                return
            self._send(200, headers, data, body)

    return Handler


def without_hub_credentials(monkeypatch: Any, tmp_path: Any) -> dict[str, str]:
    """This machine's Hub token (HF_TOKEN, `hf auth login`) kept out of a test, in this
    process and in the environment returned for a child: the test says which token is sent."""
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    no_token = str(tmp_path / "no-hf-token")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", no_token)
    monkeypatch.setenv("HF_TOKEN_PATH", no_token)
    return {"HF_TOKEN_PATH": no_token}


# --- a tiny model, built on the fly ------------------------------------------------------


def safetensors_bytes(tensors: dict[str, tuple[list[int], bytes]]) -> bytes:
    """The safetensors format by hand (a little-endian u64 header length, a JSON header,
    the raw F32 data): the test needs a real weights file, not torch."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, data) in tensors.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(data for _, data in tensors.values())


def tiny_model_files(seed: int = 0, hidden: int = 64, vocab: int = 4096) -> dict[str, bytes]:
    """A tiny Llama-shaped checkpoint: config, generation config, weights (about 2 MB with
    the defaults, several 1 MiB download chunks) and a README."""
    rng = random.Random(seed)

    def tensor(*shape: int) -> tuple[list[int], bytes]:
        count = 1
        for n in shape:
            count *= n
        return list(shape), array("f", [rng.uniform(-0.05, 0.05) for _ in range(count)]).tobytes()

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "num_key_value_heads": 4,
        "vocab_size": vocab,
        "torch_dtype": "float32",
    }
    weights = {
        "model.embed_tokens.weight": tensor(vocab, hidden),
        "model.norm.weight": tensor(hidden),
        "lm_head.weight": tensor(vocab, hidden),
    }
    return {
        "config.json": json.dumps(config, indent=1).encode(),
        "generation_config.json": json.dumps({"max_new_tokens": 16, "seed": seed}).encode(),
        "model.safetensors": safetensors_bytes(weights),
        "README.md": f"# tiny-llama (seed {seed})\n".encode(),
    }
