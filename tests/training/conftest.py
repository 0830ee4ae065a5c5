"""Shared fixtures of the training tiers: a tiny Llama built once per session and
a writer for trainer config files (docs/CONTRACT.md section 1).

Imports no torch at module level; both the Automodel (`test`) and the Unsloth
venv load this file.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_llama import build_tiny_llama
from trainer_config import (
    AUTOMODEL_DEFAULT_SPEC,
    REPO_ROOT,
    automodel_spec,
    deep_merge,
    write_trainer_config,
)

__all__ = ["AUTOMODEL_DEFAULT_SPEC", "REPO_ROOT", "automodel_spec", "deep_merge", "write_trainer_config"]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama (hidden 48, 2 layers, vocab 384) + chat tokenizer, fp32."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bigger tiny Llama with the same tokenizer: a distillation teacher."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-teacher"), hidden_size=64, intermediate_size=128, seed=1)


@pytest.fixture
def config_writer(tmp_path: Path) -> Callable[..., Path]:
    """`config_writer(spec=..., model=..., training_data=..., output=...)` -> path of a config.json."""
    counter = iter(range(1_000_000))

    def write(**kwargs: Any) -> Path:
        return write_trainer_config(tmp_path / f"config-{next(counter)}.json", **kwargs)

    return write
