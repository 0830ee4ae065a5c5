"""The trainer config file (docs/CONTRACT.md, section 1): one function, used by the
operator's ConfigMap builder and by `kubetune run`, so both hand the trainer the
same document for the same job."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel

from kubetune.api.resources import Resource
from kubetune_api import constants as c


@dataclass(frozen=True)
class TrainerPaths:
    """Where the trainer finds its inputs and writes its outputs."""

    model: str
    training_data: str
    output: str
    teacher_model: str | None = None
    validation_data: str | None = None


def cluster_paths(has_teacher: bool, has_validation: bool) -> TrainerPaths:
    return TrainerPaths(
        model=c.MODEL_MOUNT,
        training_data=c.TRAINING_DATA_MOUNT,
        output=c.OUTPUT_MOUNT,
        teacher_model=c.TEACHER_MOUNT if has_teacher else None,
        validation_data=c.VALIDATION_DATA_MOUNT if has_validation else None,
    )


def kubernetes_progress(resource: Resource, namespace: str, name: str) -> dict[str, Any]:
    return {
        "type": "kubernetes",
        "group": c.GROUP,
        "version": c.VERSION,
        "plural": resource.plural,
        "namespace": namespace,
        "name": name,
    }


NO_PROGRESS: dict[str, Any] = {"type": "none"}


def render_trainer_config(
    resource: Resource,
    *,
    name: str,
    namespace: str,
    uid: str,
    spec: BaseModel,
    paths: TrainerPaths,
    progress: dict[str, Any],
) -> dict[str, Any]:
    """The document the trainer reads: the validated spec with every default filled."""
    return {
        "apiVersion": c.API_VERSION,
        "kind": resource.kind,
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
        "spec": spec.model_dump(mode="json"),
        "paths": asdict(paths),
        "progress": progress,
    }


def dumps_config(config: dict[str, Any]) -> str:
    """Stable text, so that a ConfigMap and a dry run compare byte for byte."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"
