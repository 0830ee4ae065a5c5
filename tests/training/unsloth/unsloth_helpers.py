"""Helpers of the Unsloth tier (run in the `unsloth` venv: hack/run-in-venv.sh unsloth).

Specs are rendered through the API's own pydantic model (`kubetune_api.unsloth`),
so the trainer is tested on the documents the operator puts in the ConfigMap,
every default filled by the same code.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kubetune.api.resources import UNSLOTH
from kubetune.render import NO_PROGRESS, TrainerPaths, render_trainer_config
from kubetune_api.constants import MODEL_MOUNT, OUTPUT_MOUNT, TRAINING_DATA_MOUNT
from kubetune_api.unsloth import UnslothJobSpec
from kubetune_trainer.common.config import UnslothTrainerConfig, expect_kind, parse_config

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]


def unsloth_spec(**overrides: Any) -> dict[str, Any]:
    """A validated, fully defaulted UnslothJob spec; `overrides` are nested sections."""
    document: dict[str, Any] = {"model": {"name": "tiny-llama"}, "dataset": {"path": "train"}}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(document.get(key), dict):
            document[key] = {**document[key], **value}
        else:
            document[key] = copy.deepcopy(value)
    return UnslothJobSpec.model_validate(document).model_dump(mode="json")


def config_document(
    spec: dict[str, Any],
    *,
    model: Path | str = MODEL_MOUNT,
    training_data: Path | str = TRAINING_DATA_MOUNT,
    validation_data: Path | str | None = None,
    output: Path | str = OUTPUT_MOUNT,
    name: str = "unsloth-test",
    hand_edited: bool = False,
    resume_from: Path | None = None,
) -> dict[str, Any]:
    """The trainer config document, rendered by the operator's own function (docs/CONTRACT.md section 1).

    hand_edited: keep `spec` as given (a config that skipped the API's validation), for the
    trainer's own re-checks.
    """
    paths = TrainerPaths(
        model=str(model),
        training_data=str(training_data),
        output=str(output),
        validation_data=str(validation_data) if validation_data is not None else None,
        resume_from=str(resume_from) if resume_from is not None else None,
    )
    if hand_edited:
        return {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "UnslothJob",
            "metadata": {"name": name, "namespace": "default", "uid": "hand-edited"},
            "spec": spec,
            "paths": paths.model_dump(mode="json"),
            "progress": {"type": "none"},
        }
    return render_trainer_config(
        UNSLOTH,
        name=name,
        namespace="default",
        uid="00000000-0000-0000-0000-000000000000",
        spec=UnslothJobSpec.model_validate(spec),
        paths=paths,
        progress=NO_PROGRESS,
    )


def parsed(document: dict[str, Any]) -> UnslothTrainerConfig:
    """The document as the trainer parses it (kubetune_trainer.common.config)."""
    return expect_kind(parse_config(document), UnslothTrainerConfig)


def run_entrypoint(
    config: Path, tmp_path: Path, *, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The image's entrypoint, as the pod runs it (a fresh interpreter)."""
    full_env = {
        **os.environ,
        "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log"),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "trainer-images"), str(REPO_ROOT / "operator")]),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "kubetune_trainer.unsloth", "--config", str(config)],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def read_metrics(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
