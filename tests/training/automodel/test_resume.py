"""Checkpoints: a run stopped at step k and restarted continues the loss curve as if uninterrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from automodel_helpers import Job, run_entrypoint, run_in_process, tiny_spec, trainer_env

from kubetune_api.constants import EXIT_PREEMPTED
from kubetune_trainer.automodel.train import STOP_AFTER_STEP_ENV

pytestmark = pytest.mark.training

# Same seed, same data order, same restored optimizer/scheduler state and no
# dropout: the resumed steps run the same float operations in the same order,
# so on CPU the losses agree to float32 round-off.
RESUME_TOLERANCE = 1e-6


@pytest.mark.parametrize("finetuning_type", ["lora", "all_weights"])
def test_stop_at_step_k_and_resume_continues_the_curve(
    make_job: Callable[..., Job], monkeypatch: pytest.MonkeyPatch, finetuning_type: str
) -> None:
    overrides = {
        "training": {"finetuning_type": finetuning_type},
        "schedule": {"max_steps": 6, "val_check_interval": 2},
    }
    if finetuning_type == "all_weights":
        overrides["training"]["lora"] = None  # type: ignore[index]
    reference = make_job(tiny_spec(**overrides), name="reference")
    assert run_in_process(reference) == 0

    job = make_job(tiny_spec(**overrides), name="interrupted")
    monkeypatch.setenv(STOP_AFTER_STEP_ENV, "3")
    assert run_in_process(job) == EXIT_PREEMPTED
    assert (job.output / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    assert [m["step"] for m in job.metrics() if "loss" in m] == [1, 2, 3]
    monkeypatch.delenv(STOP_AFTER_STEP_ENV)
    assert run_in_process(job) == 0

    assert [m["step"] for m in job.metrics() if "loss" in m] == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(
        torch.tensor(job.train_losses()), torch.tensor(reference.train_losses()), rtol=0, atol=RESUME_TOLERANCE
    )
    assert [s for s, _ in job.val_losses()] == [s for s, _ in reference.val_losses()] == [0, 2, 4, 6]
    lrs = [m["lr"] for m in job.metrics() if "lr" in m]
    assert lrs == [m["lr"] for m in reference.metrics() if "lr" in m]
    assert not (job.output / "checkpoints").exists()  # removed after a successful finish


def test_sigterm_saves_a_checkpoint_and_exits_nonzero(make_job: Callable[..., Job], tmp_path: Path) -> None:
    """A real SIGTERM to the trainer process (what the kubelet sends on preemption)."""
    job = make_job(tiny_spec(schedule={"max_steps": 100000, "epochs": 100000}), name="sigterm")
    termination_log = tmp_path / "termination-log"
    process = subprocess.Popen(
        [sys.executable, "-m", "kubetune_trainer.automodel", "--config", str(job.config)],
        env=trainer_env({"KUBETUNE_TERMINATION_LOG": str(termination_log)}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = job.output / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and '"loss"' in metrics.read_text()):
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the trainer logged no training step within 300 s"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == EXIT_PREEMPTED, output[-3000:]
    stopped_at = max(m["step"] for m in job.metrics() if "loss" in m)
    assert (job.output / "checkpoints" / "latest").read_text().strip() == f"step-{stopped_at:07d}"
    assert f"stopped by signal at step {stopped_at}/" in termination_log.read_text()

    # The restarted pod resumes at that step: one more step, then stopped by the hook.
    again = run_entrypoint(job, extra_env={STOP_AFTER_STEP_ENV: str(stopped_at + 1)})
    assert again.returncode == EXIT_PREEMPTED, again.stderr[-3000:]
    assert f"resumed from {job.output / 'checkpoints' / f'step-{stopped_at:07d}'} at step {stopped_at}" in again.stderr
    steps = [m["step"] for m in job.metrics() if "loss" in m]
    assert steps == list(range(1, stopped_at + 2))
