"""The trainer config file (docs/CONTRACT.md section 1), read into a typed object.

The operator (and `kubetune run`) render a fully defaulted, validated spec; the
trainer still checks the envelope so a hand-written or stale file fails with a
message naming the field instead of a KeyError deep in the training loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = "/etc/kubetune/config.json"
KNOWN_KINDS = ("AutomodelJob", "UnslothJob")


class ConfigError(ValueError):
    """The config file is missing, malformed or lacks a field the trainer needs."""


@dataclass(frozen=True)
class Paths:
    model: Path
    training_data: Path
    output: Path
    teacher_model: Path | None = None
    validation_data: Path | None = None

    @property
    def checkpoints(self) -> Path:
        return self.output / "checkpoints"


@dataclass(frozen=True)
class ProgressTarget:
    """Where progress goes: type "kubernetes" (the job's status subresource) or "none"."""

    type: str = "none"
    group: str | None = None
    version: str | None = None
    plural: str | None = None
    namespace: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class TrainerConfig:
    kind: str
    spec: dict[str, Any]
    paths: Paths
    progress: ProgressTarget
    metadata: dict[str, Any] = field(default_factory=dict)
    api_version: str = "kubetune.io/v1alpha1"
    source: Path | None = None

    def get(self, dotted: str, default: Any = None) -> Any:
        """`cfg.get("training.lora.rank")`: a spec value by dotted path; `default` when absent or null."""
        node: Any = self.spec
        for part in dotted.split("."):
            if not isinstance(node, dict) or node.get(part) is None:
                return default
            node = node[part]
        return node

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or "kubetune-job")


def _where(source: Path | str) -> str:
    return f"trainer config {source}"


def _path(value: Any, field_name: str, source: Path | str, *, required: bool) -> Path | None:
    if value is None:
        if required:
            raise ConfigError(f"{_where(source)}: paths.{field_name} is required (a directory or file path)")
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{_where(source)}: paths.{field_name} must be a non-empty string, got {value!r}")
    return Path(value)


def parse_config(document: Any, source: Path | str = "<memory>") -> TrainerConfig:
    """Check the envelope of an already-parsed config document and type it."""
    if not isinstance(document, dict):
        raise ConfigError(f"{_where(source)}: the top level must be a JSON object")
    kind = document.get("kind")
    if kind not in KNOWN_KINDS:
        raise ConfigError(f"{_where(source)}: kind must be one of {', '.join(KNOWN_KINDS)}, got {kind!r}")
    spec = document.get("spec")
    if not isinstance(spec, dict):
        raise ConfigError(f"{_where(source)}: spec must be an object (the job's validated spec)")
    raw_paths = document.get("paths")
    if not isinstance(raw_paths, dict):
        raise ConfigError(f"{_where(source)}: paths must be an object with model, training_data and output")
    unknown = set(raw_paths) - {"model", "teacher_model", "training_data", "validation_data", "output"}
    if unknown:
        raise ConfigError(f"{_where(source)}: unknown key(s) in paths: {', '.join(sorted(unknown))}")
    model = _path(raw_paths.get("model"), "model", source, required=True)
    training_data = _path(raw_paths.get("training_data"), "training_data", source, required=True)
    output = _path(raw_paths.get("output"), "output", source, required=True)
    assert model is not None and training_data is not None and output is not None
    paths = Paths(
        model=model,
        training_data=training_data,
        output=output,
        teacher_model=_path(raw_paths.get("teacher_model"), "teacher_model", source, required=False),
        validation_data=_path(raw_paths.get("validation_data"), "validation_data", source, required=False),
    )
    raw_progress = document.get("progress") or {"type": "none"}
    if not isinstance(raw_progress, dict):
        raise ConfigError(f"{_where(source)}: progress must be an object or null")
    progress_type = raw_progress.get("type", "none")
    if progress_type not in ("kubernetes", "none"):
        raise ConfigError(f"{_where(source)}: progress.type must be 'kubernetes' or 'none', got {progress_type!r}")
    if progress_type == "kubernetes":
        missing = [k for k in ("group", "version", "plural", "namespace", "name") if not raw_progress.get(k)]
        if missing:
            raise ConfigError(
                f"{_where(source)}: progress.type is 'kubernetes' but progress lacks {', '.join(missing)}"
            )
    progress = ProgressTarget(
        type=progress_type,
        group=raw_progress.get("group"),
        version=raw_progress.get("version"),
        plural=raw_progress.get("plural"),
        namespace=raw_progress.get("namespace"),
        name=raw_progress.get("name"),
    )
    metadata = document.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ConfigError(f"{_where(source)}: metadata must be an object")
    return TrainerConfig(
        kind=str(kind),
        spec=spec,
        paths=paths,
        progress=progress,
        metadata=metadata,
        api_version=str(document.get("apiVersion", "kubetune.io/v1alpha1")),
        source=Path(source) if source != "<memory>" else None,
    )


def load_config(path: str | Path = DEFAULT_CONFIG_PATH) -> TrainerConfig:
    """Read and check the config file the operator mounted (or `kubetune run` wrote)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"trainer config {path} does not exist; the operator mounts it from the ConfigMap "
            "<job>-config, or pass --config PATH"
        ) from None
    except OSError as exc:
        raise ConfigError(f"trainer config {path} cannot be read: {exc}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"trainer config {path} is not valid JSON: {exc}") from None
    return parse_config(document, path)
