"""Fixtures of the Unsloth tier; helpers live in unsloth_helpers.py."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# This tier needs its own venv (unsloth pins transformers<=5.17 / trl<=1.15). Collected from
# another venv (e.g. `pytest tests/training` in the Automodel one), it is left out, and the
# report header says so and how to run it.
UNSLOTH_MISSING = importlib.util.find_spec("unsloth") is None or importlib.util.find_spec("trl") is None
if UNSLOTH_MISSING:
    collect_ignore_glob = ["*.py"]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if UNSLOTH_MISSING:
        terminalreporter.write_line(
            "tests/training/unsloth: NOT collected (unsloth/trl are not in this venv); run it with "
            "bash hack/run-in-venv.sh unsloth python -m pytest tests/training/unsloth -q"
        )


from tiny_llama import task_rows, write_jsonl  # noqa: E402
from unsloth_helpers import config_document  # noqa: E402


@pytest.fixture(scope="session")
def task_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Training (messages rows, chat template) and held-out validation (text rows) filesets."""
    root = tmp_path_factory.mktemp("unsloth-data")
    write_jsonl(root / "train" / "part-0.jsonl", task_rows(24, kind="messages", seed=0))
    write_jsonl(root / "train" / "part-1.jsonl", task_rows(24, kind="text", seed=1))
    write_jsonl(root / "validation" / "val.jsonl", task_rows(8, kind="text", seed=2))
    return {"train": root / "train", "validation": root / "validation"}


@pytest.fixture
def write_config(tmp_path: Path, tiny_llama_dir: Path, task_data: dict[str, Path]) -> Callable[..., Path]:
    """`write_config(spec, validation=True)` -> config.json for the tiny Llama; output in tmp_path/output."""

    def write(
        spec: dict[str, Any], *, validation: bool = True, output: Path | None = None, resume_from: Path | None = None
    ) -> Path:
        document = config_document(
            spec,
            model=tiny_llama_dir,
            training_data=task_data["train"],
            validation_data=task_data["validation"] if validation else None,
            output=output or tmp_path / "output",
            resume_from=resume_from,
        )
        path = tmp_path / "config.json"
        path.write_text(json.dumps(document, indent=2))
        return path

    return write


@pytest.fixture
def restore_environ() -> Iterator[None]:
    """The run sets CUDA_VISIBLE_DEVICES / tracker variables in os.environ; undo that per test."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
