"""A small JSON client for the Kubernetes API: the few verbs the operator uses,
on aiohttp (which kopf already brings), with kopf's own credential discovery
(kubeconfig or in-cluster service account). Its user agent names kubetune, so
the API server's metrics can count the operator's requests apart from kopf's."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import ssl
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

from kubetune import __version__
from kubetune.api.resources import RESOURCES
from kubetune.controller import metrics
from kubetune_api import constants as c

USER_AGENT = f"{c.FIELD_MANAGER}/{__version__}"
SA_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


class ApiError(Exception):
    def __init__(self, status: int, body: Mapping[str, Any], method: str, path: str) -> None:
        self.status = status
        self.body = body
        self.reason = str(body.get("reason", ""))
        self.message = str(body.get("message", body))
        super().__init__(f"{method} {path}: {status} {self.message}")

    @property
    def refusal(self) -> str | None:
        """Why the API server refused the request on purpose, as a condition reason:
        QuotaExceeded (a ResourceQuota), AdmissionRefused (a webhook or an admission
        policy). None for anything else, an RBAC 403 included: that is the operator's
        own missing permission, which an admin may still grant."""
        if self.status != 403:
            return None
        text = self.message
        if "exceeded quota" in text:
            return "QuotaExceeded"
        if "admission webhook" in text or "ValidatingAdmissionPolicy" in text or "denied request" in text:
            return "AdmissionRefused"
        return None


def _write_temp(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    with contextlib.suppress(ValueError):  # kubeconfig *-data fields are base64; paths' contents are not
        raw = base64.b64decode(raw, validate=True)
    fd, path = tempfile.mkstemp(prefix="kubetune-", suffix=".pem")
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    return path


def without_managed_fields(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A shallow copy of an object without metadata.managedFields, as the reconciler keeps it.

    managedFields is the API server's server-side-apply bookkeeping, a third to half of a
    child Job's JSON, and nothing the reconciler decides reads it (the watch-lag metric
    reads it from the watch event, before this). Dropping it lowered the operator's peak
    at 1,000 jobs from 278 to 255 MB (bench/README.md). Objects sent back with PUT keep the server's
    managedFields: an update that omits the field leaves it as it is."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or "managedFields" not in meta:
        return dict(obj)
    return {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}


def _slim(data: dict[str, Any]) -> dict[str, Any]:
    if isinstance(data.get("items"), list):
        data["items"] = [without_managed_fields(i) if isinstance(i, Mapping) else i for i in data["items"]]
        return data
    return without_managed_fields(data)


def collection_path(api_version: str, plural: str, namespace: str) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{plural}"


PLURALS = {
    "ConfigMap": "configmaps",
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Job": "jobs",
    "PyTorchJob": "pytorchjobs",
    "Lease": "leases",
    # The kubetune kinds, from their table.
    **{r.kind: r.plural for r in RESOURCES},
}


def object_path(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{collection_path(obj['apiVersion'], PLURALS[obj['kind']], meta['namespace'])}/{meta['name']}"


class KubeClient:
    def __init__(self, server: str, ssl_context: ssl.SSLContext | bool, token: str | None, token_file: str | None):
        self.server = server.rstrip("/")
        self._ssl = ssl_context
        self._token = token
        self._token_file = token_file
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_environment(cls) -> KubeClient:
        settings = kopf.OperatorSettings()
        info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
        if info is None:
            raise RuntimeError("no Kubernetes credentials: set KUBECONFIG, or run in a pod with a service account")
        context: ssl.SSLContext | bool
        if info.insecure:
            context = False
        else:
            context = ssl.create_default_context(
                cafile=info.ca_path,
                cadata=base64.b64decode(info.ca_data).decode() if info.ca_data else None,
            )
            cert = info.certificate_path or (_write_temp(info.certificate_data) if info.certificate_data else None)
            key = info.private_key_path or (_write_temp(info.private_key_data) if info.private_key_data else None)
            if cert and key:
                context.load_cert_chain(cert, key)
        server = info.server
        in_cluster = os.path.exists(SA_TOKEN) and server == "https://kubernetes.default.svc"
        if in_cluster and os.environ.get("KUBERNETES_SERVICE_HOST"):
            server = (
                f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ.get('KUBERNETES_SERVICE_PORT', '443')}"
            )
        # Bound service-account tokens rotate: re-read the file instead of caching it.
        return cls(server, context, None if in_cluster else info.token, SA_TOKEN if in_cluster else None)

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        token = self._token
        if self._token_file:
            with open(self._token_file, encoding="utf-8") as f:
                token = f.read().strip()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=32),
                # The 30 s include the wait for one of these 32 connections, on purpose: under
                # overload a request sheds (its pass is retried with backoff) instead of the
                # queue growing without bound behind slow requests. Tried without it: make
                # bench's 1,000 jobs at once ran at 7.6 jobs/s with a 39 s status p99 on a
                # loaded machine (a clean A/B is for the performance issue).
                timeout=aiohttp.ClientTimeout(total=30),
            )
        started = time.monotonic()
        code = "error"  # no answer: a connection error or a timeout
        try:
            async with self._session.request(
                method,
                self.server + path,
                json=body,
                params=params,
                headers=self._headers(content_type if body is not None else None),
            ) as response:
                code = str(response.status)
                text = await response.text()
        finally:
            metrics.API_SECONDS.labels(method, code).observe(time.monotonic() - started)
        try:
            data = json.loads(text) if text else {}
        except ValueError:
            # A proxy, a load balancer or a webhook may answer in plain text or HTML:
            # that is an API error with that text, not a crash of the pass.
            if response.status < 400:
                raise ApiError(response.status, {"message": f"not JSON: {text[:200]}"}, method, path) from None
            data = {"message": text[:500]}
        if response.status >= 400:
            raise ApiError(response.status, data if isinstance(data, dict) else {"message": data}, method, path)
        return _slim(data) if isinstance(data, dict) else {}

    async def get(self, path: str) -> dict[str, Any]:
        return await self.request("GET", path)

    async def list(
        self, path: str, label_selector: str | None = None, field_selector: str | None = None
    ) -> dict[str, Any]:
        params = {"labelSelector": label_selector, "fieldSelector": field_selector}
        return await self.request("GET", path, params={k: v for k, v in params.items() if v} or None)

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        path = collection_path(obj["apiVersion"], PLURALS[obj["kind"]], meta["namespace"])
        return await self.request("POST", path, obj, "application/json", params={"fieldManager": c.FIELD_MANAGER})

    async def replace(self, path: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """PUT: refused with 409 when obj's metadata.resourceVersion is no longer current."""
        return await self.request("PUT", path, obj, "application/json", params={"fieldManager": c.FIELD_MANAGER})

    async def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request(
            "PATCH", path, patch, "application/merge-patch+json", params={"fieldManager": c.FIELD_MANAGER}
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
