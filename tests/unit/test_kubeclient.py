"""The operator's API client against a real HTTP server on loopback: an error answered
in plain text (a proxy, a load balancer, a webhook) is an ApiError naming the status
and the text, not a crash of the pass."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from kubetune.controller.kubeclient import ApiError, KubeClient, without_managed_fields
from kubetune.controller.retry import is_transient


async def _serve_and_call(status: int, body: str, content_type: str) -> ApiError | dict[str, object]:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(status=status, text=body, content_type=content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    client = KubeClient(f"http://127.0.0.1:{port}", False, "token", None)
    try:
        return await client.get("/api/v1/namespaces/x/configmaps/y")
    except ApiError as err:
        return err
    finally:
        await client.close()
        await runner.cleanup()


@pytest.mark.parametrize(
    ("status", "transient"), [(502, True), (403, True), (422, False)], ids=["bad-gateway", "forbidden", "invalid"]
)
def test_plain_text_error_is_an_api_error(status: int, transient: bool) -> None:
    result = asyncio.run(_serve_and_call(status, "<html>upstream went away</html>", "text/html"))
    assert isinstance(result, ApiError), result
    assert result.status == status and "upstream went away" in str(result)
    assert is_transient(result) is transient


def test_json_answer_still_decodes() -> None:
    result = asyncio.run(_serve_and_call(200, '{"kind": "ConfigMap"}', "application/json"))
    assert result == {"kind": "ConfigMap"}


@pytest.mark.parametrize(
    ("message", "refusal", "transient"),
    [
        ('jobs.batch "x" is forbidden: exceeded quota: q, requested: count/jobs.batch=1', "QuotaExceeded", False),
        ('admission webhook "v.example.com" denied the request: no', "AdmissionRefused", False),
        (
            "jobs.batch is forbidden: ValidatingAdmissionPolicy 'p' with binding 'b' denied request",
            "AdmissionRefused",
            False,
        ),
        ('jobs.batch is forbidden: User "system:serviceaccount:k:o" cannot create resource "jobs"', None, True),
    ],
    ids=["quota", "webhook", "policy", "rbac"],
)
def test_a_refusal_is_told_apart_from_missing_rbac(message: str, refusal: str | None, transient: bool) -> None:
    err = ApiError(403, {"reason": "Forbidden", "message": message}, "POST", "/apis/batch/v1/namespaces/n/jobs")
    assert err.refusal == refusal
    assert is_transient(err) is transient


def test_answers_come_back_without_managed_fields() -> None:
    """What the reconciler caches from an answer carries no managedFields (a single object
    and each item of a list); everything else is kept."""
    managed = [{"manager": "kube-controller-manager", "operation": "Update", "fieldsV1": {"f:status": {}}}]
    one = {"kind": "Job", "metadata": {"name": "a", "uid": "u", "managedFields": managed}, "status": {"active": 1}}
    other = {**one, "metadata": {"name": "b"}}
    listed = {"kind": "JobList", "metadata": {"resourceVersion": "9"}, "items": [one, other]}

    got_one = asyncio.run(_serve_and_call(200, json.dumps(one), "application/json"))
    got_list: Any = asyncio.run(_serve_and_call(200, json.dumps(listed), "application/json"))
    assert got_one == {"kind": "Job", "metadata": {"name": "a", "uid": "u"}, "status": {"active": 1}}
    assert isinstance(got_list, dict)
    assert [i["metadata"] for i in got_list["items"]] == [{"name": "a", "uid": "u"}, {"name": "b"}]


def test_without_managed_fields_leaves_its_input_alone() -> None:
    body: dict[str, Any] = {"metadata": {"name": "a", "managedFields": [{"manager": "m"}]}, "spec": {"x": 1}}
    slim = without_managed_fields(body)
    assert slim == {"metadata": {"name": "a"}, "spec": {"x": 1}}
    assert body["metadata"]["managedFields"] == [{"manager": "m"}]
