"""The operator's watch-event lag: from the server's record of the change to the handling."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from kubetune.controller.metrics import event_lag

NOW = datetime(2026, 12, 2, 6, 0, 30, tzinfo=UTC).timestamp()


def pod(**meta: Any) -> dict[str, Any]:
    return {"kind": "Pod", "metadata": {"name": "p", **meta}}


@pytest.mark.parametrize(
    ("body", "type_", "lag"),
    [
        (pod(creationTimestamp="2026-12-02T06:00:28Z"), "ADDED", 2.0),
        # The newest write counts: the kubelet's status update after the scheduler's binding.
        (
            pod(
                creationTimestamp="2026-12-02T05:00:00Z",
                managedFields=[{"time": "2026-12-02T06:00:10Z"}, {"time": "2026-12-02T06:00:25Z"}, {"manager": "x"}],
            ),
            "MODIFIED",
            5.0,
        ),
        (pod(creationTimestamp="2026-12-02T05:00:00Z"), None, None),  # the initial listing
        (pod(creationTimestamp="2026-12-02T05:00:00Z"), "DELETED", None),
        (pod(managedFields=[{"time": "not a time"}]), "MODIFIED", None),
        (pod(creationTimestamp="2026-12-02T06:00:31Z"), "ADDED", 0.0),  # clocks a second apart
    ],
)
def test_event_lag(body: dict[str, Any], type_: str | None, lag: float | None) -> None:
    assert event_lag(body, type_, NOW) == lag
