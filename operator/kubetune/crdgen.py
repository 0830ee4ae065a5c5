"""Generate CustomResourceDefinitions from the pydantic models.

The pydantic JSON schema is turned into a Kubernetes structural schema: refs
inlined, `Optional` unwrapped (absent = null), JSON-Schema 2020 exclusive bounds
turned into OpenAPI v3.0 ones, every field's description kept, section defaults
made explicit so the API server fills nested defaults, and the cross-field rules
attached as CEL `x-kubernetes-validations` where their scope is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kubetune.api.resources import JOB_RESOURCES, RESOURCES, Resource, job_backend
from kubetune_api import constants as c
from kubetune_api.common import CrossFieldRule, nested_model

JSON = dict[str, Any]

# What the spec of a job may change after creation: only suspend (Kueue admits a
# job by flipping it). Everything else would make the running workload lie.
MUTABLE_JOB_FIELDS = frozenset({"suspend"})


def _field_for(model: type[BaseModel], prop: str) -> Any:
    for name, info in model.model_fields.items():
        if prop in (name, info.alias):
            return info
    raise KeyError(f"{model.__name__} has no field {prop}")


def _structural(node: JSON, defs: JSON, model: type[BaseModel] | None) -> JSON:
    if "$ref" in node:
        target = defs[node["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs, model)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"a structural schema cannot express a union of {branches}")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        return _structural({**branches[0], **rest}, defs, model)

    out: JSON = {}
    kind = node.get("type")
    if kind is None and "const" in node:
        kind = "string"
    out["type"] = kind
    if "description" in node:
        out["description"] = node["description"]
    if "const" in node:
        out["enum"] = [node["const"]]
    if "enum" in node:
        out["enum"] = list(node["enum"])
    for key in ("minimum", "maximum", "minLength", "maxLength", "pattern", "minItems", "maxItems"):
        if key in node:
            out[key] = node[key]
    if "exclusiveMinimum" in node:
        out["minimum"] = node["exclusiveMinimum"]
        out["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node:
        out["maximum"] = node["exclusiveMaximum"]
        out["exclusiveMaximum"] = True
    if node.get("default") is not None:
        out["default"] = node["default"]
    # Kubernetes' own schema extensions, given on a field as json_schema_extra.
    out.update({k: v for k, v in node.items() if k.startswith("x-kubernetes-")})

    if kind == "array":
        out["items"] = _structural(node["items"], defs, nested_model(model) if model else None)
    if kind == "object" and "properties" in node:
        if model is None:
            raise ValueError("object schema without a model")
        props: JSON = {}
        for prop, sub in node["properties"].items():
            info = _field_for(model, prop)
            child = _structural(sub, defs, nested_model(info.annotation))
            if info.description:
                child["description"] = info.description
            if info.default_factory is not None and "default" not in child:
                produced = info.default_factory()
                # A section's default is the complete object: the API server checks a default
                # against the CEL rules as it stands, without filling the nested defaults first.
                child["default"] = (
                    produced.model_dump(mode="json", exclude_none=True, by_alias=True)
                    if isinstance(produced, BaseModel)
                    else produced
                )
            props[prop] = child
        out["properties"] = props
        if node.get("required"):
            out["required"] = list(node["required"])
    return out


def _attach_rules(spec_schema: JSON, rules: tuple[CrossFieldRule, ...]) -> None:
    for rule in rules:
        target = spec_schema
        for key in rule.scope:
            target = target["properties"][key]
        target.setdefault("x-kubernetes-validations", []).append(
            {
                "rule": rule.cel,
                "message": f"{rule.spec_path}: {rule.message}",
                "fieldPath": rule.field,
                "reason": "FieldValueInvalid",
            }
        )


def _immutability_rules(spec_schema: JSON) -> list[JSON]:
    rules = []
    required = set(spec_schema.get("required", []))
    for prop in spec_schema["properties"]:
        if prop in MUTABLE_JOB_FIELDS:
            continue
        if prop in required or "default" in spec_schema["properties"][prop]:
            expr = f"self.{prop} == oldSelf.{prop}"
        else:
            expr = f"has(self.{prop}) == has(oldSelf.{prop}) && (!has(self.{prop}) || self.{prop} == oldSelf.{prop})"
        rules.append(
            {
                "rule": expr,
                "message": f"spec.{prop} cannot change after the job is created (only spec.suspend can): "
                "delete the job and create it again",
                "fieldPath": f".{prop}",
                "reason": "FieldValueForbidden",
            }
        )
    return rules


def spec_schema(resource: Resource) -> JSON:
    """The structural OpenAPI schema of a resource's spec, rules included."""
    raw = resource.spec_model.model_json_schema(mode="validation")
    schema = _structural(raw, raw.get("$defs", {}), resource.spec_model)
    schema["description"] = resource.spec_model.__doc__ or resource.description
    _attach_rules(schema, getattr(resource.spec_model, "RULES", ()))
    if resource.is_job:
        schema.setdefault("x-kubernetes-validations", []).extend(_immutability_rules(schema))
    return schema


def status_schema(resource: Resource) -> JSON:
    raw = resource.status_model.model_json_schema(mode="validation", by_alias=True)
    schema = _structural(raw, raw.get("$defs", {}), resource.status_model)
    # kopf may record handler progress under status.kopf; give it a place instead of
    # letting the API server prune it silently.
    schema["properties"]["kopf"] = {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "description": "Bookkeeping of the operator framework (kopf).",
    }
    return schema


def build_crd(resource: Resource) -> JSON:
    columns = [
        {
            "name": col.name,
            "type": col.type,
            "jsonPath": col.json_path,
            **({"description": col.description} if col.description else {}),
            **({"priority": col.priority} if col.priority else {}),
        }
        for col in resource.columns
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{resource.plural}.{c.GROUP}",
            "labels": {"app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": {
            "group": c.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": resource.kind,
                "listKind": f"{resource.kind}List",
                "plural": resource.plural,
                "singular": resource.singular,
                "shortNames": list(resource.short_names),
                "categories": [c.CATEGORY],
            },
            "versions": [
                {
                    "name": c.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": resource.description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "kubetune.io/v1alpha1"},
                                "kind": {"type": "string", "description": resource.kind},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(resource),
                                "status": status_schema(resource),
                            },
                        }
                    },
                }
            ],
        },
    }


def render_crd_yaml(resource: Resource) -> str:
    header = "# Generated by `kubetune crds` from the pydantic models in operator/kubetune/api. Do not edit.\n"
    return header + yaml.safe_dump(build_crd(resource), sort_keys=False, width=120, allow_unicode=True)


def crd_files() -> dict[str, str]:
    return {f"{c.GROUP}_{r.plural}.yaml": render_crd_yaml(r) for r in RESOURCES}


CRD_DIRS = (Path("crds"), Path("helm/kubetune/crds"))


POLICY_FILE = Path("helm/kubetune/files/trainer-status-policy.yaml")


def policy_file_text() -> str:
    """The chart's trainer-status ValidatingAdmissionPolicy spec (controller/policies.py)."""
    from kubetune.controller.policies import trainer_status_policy_spec

    header = "# Generated by `kubetune crds` from operator/kubetune/controller/policies.py. Do not edit.\n"
    return header + yaml.safe_dump(trainer_status_policy_spec(), sort_keys=False, width=120)


RULES_FILES = {
    Path("helm/kubetune/files/operator-rules.yaml"): (
        "OPERATOR_RULES",
        "The operator's permissions, one rule per entry (a ClusterRole, or a Role per watched namespace);\n"
        "# no wildcard verbs, resources or groups.",
    ),
    Path("helm/kubetune/files/operator-volume-rules.yaml"): (
        "VOLUME_RULES",
        "The operator's cluster-scoped read permissions (a ClusterRole in either scope).",
    ),
    Path("helm/kubetune/files/operator-leader-rules.yaml"): (
        "LEADER_ELECTION_RULES",
        "The operator's leader-election permissions (a Role in the release namespace, either scope).",
    ),
}


def rules_file_text(name: str, what: str) -> str:
    """A chart rules file: the list `name` of controller/rbac.py, which derives the
    kubetune.io resources from the table of kinds (api/resources.py)."""
    from kubetune.controller import rbac

    header = (
        f"# Generated by `make generate` from {name} in operator/kubetune/controller/rbac.py. Do not edit.\n# {what}\n"
    )
    rules = getattr(rbac, name)
    return header + yaml.safe_dump(rules, sort_keys=False, default_flow_style=None, width=200)


JOB_RESOURCES_FILE = Path("helm/kubetune/files/job-resources.yaml")


def job_resources_file_text() -> str:
    """The job kinds and their backends, for the chart's templates that go over every job
    kind (the image policy's resources, the operator's `--<backend>-image` flags), so that
    a new kind needs no template edit."""
    header = "# Generated by `make generate` from the job kinds in operator/kubetune/api/resources.py. Do not edit.\n"
    kinds = [{"kind": r.kind, "plural": r.plural, "backend": job_backend(r).name} for r in JOB_RESOURCES]
    return header + yaml.safe_dump(kinds, sort_keys=False, default_flow_style=None, width=200)


def generated_files() -> dict[Path, str]:
    """Every file `make generate` writes from the models and the operator's tables (the
    golden files and the chart README's values table come from their tests), by path
    from the repository root. The unit tier compares each with the committed file."""
    files = {directory / name: text for directory in CRD_DIRS for name, text in crd_files().items()}
    files[POLICY_FILE] = policy_file_text()
    for path, (name, what) in RULES_FILES.items():
        files[path] = rules_file_text(name, what)
    files[JOB_RESOURCES_FILE] = job_resources_file_text()
    return files


def write_generated(root: Path) -> list[Path]:
    written = []
    for relative, text in generated_files().items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def json_schema(resource: Resource) -> JSON:
    """The live schema of a spec for `kubetune schema`: the structural one, defaults included."""
    return spec_schema(resource)


def dumps_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False)
