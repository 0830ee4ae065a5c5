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
from automodel_helpers import Job, StatusServer, run_entrypoint, run_in_process, tiny_spec, trainer_env

from kubetune_api.constants import EXIT_PREEMPTED
from kubetune_trainer.automodel.train import STOP_AFTER_STEP_ENV, train
from kubetune_trainer.common import ProgressReporter, load_config

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


def test_a_job_started_from_another_jobs_checkpoint_continues_its_curve(
    make_job: Callable[..., Job], monkeypatch: pytest.MonkeyPatch
) -> None:
    """spec.resume_from: job B starts at job A's step-3 checkpoint (mounted read only in a
    pod) and trains steps 4-6 exactly as an uninterrupted run; B's own restart then resumes
    from B's checkpoint, not from A's again; A's checkpoint is left as it was."""
    spec = tiny_spec(schedule={"max_steps": 6, "val_check_interval": 2})
    reference = make_job(spec, name="reference")
    assert run_in_process(reference) == 0

    source = make_job(spec, name="source")
    monkeypatch.setenv(STOP_AFTER_STEP_ENV, "3")
    assert run_in_process(source) == EXIT_PREEMPTED
    checkpoint = source.output / "checkpoints" / "step-0000003"
    before = sorted((p.relative_to(checkpoint), p.stat().st_mtime_ns) for p in checkpoint.rglob("*"))

    branch = make_job(spec, name="branch", resume_from=checkpoint)
    monkeypatch.setenv(STOP_AFTER_STEP_ENV, "5")
    assert run_in_process(branch) == EXIT_PREEMPTED
    assert (branch.output / "checkpoints" / "latest").read_text().strip() == "step-0000005"
    monkeypatch.delenv(STOP_AFTER_STEP_ENV)
    assert run_in_process(branch) == 0

    assert [m["step"] for m in branch.metrics() if "loss" in m] == [4, 5, 6]
    torch.testing.assert_close(
        torch.tensor(branch.train_losses()),
        torch.tensor(reference.train_losses()[3:]),
        rtol=0,
        atol=RESUME_TOLERANCE,
    )
    assert sorted((p.relative_to(checkpoint), p.stat().st_mtime_ns) for p in checkpoint.rglob("*")) == before


def test_a_resume_from_without_a_complete_checkpoint_fails_naming_the_field(make_job: Callable[..., Job]) -> None:
    from kubetune_trainer.common.termination import TrainerError

    empty = make_job(tiny_spec(), name="empty").output / "checkpoints" / "step-0000003"
    empty.mkdir(parents=True)
    job = make_job(tiny_spec(), name="orphan", resume_from=empty)
    with pytest.raises(TrainerError, match=r"no complete checkpoint .*spec\.resume_from"):
        run_in_process(job)


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


def test_the_status_lists_the_committed_checkpoint_and_a_restart_keeps_it(
    make_job: Callable[..., Job], monkeypatch: pytest.MonkeyPatch, status_server: StatusServer
) -> None:
    """Each save replaces the listed checkpoint (the trainer keeps one), with the validation
    loss of its step where one ran; the resumed pod lists the one it found on disk from its
    first patch; success removes the checkpoints and the list with them."""
    job = make_job(tiny_spec(schedule={"max_steps": 6, "val_check_interval": 2}), name="listed")
    cfg = load_config(job.config)
    on_claim = f"{cfg.metadata.name}/{cfg.metadata.uid}/checkpoints"
    monkeypatch.setenv(STOP_AFTER_STEP_ENV, "3")
    assert train(cfg, progress=ProgressReporter(status_server.url, min_interval_s=0.0)) == EXIT_PREEMPTED
    # 64 rows / global batch 8: 8 steps an epoch. Validated at 2 and saved; stopped and saved at 3.
    # Every patch carries the list; what it said, each time it changed:
    lists = [p["checkpoints"] for p in status_server.progress()]
    changes = [x for i, x in enumerate(lists) if i == 0 or x != lists[i - 1]]
    val_at_2 = dict(job.val_losses())[2]
    assert len(changes) == 3 and changes[0] == [], "nothing on disk before the first save"
    listed_2, listed_3 = changes[1:]
    assert listed_2 == [
        {
            "step": 2,
            "epoch": 0.25,
            "time": listed_2[0]["time"],
            "validationLoss": val_at_2,
            "path": f"{on_claim}/step-0000002",
        }
    ]
    assert listed_3 == [{"step": 3, "epoch": 0.375, "time": listed_3[0]["time"], "path": f"{on_claim}/step-0000003"}]
    assert listed_2[0]["time"] <= listed_3[0]["time"] and listed_3[0]["time"].endswith("Z")

    monkeypatch.delenv(STOP_AFTER_STEP_ENV)
    first_run = len(status_server.patches)
    assert train(load_config(job.config), progress=ProgressReporter(status_server.url, min_interval_s=0.0)) == 0
    resumed = status_server.progress()[first_run:]
    assert resumed[0]["step"] == 4 and resumed[0]["checkpoints"] == listed_3, "read back from disk, time included"
    assert [c["step"] for p in resumed for c in p["checkpoints"]][-1] == 4
    assert resumed[-1]["checkpoints"] == [] and not (job.output / "checkpoints").exists()
