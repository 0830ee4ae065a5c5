"""Trainer config files for tests, written the way the operator renders them (docs/CONTRACT.md section 1).

Importable by name (`from trainer_config import ...`) from both training tiers;
tests/training/conftest.py puts this folder on sys.path.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from kubetune_api.automodel import AutomodelJobSpec

REPO_ROOT = Path(__file__).resolve().parents[2]

# Every default of the Automodel seed table, filled by the API's own model (kubetune_api), as
# the operator renders it: a new field or default reaches these tests without an edit here.
AUTOMODEL_DEFAULT_SPEC: dict[str, Any] = AutomodelJobSpec.model_validate(
    {"model": "tiny-llama", "dataset": {"training": "train"}}
).model_dump(mode="json")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_trainer_config(
    path: Path,
    *,
    spec: dict[str, Any],
    model: Path,
    training_data: Path,
    output: Path,
    kind: str = "AutomodelJob",
    teacher_model: Path | None = None,
    validation_data: Path | None = None,
    progress: dict[str, Any] | None = None,
    name: str = "test-job",
    resume_from: Path | None = None,
) -> Path:
    """Write a config.json the way the operator renders it (spec given in full, not validated
    here: a test may hand the trainer a config that breaks the contract)."""
    document = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "default", "uid": "00000000-0000-0000-0000-000000000000"},
        "spec": spec,
        "paths": {
            "model": str(model),
            "teacher_model": str(teacher_model) if teacher_model else None,
            "training_data": str(training_data),
            "validation_data": str(validation_data) if validation_data else None,
            "output": str(output),
            "resume_from": str(resume_from) if resume_from else None,
        },
        "progress": progress or {"type": "none"},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2))
    return path


def automodel_spec(**overrides: Any) -> dict[str, Any]:
    """The defaulted Automodel spec with `overrides` deep-merged (nested dicts)."""
    return deep_merge(AUTOMODEL_DEFAULT_SPEC, overrides)
