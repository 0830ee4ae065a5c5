"""The kopf registry: what the operator's NoDiffBase relies on."""

from __future__ import annotations

from typing import Any, cast

import kopf

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
