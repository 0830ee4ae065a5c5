"""Experiment trackers named in `spec.integrations` (MLflow, Weights & Biases).

The block is `kubetune_api.common.Integrations`, typed and validated with the rest
of the spec. The operator maps its secret references to the env variables
MLFLOW_TRACKING_TOKEN and WANDB_API_KEY, which both clients read themselves.
The clients are imported only when configured, so the trainer runs without
them; a configured tracker whose client is missing is an error, not a silent
skip. Only rank 0 logs.
"""

from __future__ import annotations

import sys
from typing import Any

from kubetune_api.automodel import AutomodelJobSpec
from kubetune_api.common import MLflowIntegration, WandbIntegration
from kubetune_api.unsloth import UnslothJobSpec
from kubetune_trainer.common.termination import TrainerError


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    else:
        out[prefix] = value


def flatten_params(spec: dict[str, Any]) -> dict[str, Any]:
    """`{"training": {"lora": {"rank": 8}}}` -> `{"training.lora.rank": 8}`, integrations left out."""
    out: dict[str, Any] = {}
    _flatten("", {k: v for k, v in spec.items() if k != "integrations"}, out)
    return out


class IntegrationLogger:
    """Fan-out of params and metrics to the configured trackers; a no-op when none are."""

    def __init__(self) -> None:
        self._mlflow: Any = None
        self._mlflow_run: Any = None
        self._wandb_run: Any = None

    @classmethod
    def from_spec(cls, spec: AutomodelJobSpec | UnslothJobSpec, *, run_name: str, rank: int = 0) -> IntegrationLogger:
        logger = cls()
        integrations = spec.integrations
        if rank != 0 or integrations is None:
            return logger
        params = flatten_params(spec.model_dump(mode="json"))
        if integrations.mlflow is not None:
            logger._start_mlflow(integrations.mlflow, run_name, params)
        if integrations.wandb is not None:
            logger._start_wandb(integrations.wandb, run_name, params)
        return logger

    @property
    def active(self) -> bool:
        return self._mlflow_run is not None or self._wandb_run is not None

    def _start_mlflow(self, cfg: MLflowIntegration, run_name: str, params: dict[str, Any]) -> None:
        try:
            import mlflow
        except ImportError as exc:
            raise TrainerError(
                "spec.integrations.mlflow is set but the mlflow client is not installed in this "
                "trainer image; install mlflow-skinny or remove integrations.mlflow"
            ) from exc
        mlflow.set_tracking_uri(cfg.tracking_uri)
        # The API documents the job's name as the default experiment.
        mlflow.set_experiment(cfg.experiment_name or run_name)
        self._mlflow = mlflow
        self._mlflow_run = mlflow.start_run(run_name=run_name)
        # MLflow caps a param value at 6000 chars; stringify so lists/None are accepted.
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})

    def _start_wandb(self, cfg: WandbIntegration, run_name: str, params: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise TrainerError(
                "spec.integrations.wandb is set but the wandb client is not installed in this "
                "trainer image; install wandb or remove integrations.wandb"
            ) from exc
        self._wandb_run = wandb.init(project=cfg.project, entity=cfg.entity, name=run_name, config=params, reinit=True)

    def log_metrics(self, metrics: dict[str, Any], *, step: int) -> None:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if not numeric:
            return
        try:
            if self._mlflow_run is not None:
                self._mlflow.log_metrics(numeric, step=step)
            if self._wandb_run is not None:
                self._wandb_run.log(numeric, step=step)
        except Exception as exc:
            print(
                f"kubetune-trainer: logging metrics to a tracker failed (training continues): {exc}",
                file=sys.stderr,
                flush=True,
            )

    def close(self, *, success: bool = True) -> None:
        if self._mlflow_run is not None:
            self._mlflow.end_run(status="FINISHED" if success else "FAILED")
            self._mlflow_run = None
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=0 if success else 1)
            self._wandb_run = None
