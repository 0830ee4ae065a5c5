"""The generated CRDs: committed == generated, structural, documented, and their
CEL rules agree with the pydantic rules on generated specs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kubetune.api.automodel import AutomodelJobSpec
from kubetune.api.resources import AUTOMODEL, RESOURCES, UNSLOTH
from kubetune.api.unsloth import UnslothJobSpec
from kubetune.crdgen import CRD_DIRS, build_crd, crd_files
from support.cel import CelRules

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("directory", [str(d) for d in CRD_DIRS])
def test_committed_crds_equal_generated(directory: str) -> None:
    expected = crd_files()
    on_disk = {p.name: p.read_text() for p in (ROOT / directory).glob("*.yaml")}
    assert sorted(on_disk) == sorted(expected), "run `make crds` and commit the result"
    for name, text in expected.items():
        assert on_disk[name] == text, f"{directory}/{name} is stale: run `make crds` and commit the result"


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

small = st.integers(min_value=1, max_value=4)
maybe = st.none() | st.just(True)


@st.composite
def automodel_specs(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": "base", "dataset": {"training": "train"}}
    par: dict[str, Any] = {}
    for key in (
        "num_nodes",
        "num_gpus_per_node",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "context_parallel_size",
    ):
        if draw(st.booleans()):
            par[key] = draw(small)
    if draw(st.booleans()):
        par["expert_parallel_size"] = draw(small)
    if par:
        spec["parallelism"] = par
    batch: dict[str, Any] = {}
    if draw(st.booleans()):
        batch["global_batch_size"] = draw(st.integers(1, 32))
    if draw(st.booleans()):
        batch["micro_batch_size"] = draw(small)
    if batch:
        spec["batch"] = batch
    training: dict[str, Any] = {}
    if draw(st.booleans()):
        training["training_type"] = draw(st.sampled_from(["sft", "distillation"]))
    if draw(st.booleans()):
        training["finetuning_type"] = draw(st.sampled_from(["lora", "lora_merged", "all_weights"]))
    if draw(st.booleans()):
        training["teacher_model"] = "teacher"
    if draw(st.booleans()):
        training["lora"] = {"merge": draw(st.booleans())}
    if training:
        spec["training"] = training
    if draw(st.booleans()):
        spec["schedule"] = {"val_check_interval": draw(st.sampled_from([0.25, 0.5, 0.99, 1, 2, 2.5, 10, 10.5, 100.0]))}
    return spec


@st.composite
def unsloth_specs(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": {"name": "base"}, "dataset": {"path": "train"}}
    for key in ("load_in_4bit", "load_in_8bit"):
        if draw(st.booleans()):
            spec["model"][key] = draw(st.booleans())
    training: dict[str, Any] = {}
    if draw(st.booleans()):
        training["finetuning_type"] = draw(st.sampled_from(["lora", "all_weights"]))
    if draw(st.booleans()):
        training["lora"] = {"rank": draw(small)}
    if training:
        spec["training"] = training
    if draw(st.booleans()):
        spec["output"] = {"save_method": draw(st.sampled_from(["lora", "merged_16bit", "merged_4bit"]))}
    schedule: dict[str, Any] = {}
    if draw(st.booleans()):
        schedule["warmup_steps"] = draw(st.integers(0, 3))
    if draw(st.booleans()):
        schedule["warmup_ratio"] = draw(st.sampled_from([0.0, 0.1, 0.5]))
    if schedule:
        spec["schedule"] = schedule
    if draw(st.booleans()):
        n = draw(st.integers(1, 4))
        spec["hardware"] = {"gpus": ",".join(str(draw(st.integers(0, 3))) for _ in range(n))}
    return spec


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
