"""Logit distillation: ratio 0 is plain SFT, KD moves the student toward the teacher,
a foreign vocabulary is refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from automodel_helpers import Job, run_in_process, tiny_spec
from tiny_llama import build_tiny_llama

from kubetune_trainer.common.termination import TrainerError

pytestmark = pytest.mark.training


def distillation_spec(ratio: float, **overrides: object) -> dict[str, object]:
    training = {
        "training_type": "distillation",
        "teacher_model": "teacher",
        "teacher_precision": "bf16",  # upcast to fp32 on CPU (logged)
        "distillation_ratio": ratio,
        "distillation_temperature": 2.0,
        "offload_teacher": True,  # no-op on CPU: the teacher already lives in CPU memory
    }
    return tiny_spec(training=training, **overrides)  # type: ignore[arg-type]


def test_ratio_zero_equals_sft(make_job: Callable[..., Job], tiny_teacher_dir: Path) -> None:
    sft = make_job(tiny_spec(), name="sft")
    distilled = make_job(distillation_spec(0.0), name="kd0", teacher_model=tiny_teacher_dir)
    assert run_in_process(sft) == 0
    assert run_in_process(distilled) == 0
    # (1 - 0) * CE + 0 * KL is CE exactly: identical float operations for the student.
    torch.testing.assert_close(
        torch.tensor(distilled.train_losses()), torch.tensor(sft.train_losses()), rtol=0, atol=1e-7
    )
    kd = [m["kd_loss"] for m in distilled.metrics() if "kd_loss" in m]
    assert len(kd) == 4 and all(k > 0 for k in kd)


def test_distillation_moves_the_student_toward_the_teacher(
    make_job: Callable[..., Job], tiny_teacher_dir: Path
) -> None:
    job = make_job(
        distillation_spec(1.0, schedule={"max_steps": 8}, optimizer={"learning_rate": 1e-2}),
        name="kd1",
        teacher_model=tiny_teacher_dir,
    )
    assert run_in_process(job) == 0
    val = [(m["step"], m["val_kl"]) for m in job.metrics() if "val_kl" in m]
    assert val[0][0] == 0 and val[-1][0] == 8
    first, last = val[0][1], val[-1][1]
    # KL(teacher || student) on held-out data must drop clearly, not by noise.
    assert last < 0.8 * first, val


def test_teacher_with_another_vocabulary_is_refused(make_job: Callable[..., Job], tmp_path: Path) -> None:
    foreign = build_tiny_llama(tmp_path / "foreign-teacher", vocab_size=320)
    job = make_job(distillation_spec(0.5), teacher_model=foreign)
    with pytest.raises(
        TrainerError, match=r"teacher's vocabulary \(320 tokens.*differs from the student's \(384 tokens"
    ):
        run_in_process(job)
