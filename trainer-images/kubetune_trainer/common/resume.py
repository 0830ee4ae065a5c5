"""spec.resume_from, on the trainer's side: the other job's checkpoint it was handed."""

from __future__ import annotations

from pathlib import Path

from kubetune_api import constants as c
from kubetune_trainer.common.termination import TrainerError


def checkpoint_at(path: Path) -> Path:
    """A checkpoint directory named directly (paths.resume_from): it must be complete (both
    trainers write CHECKPOINT_STATE_FILE last)."""
    if not (path / c.CHECKPOINT_STATE_FILE).exists():
        raise TrainerError(
            f"{path} holds no complete checkpoint ({c.CHECKPOINT_STATE_FILE} is missing): spec.resume_from must name "
            "a checkpoint its job lists in status.progress.checkpoints"
        )
    return path
