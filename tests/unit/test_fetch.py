"""kubetune_fetch against real protocol servers on loopback: a Hub-compatible server
(tests/support/hfhub.py) and moto's S3 server, both started here. A download is killed with
SIGKILL in a child process, as a pod would be, and resumed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from huggingface_hub import snapshot_download
from moto.server import ThreadedMotoServer

from kubetune_api.entities import FilesetSource, ModelSource
from kubetune_fetch import FetchError, Progress, S3Credentials, fetch_source, read_marker, version_name
from kubetune_fetch.layout import safe_relative_path
from support.hfhub import HubServer, tiny_model_files, without_hub_credentials

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_test_token"
CREDENTIALS = S3Credentials("kubetune-test", "kubetune-test-secret")
BUCKET = "kubetune-data"


@pytest.fixture(autouse=True)
def _no_hub_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    without_hub_credentials(monkeypatch, tmp_path_factory.mktemp("hf"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def model_files() -> dict[str, bytes]:
    return tiny_model_files(seed=1)


@pytest.fixture
def hub(model_files: dict[str, bytes]) -> Iterator[HubServer]:
    with HubServer(tokens={TOKEN}) as server:
        server.commit("org/tiny", model_files)
        yield server


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, model_files: dict[str, bytes], request: pytest.FixtureRequest) -> dict[str, bytes]:
    """A fresh bucket per test holding a dataset and the tiny model; returns key -> bytes."""
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=CREDENTIALS.access_key_id,
        aws_secret_access_key=CREDENTIALS.secret_access_key,
    )
    name = f"{BUCKET}-{hashlib.sha1(request.node.name.encode()).hexdigest()[:8]}"
    client.create_bucket(Bucket=name)
    objects = {
        "sets/chat/train.jsonl": b'{"messages": [{"role": "user", "content": "hi"}]}\n' * 50,
        "sets/chat/validation.jsonl": b'{"messages": [{"role": "user", "content": "yo"}]}\n' * 5,
        "sets/chat-old/train.jsonl": b"{}\n",  # beside the prefix, not under it
        **{f"models/tiny/{k}": v for k, v in model_files.items()},
    }
    for key, data in objects.items():
        client.put_object(Bucket=name, Key=key, Body=data)
    request.node.bucket_name = name
    return objects


def hf_source(**fields: Any) -> ModelSource:
    return ModelSource.model_validate({"huggingface": {"repo": "org/tiny", **fields}})


def s3_source(bucket: str, endpoint: str, prefix: str, **fields: Any) -> FilesetSource:
    return FilesetSource.model_validate({"s3": {"bucket": bucket, "prefix": prefix, "endpoint": endpoint, **fields}})


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --- the test server is what huggingface_hub expects -----------------------------------------


def test_hub_server_serves_what_snapshot_download_expects(
    hub: HubServer, model_files: dict[str, bytes], tmp_path: Path
) -> None:
    """The stand-in Hub is checked against the real client, so the tests below test the
    fetcher against the Hub protocol and not against the server's own idea of it."""
    folder = snapshot_download("org/tiny", local_dir=tmp_path / "snap", endpoint=hub.url, token=False)
    got = {k: v for k, v in tree(Path(folder)).items() if not k.startswith(".cache/")}
    assert got == model_files


# --- Hugging Face --------------------------------------------------------------------------


def test_huggingface_download_lands_the_files_with_marker_and_progress(
    hub: HubServer, model_files: dict[str, bytes], tmp_path: Path
) -> None:
    reports: list[Progress] = []
    result = fetch_source(hf_source(), tmp_path, hf_endpoint=hub.url, progress=reports.append)
    assert result.downloaded and result.path == tmp_path / version_name(hf_source())
    assert tree(result.path) == model_files  # the files and nothing else (no marker, no partials)
    sha = hub.repos[("model", "org/tiny")].refs["main"]
    assert result.marker.resolved["revision"] == sha
    assert read_marker(tmp_path, hf_source()) == result.marker
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [result.path.name, f"{result.path.name}.complete.json", f"{result.path.name}.lock"]
    )
    total = sum(len(v) for v in model_files.values())
    assert (reports[0].files_done, reports[0].files_total, reports[0].bytes_done) == (0, 4, 0)
    last = reports[-1]
    assert (last.files_done, last.files_total, last.bytes_done, last.bytes_total) == (4, 4, total, total)
    assert last.bytes_per_second > 0 and "4/4 files" in last.summary
    assert result.bytes_transferred == total


def test_second_fetch_does_nothing(hub: HubServer, tmp_path: Path) -> None:
    first = fetch_source(hf_source(), tmp_path, hf_endpoint=hub.url)
    asked = len(hub.requests)
    hub.commit("org/tiny", {"config.json": b"{}"})  # main moves on: the download keeps its commit
    again = fetch_source(hf_source(), tmp_path, hf_endpoint=hub.url)
    assert not again.downloaded and again.bytes_transferred == 0
    assert again.marker == first.marker and again.path == first.path
    assert len(hub.requests) == asked  # not even a request: a re-created entity costs nothing


def test_revision_change_downloads_into_a_new_directory(
    hub: HubServer, model_files: dict[str, bytes], tmp_path: Path
) -> None:
    v1 = hub.repos[("model", "org/tiny")].refs["main"]
    hub.tag("org/tiny", "v1", v1)
    updated = {**model_files, "config.json": b'{"model_type": "llama", "note": "v2"}'}
    v2 = hub.commit("org/tiny", updated)
    old = fetch_source(hf_source(revision="v1"), tmp_path, hf_endpoint=hub.url)
    new = fetch_source(hf_source(revision=v2), tmp_path, hf_endpoint=hub.url)
    assert old.path != new.path and old.path.name.startswith("v1-") and new.path.name.startswith(v2)
    assert (old.marker.resolved["revision"], new.marker.resolved["revision"]) == (v1, v2)
    assert tree(old.path) == model_files  # jobs started on the old directory keep it
    assert tree(new.path) == updated


def test_allow_patterns_select_files(hub: HubServer, tmp_path: Path) -> None:
    result = fetch_source(hf_source(allowPatterns=["*.json"]), tmp_path, hf_endpoint=hub.url)
    assert sorted(tree(result.path)) == ["config.json", "generation_config.json"]
    with pytest.raises(FetchError, match=r"has no files matching allowPatterns \['\*\.gguf'\]") as info:
        fetch_source(hf_source(allowPatterns=["*.gguf"]), tmp_path, hf_endpoint=hub.url)
    assert info.value.reason == "NotFound"


def test_dataset_repository_for_a_fileset(hub: HubServer, tmp_path: Path) -> None:
    data = {"train.jsonl": b'{"text": "a"}\n', "README.md": b"# chat\n"}
    hub.commit("org/chat", data, repo_type="dataset")
    source = FilesetSource.model_validate({"huggingface": {"repo": "org/chat"}})  # a Fileset's default: dataset
    assert tree(fetch_source(source, tmp_path, hf_endpoint=hub.url).path) == data
    assert any(r.path.startswith("/datasets/org/chat/resolve/") for r in hub.requests)


def test_private_repository_needs_the_token(hub: HubServer, model_files: dict[str, bytes], tmp_path: Path) -> None:
    hub.commit("org/secret", model_files, private=True)
    source = ModelSource.model_validate({"huggingface": {"repo": "org/secret"}})
    with pytest.raises(FetchError, match=r"'org/secret' was not found on .*tokenSecret") as info:
        fetch_source(source, tmp_path, hf_endpoint=hub.url)
    assert info.value.reason == "NotFound"
    result = fetch_source(source, tmp_path, hf_endpoint=hub.url, hf_token=TOKEN)
    assert tree(result.path) == model_files
    assert {r.authorization for r in hub.requests if "org/secret/resolve" in r.path} == {f"Bearer {TOKEN}"}


def test_wrong_token_is_refused_naming_the_secret(hub: HubServer, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"refused the token \(401\).*tokenSecret") as info:
        fetch_source(hf_source(), tmp_path, hf_endpoint=hub.url, hf_token="hf_wrong")
    assert info.value.reason == "Unauthorized" and not info.value.retryable
    assert read_marker(tmp_path, hf_source()) is None


def test_missing_repository_and_revision_are_named(hub: HubServer, tmp_path: Path) -> None:
    missing = ModelSource.model_validate({"huggingface": {"repo": "org/nope"}})
    with pytest.raises(FetchError, match=r"Hugging Face model repository 'org/nope' was not found") as info:
        fetch_source(missing, tmp_path, hf_endpoint=hub.url)
    assert info.value.reason == "NotFound"
    with pytest.raises(FetchError, match=r"revision 'v9' does not exist \(spec.source.huggingface.revision"):
        fetch_source(hf_source(revision="v9"), tmp_path, hf_endpoint=hub.url)


def test_unreachable_hub_is_retryable(tmp_path: Path) -> None:
    from localcluster import free_port

    with pytest.raises(FetchError, match=r"cannot reach http://127.0.0.1") as info:
        fetch_source(hf_source(), tmp_path, hf_endpoint=f"http://127.0.0.1:{free_port()}")
    assert info.value.reason == "Unavailable" and info.value.retryable


# --- killed half way, resumed ------------------------------------------------------------------

# A child process that downloads one file at a time and SIGKILLs itself after the first
# chunk of the last (largest) file is on disk: the earlier files are finished, one is partial.
KILLER = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    from kubetune_api.entities import FilesetSource, ModelSource
    from kubetune_fetch import S3Credentials, fetch_source

    kind, source, root, small = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    model = ModelSource if kind == "model" else FilesetSource

    def progress(p):
        if p.files_done == p.files_total - 1 and p.bytes_done > small:
            os.kill(os.getpid(), signal.SIGKILL)

    credentials = S3Credentials("kubetune-test", "kubetune-test-secret")
    fetch_source(model.model_validate(source), root, progress=progress, workers=1, s3_credentials=credentials)
    """
)


def kill_half_way(kind: str, source: dict[str, Any], root: Path, small: int, env: dict[str, str]) -> None:
    python_path = os.pathsep.join([str(ROOT / "operator"), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", KILLER, kind, json.dumps(source), str(root), str(small)],
        env={**os.environ, **env, "PYTHONPATH": python_path},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == -9, done.stderr  # killed, not finished or failed


def partial_bytes(root: Path) -> int:
    parts = [p for p in root.glob("*.partial/parts/*") if p.is_file()]
    assert len(parts) == 1, parts
    return parts[0].stat().st_size


def test_huggingface_download_killed_half_way_resumes(
    hub: HubServer, model_files: dict[str, bytes], tmp_path: Path
) -> None:
    source = {"huggingface": {"repo": "org/tiny"}}
    small = sum(len(v) for k, v in model_files.items() if k != "model.safetensors")
    # HF_ENDPOINT in the environment, as the initializer pod will have it: no endpoint argument.
    kill_half_way("model", source, tmp_path, small, {"HF_ENDPOINT": hub.url})
    assert read_marker(tmp_path, hf_source()) is None
    have = partial_bytes(tmp_path)
    assert 0 < have < len(model_files["model.safetensors"])

    result = fetch_source(hf_source(), tmp_path, hf_endpoint=hub.url)
    assert tree(result.path) == model_files
    assert result.bytes_transferred == len(model_files["model.safetensors"]) - have
    # The partial file was continued from where it stopped, the finished ones not fetched again.
    assert [r.range for r in hub.downloads("model.safetensors")] == [None, f"bytes={have}-"]
    assert len(hub.downloads("config.json")) == 1
    assert not list(tmp_path.glob("*.partial"))


def test_s3_download_killed_half_way_resumes(
    bucket: dict[str, bytes], s3_endpoint: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    name = request.node.bucket_name
    source = {"s3": {"bucket": name, "prefix": "models/tiny/", "endpoint": s3_endpoint}}
    files = {k.removeprefix("models/tiny/"): v for k, v in bucket.items() if k.startswith("models/tiny/")}
    big = max(files, key=lambda k: len(files[k]))
    # One file at a time in key order, the biggest last: the others finish before the kill.
    assert sorted(files)[-1] == big
    small = sum(len(v) for k, v in files.items() if k != big)
    kill_half_way("fileset", source, tmp_path, small, {})
    src = FilesetSource.model_validate(source)
    assert read_marker(tmp_path, src) is None
    have = partial_bytes(tmp_path)
    assert 0 < have < len(files[big])

    result = fetch_source(src, tmp_path, s3_credentials=CREDENTIALS)
    assert tree(result.path) == files
    # The partial file was continued, the finished ones not fetched again.
    assert result.bytes_transferred == len(files[big]) - have
    assert result.marker.resolved["etags"].keys() == files.keys()


# --- S3 -------------------------------------------------------------------------------------------


def test_s3_download_no_op_and_prefix_as_folder(
    bucket: dict[str, bytes], s3_endpoint: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    name = request.node.bucket_name
    for prefix in ("sets/chat", "sets/chat/"):
        source = s3_source(name, s3_endpoint, prefix)
        result = fetch_source(source, tmp_path / prefix.replace("/", "_"), s3_credentials=CREDENTIALS)
        assert tree(result.path) == {
            "train.jsonl": bucket["sets/chat/train.jsonl"],
            "validation.jsonl": bucket["sets/chat/validation.jsonl"],
        }
        assert set(result.marker.resolved["etags"]) == {"train.jsonl", "validation.jsonl"}
        again = fetch_source(source, tmp_path / prefix.replace("/", "_"), s3_credentials=CREDENTIALS)
        assert not again.downloaded and again.bytes_transferred == 0
    one = fetch_source(
        s3_source(name, s3_endpoint, "sets/chat/train.jsonl"), tmp_path / "one", s3_credentials=CREDENTIALS
    )
    assert tree(one.path) == {"train.jsonl": bucket["sets/chat/train.jsonl"]}


def test_missing_bucket_and_empty_prefix_are_named(
    bucket: dict[str, bytes], s3_endpoint: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    with pytest.raises(FetchError, match=r"S3 bucket 'no-such-bucket' .*the bucket does not exist") as info:
        fetch_source(s3_source("no-such-bucket", s3_endpoint, ""), tmp_path, s3_credentials=CREDENTIALS)
    assert info.value.reason == "NotFound"
    with pytest.raises(FetchError, match=r"prefix 'sets/none/': no objects under the prefix") as info:
        fetch_source(
            s3_source(request.node.bucket_name, s3_endpoint, "sets/none/"), tmp_path, s3_credentials=CREDENTIALS
        )
    assert info.value.reason == "NotFound"


# --- layout ------------------------------------------------------------------------------------------


def test_version_directory_follows_what_decides_the_files() -> None:
    base = version_name(hf_source())
    assert version_name(hf_source(revision="v2")) != base
    assert version_name(hf_source(allowPatterns=["*.json"])) != base
    assert version_name(hf_source(tokenSecret={"name": "hf"})) == base  # a rotated Secret downloads nothing
    s3 = version_name(s3_source("b", "http://x:1", "p/"))
    assert version_name(s3_source("b", "http://x:1", "q/")) != s3
    assert version_name(s3_source("b", "http://x:1", "p/", region="eu-west-1", credentialsSecret={"name": "k"})) == s3


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "a//b", "./a", ""])
def test_a_listed_path_cannot_leave_the_directory(name: str) -> None:
    with pytest.raises(FetchError, match="would leave the download directory") as info:
        safe_relative_path(name, "S3 bucket 'b'")
    assert info.value.reason == "Invalid"
