"""Admission policy the chart ships beside the operator, as data (one source for the
chart's generated file and the tests).

The trainer's per-job identity may patch its job's status (RBAC cannot narrow a
grant to one field), and it reports progress there. The operator never acts on a
status field (jobs.py, "Trust"), but a forged phase would still show until its
next pass. This ValidatingAdmissionPolicy makes the API server itself refuse a
trainer's write to anything but `status.progress`."""

from __future__ import annotations

from typing import Any

from kubetune.api.resources import JOB_RESOURCES
from kubetune.controller.builders import backend
from kubetune_api import constants as c
from kubetune_api.status import JobStatus

TRAINER_FIELD = "progress"


def operator_status_fields() -> list[str]:
    """Every status field but the trainer's, by its name in the API (camelCase)."""
    names = [info.alias or name for name, info in JobStatus.model_fields.items()]
    return [name for name in names if name != TRAINER_FIELD]


def _unchanged(field: str) -> str:
    new, old = (
        f"has(object.status) && has(object.status.{field})",
        f"has(oldObject.status) && has(oldObject.status.{field})",
    )
    return f"(({new}) == ({old})) && (!({new}) || object.status.{field} == oldObject.status.{field})"


def trainer_identity_condition() -> str:
    """The per-job trainer ServiceAccounts (`<job>-<backend>-trainer`, builders.child_names)."""
    suffixes = " || ".join(f"request.userInfo.username.endsWith('-{backend(r)}-trainer')" for r in JOB_RESOURCES)
    return f"request.userInfo.username.startsWith('system:serviceaccount:') && ({suffixes})"


def trainer_status_policy_spec() -> dict[str, Any]:
    """spec of the ValidatingAdmissionPolicy (the chart adds metadata and the binding)."""
    return {
        "failurePolicy": "Fail",
        "matchConstraints": {
            "resourceRules": [
                {
                    "apiGroups": [c.GROUP],
                    "apiVersions": ["*"],
                    "operations": ["UPDATE"],
                    "resources": [f"{r.plural}/status" for r in JOB_RESOURCES],
                }
            ]
        },
        "matchConditions": [{"name": "trainer-identity", "expression": trainer_identity_condition()}],
        "validations": [
            {
                "expression": _unchanged(field),
                "message": f"status.{field} belongs to the kubetune operator: a trainer may write status.progress only",
                "reason": "Forbidden",
            }
            for field in operator_status_fields()
        ],
    }
