"""Resumable checkpoints with torch.distributed.checkpoint (DCP).

One mechanism for every layout: DCP saves each rank's shard of FSDP/TP
DTensors and each pipeline stage's own parameters under their unchanged
fully-qualified names, and loads them back into the same layout (or, for the
final export, into a plain CPU model on rank 0).

`output/checkpoints/step-NNNNNNN/` holds the trainable parameters and optimizer
state (DCP files) and `trainer_state.json` (step, scheduler, seed); the file
`output/checkpoints/latest` names the newest complete one and is written
last, so a pod killed mid-save resumes from the previous checkpoint. Only that
one is kept: older ones are removed once it is committed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from kubetune_api import constants as c
from kubetune_api.status import Checkpoint
from kubetune_trainer.automodel.distributed import Runtime
from kubetune_trainer.common.config import TrainerConfig
from kubetune_trainer.common.progress import status_checkpoint

LATEST = "latest"
STATE_FILE = c.CHECKPOINT_STATE_FILE


@dataclass
class TrainerState:
    step: int
    seed: int
    scheduler: dict[str, Any]
    epoch: float
    # For the job's status only (resuming does not read it); checkpoints written before it
    # existed load with None.
    validation_loss: float | None = None


def _options(*, loading: bool = False) -> StateDictOptions:
    # Frozen base weights (LoRA) are not saved: they come from the model directory.
    return StateDictOptions(ignore_frozen_params=True, strict=not loading)


def _app_state(model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime) -> dict[str, Any]:
    # Pipeline stages hold different parameters, so their optimizer states
    # (whose param_groups would collide) are kept under per-stage keys.
    return {
        "model": get_model_state_dict(model, options=_options()),
        f"optim_pp{runtime.pp_rank}": get_optimizer_state_dict(model, optimizer, options=_options()),
    }


def latest_checkpoint(root: Path) -> Path | None:
    marker = root / LATEST
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    return path if (path / STATE_FILE).exists() else None


def read_state(path: Path) -> TrainerState:
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))


def listed_checkpoints(cfg: TrainerConfig, root: Path) -> list[Checkpoint]:
    """The committed checkpoint under `root` as the job's status lists it (none, or the one
    `latest` names: the others are being written or removed). Its time is when its state file
    was written, the last write before `latest` names it."""
    path = latest_checkpoint(root)
    if path is None:
        return []
    state = read_state(path)
    return [
        status_checkpoint(
            cfg,
            path,
            step=state.step,
            epoch=state.epoch,
            committed_at=(path / STATE_FILE).stat().st_mtime,
            validation_loss=state.validation_loss,
        )
    ]


def save_checkpoint(
    root: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainerState, runtime: Runtime
) -> Path:
    path = root / f"step-{state.step:07d}"
    if runtime.is_main and path.exists():
        shutil.rmtree(path)
    runtime.barrier()
    dcp_save(_app_state(model, optimizer, runtime), checkpoint_id=str(path), no_dist=not runtime.distributed)
    runtime.barrier()
    if runtime.is_main:
        (path / STATE_FILE).write_text(json.dumps(state.__dict__))
        tmp = root / f"{LATEST}.tmp"
        tmp.write_text(path.name + "\n")
        tmp.replace(root / LATEST)
        for old in root.glob("step-*"):
            if old != path and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()
    return path


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime) -> TrainerState:
    app_state = _app_state(model, optimizer, runtime)
    dcp_load(app_state, checkpoint_id=str(path), no_dist=not runtime.distributed)
    set_model_state_dict(model, app_state["model"], options=_options(loading=True))
    set_optimizer_state_dict(model, optimizer, app_state[f"optim_pp{runtime.pp_rank}"], options=_options(loading=True))
    return read_state(path)


def save_trainable_for_export(path: Path, model: nn.Module, runtime: Runtime) -> None:
    """All ranks: write the trained parameters (full model for all_weights) as a DCP checkpoint."""
    state = {"model": get_model_state_dict(model, options=_options())}
    runtime.barrier()
    dcp_save(state, checkpoint_id=str(path), no_dist=not runtime.distributed)
    runtime.barrier()


def load_trainable_into(path: Path, model: nn.Module) -> None:
    """Rank 0 only, no process group: fill a plain CPU model from `save_trainable_for_export`."""
    state = {"model": get_model_state_dict(model, options=_options())}
    dcp_load(state, checkpoint_id=str(path), no_dist=True)
    set_model_state_dict(model, state["model"], options=_options(loading=True))
