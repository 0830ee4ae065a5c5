"""The kopf registry: what the operator's NoDiffBase relies on."""

from __future__ import annotations

from typing import Any, cast

import kopf
import pytest

from kubetune.controller import handlers


def test_every_resource_handler_is_a_raw_event_handler() -> None:
    """NoDiffBase gives kopf an empty essence and no stored diff base: right only while no
    handler reads old/new/diff (on.create/update/resume/field, timers, daemons). A change
    handler added here would silently see no changes; this test fails first."""
    registry = handlers.registry
    assert registry._watching.get_all_handlers(), "no event handlers registered?"
    assert not registry._changing.get_all_handlers()
    assert not registry._spawning.get_all_handlers()


def test_the_diff_base_is_empty_and_never_stored() -> None:
    settings = kopf.OperatorSettings()
    cast(Any, handlers.configure)(settings=settings)  # kopf types it as a startup activity
    storage = settings.persistence.diffbase_storage
    assert isinstance(storage, handlers.NoDiffBase)
    body = kopf.Body({"metadata": {"name": "a", "annotations": {"x": "1"}}, "spec": {"model": "m"}})
    patch = kopf.Patch()
    assert storage.build(body=body) == {}
    assert storage.fetch(body=body) is None
    storage.store(body=body, patch=patch, essence=storage.build(body=body))
    assert not patch


def test_worker_limit_reaches_kopf_with_a_short_idle_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """--worker-limit N bounds kopf's workers per kind, and shortens how long an idle worker
    keeps its slot; --worker-limit 0 leaves kopf's defaults (no limit, 5 s)."""
    monkeypatch.setattr(handlers, "_queueing", {"worker_limit": 64})
    limited = kopf.OperatorSettings()
    cast(Any, handlers.configure)(settings=limited)
    assert (limited.queueing.worker_limit, limited.queueing.idle_timeout) == (64, 0.5)
    monkeypatch.setattr(handlers, "_queueing", {})
    default = kopf.OperatorSettings()
    cast(Any, handlers.configure)(settings=default)
    assert (default.queueing.worker_limit, default.queueing.idle_timeout) == (None, 5.0)


@pytest.mark.parametrize(
    ("option", "env", "default"),
    [("worker_limit", "KUBETUNE_WORKER_LIMIT", 0), ("start_limit", "KUBETUNE_START_LIMIT", 32)],
)
def test_the_limit_options_read_their_environment_variables(
    option: str, env: str, default: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune import cli

    flag = "--" + option.replace("_", "-")
    monkeypatch.delenv(env, raising=False)
    assert getattr(cli.build_parser().parse_args(["operator"]), option) == default
    monkeypatch.setenv(env, "17")  # neither option's default, so a test that ignored the variable fails
    assert getattr(cli.build_parser().parse_args(["operator"]), option) == 17
    assert getattr(cli.build_parser().parse_args(["operator", flag, "0"]), option) == 0


@pytest.mark.parametrize("flag", ["--worker-limit", "--start-limit"])
@pytest.mark.parametrize("value", ["-1", "many"])
def test_a_bad_limit_is_refused_naming_the_option(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from kubetune import cli

    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["operator", flag, value])
    assert flag in capsys.readouterr().err
