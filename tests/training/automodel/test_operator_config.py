"""The config the operator renders into the job's ConfigMap runs unchanged through torchrun here.

Uses the operator's own pydantic model and renderer (kubetune.render), and the
launch the PyTorchJob builder uses (`torchrun --master-addr --master-port -m
kubetune_trainer.automodel --config ...`, node counts from PET_* variables).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from automodel_helpers import Job, run_entrypoint, run_in_process
from localcluster import free_port

from kubetune.api.resources import AUTOMODEL
from kubetune.render import NO_PROGRESS, TrainerPaths, dumps_config, render_trainer_config
from kubetune_api.automodel import AutomodelJobSpec

pytestmark = pytest.mark.training

MANIFEST_SPEC = {
    "model": "tiny-llama",
    "dataset": {"training": "addition-train", "validation": "addition-val"},
    "training": {"finetuning_type": "lora", "max_seq_length": 64, "lora": {"rank": 8, "alpha": 16}},
    "schedule": {"max_steps": 2, "seed": 5},
    "batch": {"global_batch_size": 8, "micro_batch_size": 2},
    "optimizer": {"learning_rate": 0.005},
    "parallelism": {"num_nodes": 1, "num_gpus_per_node": 2},
}


def _render(tmp_path: Path, name: str, model: Path, data: Path, validation: Path, parallelism: dict[str, int]) -> Job:
    spec = AutomodelJobSpec.model_validate({**MANIFEST_SPEC, "parallelism": parallelism})
    output = tmp_path / name / "output"
    paths = TrainerPaths(model=str(model), training_data=str(data), output=str(output), validation_data=str(validation))
    document = render_trainer_config(
        AUTOMODEL, name=name, namespace="default", uid="1234", spec=spec, paths=paths, progress=NO_PROGRESS
    )
    config = tmp_path / name / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text(dumps_config(document))
    return Job(config=config, output=output)


def test_rendered_configmap_config_runs_under_torchrun(
    tmp_path: Path, tiny_llama_dir: Path, task_data: Path, task_validation: Path
) -> None:
    job = _render(
        tmp_path, "cm-job", tiny_llama_dir, task_data, task_validation, {"num_nodes": 1, "num_gpus_per_node": 2}
    )
    # Defaults the trainer relies on were filled by the API layer, not by the test.
    rendered = json.loads(job.config.read_text())["spec"]
    assert rendered["training"]["lora"]["target_modules"] is None and rendered["optimizer"]["warmup_steps"] == 0
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
    ]
    result = run_entrypoint(
        job, launcher=torchrun, extra_env={"PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "0"}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((job.output / "result.json").read_text())["kind"] == "adapter"

    single = _render(
        tmp_path, "cm-single", tiny_llama_dir, task_data, task_validation, {"num_nodes": 1, "num_gpus_per_node": 1}
    )
    assert run_in_process(single) == 0
    torch.testing.assert_close(
        torch.tensor(job.train_losses()), torch.tensor(single.train_losses()), rtol=1e-5, atol=0.0
    )
