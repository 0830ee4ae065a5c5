"""Helpers of the Automodel training tests: write a job, run the trainer, read its metrics.

Imported by the tests as `automodel_helpers`; the fixtures are re-exported by conftest.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from tiny_llama import task_rows, write_jsonl
from trainer_config import REPO_ROOT, automodel_spec, deep_merge, write_trainer_config


@dataclass
class Job:
    config: Path
    output: Path

    def metrics(self) -> list[dict[str, Any]]:
        from kubetune_trainer.common.metrics import MetricsWriter

        return MetricsWriter.read(self.output / "metrics.jsonl")

    def train_losses(self) -> list[float]:
        return [m["loss"] for m in self.metrics() if "loss" in m]

    def val_losses(self) -> list[tuple[int, float]]:
        return [(m["step"], m["val_loss"]) for m in self.metrics() if "val_loss" in m]


def tiny_spec(**overrides: Any) -> dict[str, Any]:
    """A small, fast job: seq 64, global batch 8 in micro batches of 4, seeded."""
    base = {
        "training": {"max_seq_length": 64, "lora": {"rank": 8, "alpha": 16, "merge": False, "target_modules": None}},
        "schedule": {"max_steps": 4, "seed": 7},
        "batch": {"global_batch_size": 8, "micro_batch_size": 4},
        "optimizer": {"learning_rate": 5e-3, "warmup_steps": 1, "weight_decay": 0.01},
    }
    return automodel_spec(**deep_merge(base, overrides))


@pytest.fixture(scope="session")
def task_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 prompt/completion rows of the addition task."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", task_rows(64, seed=3))


@pytest.fixture(scope="session")
def task_validation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("val") / "val.jsonl", task_rows(8, seed=99))


@pytest.fixture
def make_job(tmp_path: Path, tiny_llama_dir: Path, task_data: Path, task_validation: Path) -> Callable[..., Job]:
    counter = iter(range(1000))

    def make(spec: dict[str, Any], *, name: str | None = None, **paths: Any) -> Job:
        label = name or f"job{next(counter)}"
        output = tmp_path / label / "output"
        kwargs: dict[str, Any] = {
            "model": tiny_llama_dir,
            "training_data": task_data,
            "validation_data": task_validation,
            "output": output,
        }
        kwargs.update(paths)
        config = write_trainer_config(tmp_path / label / "config.json", spec=spec, **kwargs)
        return Job(config=config, output=output)

    return make


def admitted_and_runs(raw_spec: dict[str, Any], parallel: Any, **trainer_options: Any) -> tuple[bool, bool]:
    """Whether the API admits an AutomodelJob spec, and whether the trainer's own parallelism
    check accepts its layout (`parallel`: a ParallelSettings): the two must agree."""
    from pydantic import ValidationError

    from kubetune_api.automodel import AutomodelJobSpec
    from kubetune_trainer.automodel.distributed import check_parallel_support
    from kubetune_trainer.common.config import ConfigError

    try:
        AutomodelJobSpec.model_validate(raw_spec)
        admitted = True
    except ValidationError:
        admitted = False
    try:
        check_parallel_support(parallel, **trainer_options)
        runs = True
    except ConfigError:
        runs = False
    return admitted, runs


def run_in_process(job: Job) -> int:
    """Run the trainer in this process (no torch start-up per run; what most tests need)."""
    from kubetune_trainer.automodel.train import train
    from kubetune_trainer.common.config import load_config

    return train(load_config(job.config))


def trainer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "trainer-images"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = "1"
    for key in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE", "PET_NNODES", "PET_NPROC_PER_NODE"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def run_entrypoint(
    job: Job, *, extra_env: dict[str, str] | None = None, launcher: list[str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run `python -m kubetune_trainer.automodel --config ...` (optionally under a launcher) in a subprocess."""
    command = [*(launcher or [sys.executable]), "-m", "kubetune_trainer.automodel", "--config", str(job.config)]
    return subprocess.run(command, env=trainer_env(extra_env), capture_output=True, text=True, timeout=timeout)


class StatusServer(HTTPServer):
    """A loopback stand-in for the API server's /status endpoint: it records each merge patch."""

    patches: list[tuple[str, dict[str, str], dict[str, Any]]]

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def progress(self) -> list[dict[str, Any]]:
        """status.progress of each patch, in order."""
        return [body["status"]["progress"] for _, _, body in self.patches]


class _Handler(BaseHTTPRequestHandler):
    server: StatusServer

    def do_PATCH(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.patches.append((self.path, dict(self.headers), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def status_server() -> Iterator[StatusServer]:
    server = StatusServer(("127.0.0.1", 0), _Handler)
    server.patches = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
