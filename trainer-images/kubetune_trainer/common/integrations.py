"""Experiment trackers named in `spec.integrations` (MLflow, Weights & Biases).

Shape (optional block of both job kinds):
    integrations:
      mlflow: {tracking_uri: str, experiment_name: str|null, token_secret: {name, key}|null} | null
      wandb:  {project: str, entity: str|null, api_key_secret: {name, key}|null} | null
The operator maps the secret references to the env variables
MLFLOW_TRACKING_TOKEN and WANDB_API_KEY, which both clients read themselves.
The clients are imported only when configured, so the trainer runs without
them; a configured tracker whose client is missing is an error, not a silent
skip. Only rank 0 logs.
"""

from __future__ import annotations

import sys
from typing import Any

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
    def from_spec(cls, spec: dict[str, Any], *, run_name: str, rank: int = 0) -> IntegrationLogger:
        logger = cls()
        integrations = spec.get("integrations") or {}
        if rank != 0 or not integrations:
            return logger
        params = flatten_params(spec)
        mlflow_cfg = integrations.get("mlflow")
        if mlflow_cfg:
            logger._start_mlflow(mlflow_cfg, run_name, params)
        wandb_cfg = integrations.get("wandb")
        if wandb_cfg:
            logger._start_wandb(wandb_cfg, run_name, params)
        return logger

    @property
    def active(self) -> bool:
        return self._mlflow_run is not None or self._wandb_run is not None

    def _start_mlflow(self, cfg: dict[str, Any], run_name: str, params: dict[str, Any]) -> None:
        try:
            import mlflow
        except ImportError as exc:
            raise TrainerError(
                "spec.integrations.mlflow is set but the mlflow client is not installed in this "
                "trainer image; install mlflow-skinny or remove integrations.mlflow"
            ) from exc
        tracking_uri = cfg.get("tracking_uri")
        if not tracking_uri:
            raise TrainerError("spec.integrations.mlflow.tracking_uri is required")
        mlflow.set_tracking_uri(tracking_uri)
        # The API documents the job's name as the default experiment.
        mlflow.set_experiment(cfg.get("experiment_name") or run_name)
        self._mlflow = mlflow
        self._mlflow_run = mlflow.start_run(run_name=run_name)
        # MLflow caps a param value at 6000 chars; stringify so lists/None are accepted.
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})

    def _start_wandb(self, cfg: dict[str, Any], run_name: str, params: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise TrainerError(
                "spec.integrations.wandb is set but the wandb client is not installed in this "
                "trainer image; install wandb or remove integrations.wandb"
            ) from exc
        if not cfg.get("project"):
            raise TrainerError("spec.integrations.wandb.project is required")
        self._wandb_run = wandb.init(
            project=cfg["project"], entity=cfg.get("entity"), name=run_name, config=params, reinit=True
        )

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
