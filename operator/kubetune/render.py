"""The trainer config file (docs/CONTRACT.md section 1): one function, used by the
operator's ConfigMap builder and by `kubetune run`, so both hand the trainer the
same document for the same job. The document is built as the typed envelope of
`kubetune_api.trainer_config`, the one the trainers parse, so the operator cannot
render a config the trainer would refuse."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from kubetune.api.resources import Resource
from kubetune_api import constants as c
from kubetune_api.trainer_config import (
    CONFIG_MODELS,
    JobIdentity,
    KubernetesProgress,
    NoProgress,
    TrainerPaths,
    dump_trainer_config,
)

__all__ = [
    "NO_PROGRESS",
    "TrainerPaths",
    "cluster_paths",
    "dumps_config",
    "kubernetes_progress",
    "render_trainer_config",
]


def cluster_paths(has_teacher: bool, has_validation: bool, resumes: bool = False) -> TrainerPaths:
    return TrainerPaths(
        model=c.MODEL_MOUNT,
        training_data=c.TRAINING_DATA_MOUNT,
        output=c.OUTPUT_MOUNT,
        teacher_model=c.TEACHER_MOUNT if has_teacher else None,
        validation_data=c.VALIDATION_DATA_MOUNT if has_validation else None,
        resume_from=c.RESUME_MOUNT if resumes else None,
    )


def kubernetes_progress(resource: Resource, namespace: str, name: str) -> KubernetesProgress:
    return KubernetesProgress(group=c.GROUP, version=c.VERSION, plural=resource.plural, namespace=namespace, name=name)


NO_PROGRESS = NoProgress()


def render_trainer_config(
    resource: Resource,
    *,
    name: str,
    namespace: str,
    uid: str,
    spec: BaseModel,
    paths: TrainerPaths,
    progress: KubernetesProgress | NoProgress,
) -> dict[str, Any]:
    """The document the trainer reads: the validated spec with every default filled.

    `spec` must be the spec model of `resource`'s kind; the envelope refuses any other."""
    config = CONFIG_MODELS[resource.kind].model_validate(
        {
            "kind": resource.kind,
            "metadata": JobIdentity(name=name, namespace=namespace, uid=uid),
            "spec": spec,
            "paths": paths,
            "progress": progress,
        }
    )
    return dump_trainer_config(config)


def dumps_config(config: dict[str, Any]) -> str:
    """Stable text, so that a ConfigMap and a dry run compare byte for byte."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"
