"""The kubetune CRDs on a real API server: examples accepted, every rule refused
with its CEL message, unknown keys refused, spec immutable but for suspend, and the
server agreeing with pydantic on generated specs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from pydantic import ValidationError

from kubetune_api.automodel import AUTOMODEL_RULES, AutomodelJobSpec
from kubetune_api.entities import MODEL_RULES
from kubetune_api.unsloth import UNSLOTH_RULES, UnslothJobSpec
from support.kube import install_crds
from support.specs import AUTOMODEL_MIN, RULE_CASES, manifest, with_value
from support.strategies import automodel_specs, unsloth_specs

ROOT = Path(__file__).resolve().parents[2]
ALL_RULES = {r.name: r for r in (*AUTOMODEL_RULES, *UNSLOTH_RULES, *MODEL_RULES)}


@pytest.fixture(scope="module")
def api(cluster: Any) -> Any:
    install_crds(cluster)
    cluster.create_namespace("api-tests")
    return cluster


def server_dry_run(api: Any, obj: dict[str, Any]) -> tuple[bool, str]:
    result = api.kubectl("apply", "--dry-run=server", "-n", "api-tests", "-f", "-", input=json.dumps(obj), check=False)
    return result.returncode == 0, result.stderr


def test_every_example_is_accepted_by_the_server(api: Any) -> None:
    result = api.kubectl("apply", "--dry-run=server", "-n", "api-tests", "-f", str(ROOT / "examples"), check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(server dry run)") == len(
        [d for p in (ROOT / "examples").glob("*.yaml") for d in yaml.safe_load_all(p.read_text()) if d]
    )


@pytest.mark.parametrize("name", sorted(RULE_CASES))
def test_each_rule_refused_by_the_server_with_its_message(api: Any, name: str) -> None:
    model, good, bad = RULE_CASES[name]
    ok, err = server_dry_run(api, manifest(model, "good", good))
    assert ok, err
    ok, err = server_dry_run(api, manifest(model, "bad", bad))
    rule = ALL_RULES[name]
    assert not ok
    assert f"{rule.spec_path}: {rule.message}" in err, err


def test_unknown_field_and_wrong_type_refused(api: Any) -> None:
    ok, err = server_dry_run(
        api, manifest(AutomodelJobSpec, "typo", with_value(AUTOMODEL_MIN, "training.lora.rnak", 4))
    )
    assert not ok and 'unknown field "spec.training.lora.rnak"' in err, err
    ok, err = server_dry_run(
        api, manifest(AutomodelJobSpec, "type", with_value(AUTOMODEL_MIN, "batch.global_batch_size", "8"))
    )
    assert not ok and "spec.batch.global_batch_size" in err, err
    unsloth = {"model": {"name": "m"}, "dataset": {"path": "d"}, "parallelism": {"num_nodes": 2}}
    ok, err = server_dry_run(api, manifest(UnslothJobSpec, "other", unsloth))
    assert not ok and 'unknown field "spec.parallelism"' in err, err


def test_defaults_applied_by_the_server(api: Any) -> None:
    result = api.kubectl(
        "apply",
        "--dry-run=server",
        "-n",
        "api-tests",
        "-o",
        "json",
        "-f",
        "-",
        input=json.dumps(manifest(UnslothJobSpec, "d", {"model": {"name": "m"}, "dataset": {"path": "x"}})),
    )
    spec = json.loads(result.stdout)["spec"]
    assert spec["model"]["load_in_4bit"] is True and spec["optimizer"]["optim"] == "adamw_8bit"
    assert spec["schedule"]["seed"] == 3407 and spec["hardware"]["precision"] == "bf16"


def test_spec_is_immutable_except_suspend(api: Any) -> None:
    job = manifest(AutomodelJobSpec, "immutable", AUTOMODEL_MIN)
    api.kubectl("apply", "-n", "api-tests", "-f", "-", input=json.dumps(job))
    try:
        changed = api.kubectl(
            "patch",
            "automodeljob",
            "immutable",
            "-n",
            "api-tests",
            "--type=merge",
            "-p",
            '{"spec": {"batch": {"global_batch_size": 16}}}',
            check=False,
        )
        assert changed.returncode != 0
        assert "spec.batch cannot change after the job is created" in changed.stderr
        suspended = api.kubectl(
            "patch",
            "automodeljob",
            "immutable",
            "-n",
            "api-tests",
            "--type=merge",
            "-p",
            '{"spec": {"suspend": true}}',
            check=False,
        )
        assert suspended.returncode == 0, suspended.stderr
    finally:
        api.kubectl("delete", "automodeljob", "immutable", "-n", "api-tests", check=False)


def test_printer_columns(api: Any) -> None:
    result = api.kubectl("get", "crd", "automodeljobs.kubetune.io", "-o", "json")
    columns = [c["name"] for c in json.loads(result.stdout)["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns[:5] == ["Phase", "Model", "Method", "GPUs", "Progress"]
    assert "kubetune" in json.loads(result.stdout)["spec"]["names"]["categories"]


# --- the server and pydantic agree on generated specs ------------------------------------


def _pydantic_ok(model: Any, spec: dict[str, Any]) -> bool:
    try:
        model.model_validate(spec)
    except ValidationError:
        return False
    return True


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=automodel_specs())
def test_server_agrees_with_pydantic_automodel(api: Any, spec: dict[str, Any]) -> None:
    ok, err = server_dry_run(api, manifest(AutomodelJobSpec, "gen", spec))
    assert ok == _pydantic_ok(AutomodelJobSpec, spec), err


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=unsloth_specs())
def test_server_agrees_with_pydantic_unsloth(api: Any, spec: dict[str, Any]) -> None:
    ok, err = server_dry_run(api, manifest(UnslothJobSpec, "gen", spec))
    assert ok == _pydantic_ok(UnslothJobSpec, spec), err
