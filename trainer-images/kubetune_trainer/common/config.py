"""The trainer config file (docs/CONTRACT.md section 1), parsed into the operator's own models.

The envelope, the job specs and their cross-field rules are `kubetune_api`'s: the
same code validated the job in the API server's CEL twin, in the operator and in
`kubetune run`. Parsing here is therefore the whole check: a hand-written or stale
file fails with one line naming each bad field, before torch loads, and the
trainer reads typed attributes afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from kubetune_api import constants as c
from kubetune_api.trainer_config import (
    CONFIG_MODELS,
    AutomodelTrainerConfig,
    KubernetesProgress,
    NoProgress,
    TrainerPaths,
    UnslothTrainerConfig,
    parse_trainer_config,
)

DEFAULT_CONFIG_PATH = c.CONFIG_PATH
KNOWN_KINDS = tuple(CONFIG_MODELS)

TrainerConfig = AutomodelTrainerConfig | UnslothTrainerConfig
Config = TypeVar("Config", AutomodelTrainerConfig, UnslothTrainerConfig)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "AutomodelTrainerConfig",
    "ConfigError",
    "KubernetesProgress",
    "NoProgress",
    "TrainerConfig",
    "TrainerPaths",
    "UnslothTrainerConfig",
    "expect_kind",
    "load_config",
    "parse_config",
]


class ConfigError(ValueError):
    """The config file is missing, malformed or breaks the contract."""


def _problem(error: ErrorDetails) -> str:
    loc = [str(part) for part in error["loc"]]
    if loc and loc[0] in KNOWN_KINDS:  # the union's tag, not a field
        loc = loc[1:]
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        given = error["input"].get("kind") if isinstance(error["input"], dict) else None
        return f"kind must be one of {', '.join(KNOWN_KINDS)}, got {given!r}"
    if error["type"] == "cross_field":  # the message already names each field, as spec.a.b
        return error["msg"]
    where = ".".join(loc)
    return f"{where}: {error['msg']}" if where else error["msg"]


def parse_config(document: object, source: Path | str = "<memory>") -> TrainerConfig:
    """An already-parsed JSON document -> the typed config of its kind."""
    try:
        return parse_trainer_config(document)
    except ValidationError as exc:
        problems = "; ".join(_problem(error) for error in exc.errors())
        raise ConfigError(f"trainer config {source}: {problems}") from None


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


def expect_kind(cfg: TrainerConfig, kind: type[Config]) -> Config:
    """The config as the one kind this trainer runs, or a ConfigError saying which it got."""
    if not isinstance(cfg, kind):
        expected = next(k for k, model in CONFIG_MODELS.items() if model is kind)
        raise ConfigError(f"this trainer runs {expected} configs, got kind {cfg.kind!r}")
    return cfg
