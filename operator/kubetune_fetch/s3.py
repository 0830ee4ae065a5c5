"""Objects under a prefix of an S3 bucket as a listing (boto3; any S3-compatible store).

The ETags of the listing are the version: the marker records them, a partial file is
continued only for the same ETag, and each ranged read asks for it (If-Match), so an object
replaced half way is never stitched from two versions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.exceptions
from botocore import UNSIGNED
from botocore.config import Config

from kubetune_api.entities import S3Source
from kubetune_fetch.errors import FetchError
from kubetune_fetch.transfer import CHUNK, RemoteFile, S3Credentials

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "401", "ExpiredToken", "InvalidToken"}


def _client(source: S3Source, credentials: S3Credentials | None) -> Any:
    session = boto3.session.Session(
        aws_access_key_id=credentials.access_key_id if credentials else None,
        aws_secret_access_key=credentials.secret_access_key if credentials else None,
        aws_session_token=credentials.session_token if credentials else None,
        region_name=source.region,
    )
    config = Config(
        retries={"mode": "standard", "max_attempts": 5},
        # Most S3-compatible stores (MinIO, Ceph) serve buckets as paths, not as DNS names.
        s3={"addressing_style": "path" if source.endpoint else "auto"},
        # No credentials anywhere: read a public bucket anonymously rather than fail to sign.
        signature_version=UNSIGNED if session.get_credentials() is None else None,
    )
    if session.region_name is None:
        config = config.merge(Config(region_name="us-east-1"))
    return session.client("s3", endpoint_url=source.endpoint, config=config)


def _error(err: Exception, where: str) -> FetchError:
    if isinstance(err, botocore.exceptions.ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return FetchError(
                "NotFound", f"{where}: the bucket does not exist (spec.source.s3.bucket; check the endpoint too)"
            )
        if code in _NOT_FOUND:
            return FetchError("NotFound", f"{where}: not found ({code})")
        if code in _DENIED or status in (401, 403):
            return FetchError(
                "Unauthorized",
                f"{where}: access denied ({code}): the keys in spec.source.s3.credentialsSecret (or the "
                "environment's AWS credentials) are wrong or may not read this bucket",
            )
        if code in ("PreconditionFailed", "412"):
            return FetchError("Unavailable", f"{where}: the object changed during the download; run again")
        return FetchError("Unavailable", f"{where}: the store answered {code or status}; retrying later may help")
    if isinstance(err, botocore.exceptions.BotoCoreError):
        return FetchError("Unavailable", f"{where}: {type(err).__name__}: {err}")
    return FetchError("Unavailable", f"{where}: {type(err).__name__}: {err}")


def _relative(key: str, prefix: str) -> str | None:
    """A key's path in the destination. A prefix names a folder (`data` and `data/` alike:
    `data-old/x` is not under it) or, when it is a whole key, that one object."""
    if not prefix:
        return key
    folder = prefix if prefix.endswith("/") else prefix + "/"
    if key.startswith(folder):
        return key[len(folder) :]
    if key == prefix:
        return key.rsplit("/", 1)[-1]
    return None


@dataclass
class S3Listing:
    client: Any
    bucket: str
    keys: dict[str, str]  # relative path -> key
    where: str
    files: list[RemoteFile]
    resolved: dict[str, Any]

    @contextmanager
    def open(self, file: RemoteFile, offset: int) -> Iterator[Iterator[bytes]]:
        key = self.keys[file.path]
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "IfMatch": file.etag}
        if offset:
            args["Range"] = f"bytes={offset}-"
        try:
            body = self.client.get_object(**args)["Body"]
        except Exception as err:
            raise _error(err, f"{self.where}: object {key}") from err
        try:
            yield _guarded(body.iter_chunks(CHUNK), f"{self.where}: object {key}")
        finally:
            body.close()


def _guarded(chunks: Iterator[bytes], where: str) -> Iterator[bytes]:
    try:
        yield from chunks
    except (botocore.exceptions.BotoCoreError, OSError) as err:
        raise _error(err, where) from err


def list_s3(source: S3Source, *, credentials: S3Credentials | None) -> S3Listing:
    """Every object under the prefix (directory placeholders `x/` aside), with size and ETag."""
    where = f"S3 bucket {source.bucket!r}" + (f" at {source.endpoint}" if source.endpoint else "")
    if source.prefix:
        where += f", prefix {source.prefix!r}"
    client = _client(source, credentials)
    files: list[RemoteFile] = []
    keys: dict[str, str] = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=source.bucket, Prefix=source.prefix):
            for obj in page.get("Contents", []):
                rel = _relative(obj["Key"], source.prefix)
                if rel is None or rel == "" or obj["Key"].endswith("/"):
                    continue
                keys[rel] = obj["Key"]
                files.append(RemoteFile(path=rel, size=int(obj["Size"]), etag=str(obj["ETag"])))
    except Exception as err:
        raise _error(err, where) from err
    if not files:
        raise FetchError(
            "NotFound", f"{where}: no objects under the prefix (spec.source.s3.prefix names a folder or one object)"
        )
    return S3Listing(
        client=client,
        bucket=source.bucket,
        keys=keys,
        where=where,
        files=files,
        resolved={"etags": {f.path: f.etag for f in files}},
    )
