"""`kubetune validate` and `kubetune schema`, run as a user runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from seed_defaults import AUTOMODEL_DEFAULTS, REQUIRED, UNSLOTH_DEFAULTS

from kubetune_api.automodel import AUTOMODEL_RULES
from kubetune_api.entities import ModelSpec
from kubetune_api.unsloth import UNSLOTH_RULES
from support.specs import RULE_CASES, manifest

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^(?P<file>[^:]+):(?P<doc>\d+) (?P<kind>\w+)/(?P<name>[-\w.<>]+): (?P<path>[^:]+): (?P<msg>.+)$")


def kubetune(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "operator")}
    return subprocess.run(
        [sys.executable, "-m", "kubetune", *args], input=stdin, capture_output=True, text=True, env=env, cwd=ROOT
    )


def test_examples_validate() -> None:
    result = kubetune("validate", "-f", "examples/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("name", sorted(RULE_CASES))
def test_each_rule_bad_case_names_its_field(name: str, tmp_path: Path) -> None:
    model, good, bad = RULE_CASES[name]
    rules = {r.name: r for r in (*AUTOMODEL_RULES, *UNSLOTH_RULES, *ModelSpec.RULES)}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump_all([manifest(model, "good", good), manifest(model, "bad", bad)]))
    result = kubetune("validate", "-f", str(path))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    match = LINE.match(lines[0])
    assert match, lines[0]
    assert match["file"] == str(path) and match["doc"] == "1" and match["name"] == "bad"
    assert match["path"] == rules[name].spec_path


def test_every_problem_on_its_own_line_with_full_path() -> None:
    manifest = """
apiVersion: kubetune.io/v1alpha1
kind: UnslothJob
metadata: {name: mixed}
spec:
  model: {name: base, max_seq_length: "2048"}
  dataset: {path: train}
  parallelism: {num_nodes: 2}
  batch: {global_batch_size: 8}
  training: {lora: {rnak: 8}}
"""
    result = kubetune("validate", "-f", "-", stdin=manifest)
    assert result.returncode == 1
    paths = sorted(LINE.match(line)["path"] for line in result.stdout.splitlines())  # type: ignore[index]
    assert paths == [
        "spec.batch.global_batch_size",
        "spec.model.max_seq_length",
        "spec.parallelism",
        "spec.training.lora.rnak",
    ]
    assert "belongs to AutomodelJob" in result.stdout


def test_document_level_errors(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("kind: [unclosed\n")
    (tmp_path / "wrong.yaml").write_text(
        "apiVersion: kubetune.io/v1\nkind: AutomodelJob\nmetadata: {name: x}\nspec: {}\n---\n"
        "apiVersion: kubetune.io/v1alpha1\nkind: Trainer\nmetadata: {name: y}\nspec: {}\n"
    )
    result = kubetune("validate", "-f", str(tmp_path), "-f", str(tmp_path / "missing.yaml"))
    assert result.returncode == 1
    out = result.stdout
    assert "broken.yaml:0 -: (file): not valid YAML" in out
    assert "wrong.yaml:0 AutomodelJob/x: apiVersion: unsupported version" in out
    assert "wrong.yaml:1 Trainer/y: kind: unknown kind 'Trainer'" in out
    assert "missing.yaml:0 -: (file): no such file or folder" in out


def test_yaml_exponent_without_dot_is_a_number() -> None:
    manifest = (
        "apiVersion: kubetune.io/v1alpha1\nkind: AutomodelJob\nmetadata: {name: lr}\n"
        "spec: {model: m, dataset: {training: d}, optimizer: {learning_rate: 5e-6}}\n"
    )
    assert kubetune("validate", "-f", "-", stdin=manifest).returncode == 0


def _schema_default(schema: dict[str, Any], dotted: str) -> Any:
    node = schema
    for part in dotted.split("."):
        node = node["properties"][part]
    return node.get("default")


@pytest.mark.parametrize("backend,defaults", [("automodel", AUTOMODEL_DEFAULTS), ("unsloth", UNSLOTH_DEFAULTS)])
def test_schema_defaults_equal_the_seed(backend: str, defaults: dict[str, Any]) -> None:
    result = kubetune("schema", backend, "--output", "json")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    for dotted, default in defaults.items():
        if default is REQUIRED:
            parent, _, leaf = dotted.rpartition(".")
            node = schema
            for part in filter(None, parent.split(".")):
                node = node["properties"][part]
            assert leaf in node.get("required", []), dotted
        else:
            assert _schema_default(schema, dotted) == default, dotted


def test_schema_yaml_output() -> None:
    result = kubetune("schema", "automodel")
    assert result.returncode == 0
    assert yaml.safe_load(result.stdout)["properties"]["parallelism"]["properties"]["num_nodes"]["default"] == 1


def test_operator_identity_without_a_passwd_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator image runs as uid 65532, which has no passwd entry, and a pod has no
    USER or LOGNAME: kopf's identity (getpass.getuser()) raised KeyError and the operator
    pod crashed at start, every time."""
    import pwd

    from kopf._core.engines.peering import detect_own_id

    from kubetune.cli import ensure_identity

    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    for name in ("LOGNAME", "USER", "LNAME", "USERNAME", "POD_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(KeyError):
        detect_own_id(manual=False)  # what the pod met
    ensure_identity()
    assert detect_own_id(manual=False).startswith(f"uid-{os.getuid()}@")
