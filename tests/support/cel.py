"""Evaluate the CRDs' CEL rules in Python (cel-python), the way the API server does:
structural defaults applied first, `number` fields as doubles, `split` from the
Kubernetes strings extension."""

from __future__ import annotations

import copy
from typing import Any

import celpy
from celpy import celtypes

from kubetune.api.resources import Resource
from kubetune.crdgen import spec_schema


def _split(value: celtypes.StringType, sep: celtypes.StringType) -> celtypes.ListType:
    return celtypes.ListType([celtypes.StringType(part) for part in str(value).split(str(sep))])


def apply_defaults(obj: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting: fill missing properties that have a default, recursively,
    and turn values of `number` fields into floats (the API server's CEL sees doubles)."""
    if schema.get("type") == "number" and isinstance(obj, int) and not isinstance(obj, bool):
        return float(obj)
    if schema.get("type") == "array" and isinstance(obj, list):
        return [apply_defaults(v, schema["items"]) for v in obj]
    if schema.get("type") != "object" or not isinstance(obj, dict):
        return obj
    out = dict(obj)
    for name, sub in schema.get("properties", {}).items():
        if name not in out and "default" in sub:
            out[name] = copy.deepcopy(sub["default"])
        if name in out:
            out[name] = apply_defaults(out[name], sub)
    return out


class CelRules:
    """Every non-transition CEL rule of a resource's spec schema, compiled once."""

    def __init__(self, resource: Resource) -> None:
        self.schema = spec_schema(resource)
        self.env = celpy.Environment()
        self.rules: list[tuple[tuple[str, ...], str, str, Any]] = []
        self._collect(self.schema, ())

    def _collect(self, node: dict[str, Any], scope: tuple[str, ...]) -> None:
        for rule in node.get("x-kubernetes-validations", []):
            if "oldSelf" in rule["rule"]:
                continue
            program = self.env.program(self.env.compile(rule["rule"]), functions={"split": _split})
            self.rules.append((scope, rule["rule"], rule["message"], program))
        for name, sub in node.get("properties", {}).items():
            if sub.get("type") == "object":
                self._collect(sub, (*scope, name))

    def failures(self, spec: dict[str, Any]) -> list[str]:
        """Messages of the rules the (undefaulted) spec breaks."""
        defaulted = apply_defaults(spec, self.schema)
        broken = []
        for scope, _, message, program in self.rules:
            target: Any = defaulted
            for key in scope:
                target = target.get(key) if isinstance(target, dict) else None
            if target is None:
                continue
            result = program.evaluate({"self": celpy.json_to_cel(target)})  # type: ignore[attr-defined]
            if isinstance(result, Exception) or not bool(result):
                broken.append(message)
        return broken
