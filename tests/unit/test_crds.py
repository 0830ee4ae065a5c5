"""The generated CRDs: structural, documented, and their
CEL rules agree with the pydantic rules on generated specs. That the committed ones are
the generated ones is test_generated.py's (with every other file `make generate` writes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from pydantic import ValidationError

from kubetune.api.resources import AUTOMODEL, FILESET, MODEL, RESOURCES, UNSLOTH
from kubetune.crdgen import build_crd
from kubetune_api.automodel import AutomodelJobSpec
from kubetune_api.entities import FilesetSpec, ModelSpec
from kubetune_api.unsloth import UnslothJobSpec
from support.cel import CelRules
from support.strategies import automodel_specs, unsloth_specs

ROOT = Path(__file__).resolve().parents[2]


def _walk(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        out += _walk(sub, f"{path}.{name}")
    if "items" in node:
        out += _walk(node["items"], f"{path}[]")
    return out


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: r.kind)
def test_crd_is_structural_and_documented(resource: Any) -> None:
    crd = build_crd(resource)
    version = crd["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for path, node in _walk(spec, "spec"):
        assert "type" in node, f"{path} has no type"
        assert "x-kubernetes-preserve-unknown-fields" not in node, path
        assert not {"$ref", "anyOf", "oneOf", "allOf", "title"} & set(node), path
        if not path.endswith("[]"):
            assert node.get("description"), f"{path} has no description"
    assert version["subresources"] == {"status": {}}
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["categories"] == ["kubetune"]
    assert crd["spec"]["names"]["shortNames"]


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: r.kind)
def test_status_conditions_are_a_map_keyed_by_type(resource: Any) -> None:
    """As metav1.Condition lists are: the API server refuses two conditions of one type."""
    status = build_crd(resource)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]  # a map key must be required


def test_job_printer_columns() -> None:
    for resource in (AUTOMODEL, UNSLOTH):
        columns = [c["name"] for c in build_crd(resource)["spec"]["versions"][0]["additionalPrinterColumns"]]
        assert columns[:5] == ["Phase", "Model", "Method", "GPUs", "Progress"]
        assert "Age" in columns


def test_rule_messages_name_their_fields() -> None:
    for resource in (AUTOMODEL, UNSLOTH):
        text = yaml.safe_dump(build_crd(resource))
        for rule in resource.spec_model.RULES:  # type: ignore[attr-defined]
            assert f"{rule.spec_path}: {rule.message}" in yaml.safe_load(text).__repr__()


# --- CEL == pydantic, on generated specs -------------------------------------------------


def _pydantic_failures(model: Any, spec: dict[str, Any]) -> list[str]:
    try:
        model.model_validate(spec)
    except ValidationError as err:
        messages = []
        for e in err.errors():
            assert e["type"] == "cross_field", f"generated spec failed a field check: {e}"
            messages += [f"{path}: {msg}" for path, msg in e["ctx"]["problems"]]
        return messages
    return []


AUTOMODEL_CEL = CelRules(AUTOMODEL)
UNSLOTH_CEL = CelRules(UNSLOTH)


@settings(max_examples=300, deadline=None)
@given(automodel_specs())
def test_cel_agrees_with_pydantic_automodel(spec: dict[str, Any]) -> None:
    assert sorted(AUTOMODEL_CEL.failures(spec)) == sorted(_pydantic_failures(AutomodelJobSpec, spec))


@settings(max_examples=300, deadline=None)
@given(unsloth_specs())
def test_cel_agrees_with_pydantic_unsloth(spec: dict[str, Any]) -> None:
    assert sorted(UNSLOTH_CEL.failures(spec)) == sorted(_pydantic_failures(UnslothJobSpec, spec))


SOURCES: dict[str, Any] = {
    "none given": {},
    "huggingface": {"huggingface": {"repo": "org/tiny"}},
    "s3": {"s3": {"bucket": "data", "prefix": "sets/chat/"}},
    "both": {"huggingface": {"repo": "org/tiny"}, "s3": {"bucket": "data"}},
}


@pytest.mark.parametrize("resource,model", [(MODEL, ModelSpec), (FILESET, FilesetSpec)], ids=["Model", "Fileset"])
@pytest.mark.parametrize("shape", sorted(SOURCES))
def test_cel_agrees_with_pydantic_on_the_source_one_of(resource: Any, model: Any, shape: str) -> None:
    """spec.source is exactly one of huggingface and s3, in the API server (CEL) as in pydantic."""
    for storage in ({"localPath": "m"}, {"pvc": {"claimName": "m"}}):
        spec = {"storage": storage, "source": SOURCES[shape]}
        expected = _pydantic_failures(model, spec)
        assert sorted(CelRules(resource).failures(spec)) == sorted(expected)
        one = shape in ("huggingface", "s3")
        assert expected == (
            [] if one else ["spec.source.huggingface: give exactly one of source.huggingface and source.s3"]
        )


def test_trainer_status_policy_guards_every_status_field_but_progress() -> None:
    from kubetune.controller.policies import operator_status_fields, trainer_status_policy_spec
    from kubetune_api.status import JobStatus

    fields = operator_status_fields()
    assert "progress" not in fields and {"phase", "conditions", "child", "observedGeneration", "output"} <= set(fields)
    assert len(fields) == len(JobStatus.model_fields) - 1
    validations = trainer_status_policy_spec()["validations"]
    assert [v["message"].split()[0] for v in validations] == [f"status.{f}" for f in fields]
