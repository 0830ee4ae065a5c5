"""`kubetune run` end to end on a tiny Llama: the same manifest a cluster takes,
trained here by the real trainer entrypoint of each backend, with progress,
metrics, a loss plot and the output the job's method names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from tiny_llama import task_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[3]


def unsloth_python() -> str:
    venv = subprocess.run(
        ["bash", "hack/venv.sh", "unsloth", "trainer-images/unsloth/requirements.txt"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout.strip()
    return f"{venv}/bin/python"


def manifests(tmp: Path, model_dir: Path, job: dict[str, Any], rows_kind: str = "prompt_completion") -> Path:
    write_jsonl(tmp / "data" / "train.jsonl", task_rows(48, kind=rows_kind, seed=3))
    entities = [
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "Model",
            "metadata": {"name": "tiny"},
            "spec": {"format": "full", "storage": {"localPath": str(model_dir)}},
        },
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "Fileset",
            "metadata": {"name": "rows"},
            "spec": {"storage": {"localPath": "data"}},
        },
    ]
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump_all([job, *entities]))
    return path


def kubetune_run(*args: str, python: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'operator'}{os.pathsep}{ROOT / 'trainer-images'}"}
    extra = ["--python", python] if python else []
    return subprocess.run(
        [sys.executable, "-m", "kubetune", "run", *args, *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )


def automodel_job(name: str, **spec: Any) -> dict[str, Any]:
    """An AutomodelJob on the tiny model and the `rows` fileset of manifests()."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AutomodelJob",
        "metadata": {"name": name},
        "spec": {"model": "tiny", "dataset": {"training": "rows"}, **spec},
    }


def test_automodel_lora(tiny_llama_dir: Path, tmp_path: Path) -> None:
    job = automodel_job(
        "tiny-lora",
        training={"max_seq_length": 64},
        schedule={"max_steps": 4, "seed": 1},
        batch={"global_batch_size": 4, "micro_batch_size": 2},
        optimizer={"learning_rate": 1.0e-3},
    )
    out = tmp_path / "out"
    result = kubetune_run("-f", str(manifests(tmp_path, tiny_llama_dir, job)), "--output", str(out))
    assert result.returncode == 0, result.stdout + result.stderr + (out / "trainer.log").read_text()
    assert "4/4" in result.stdout and "loss" in result.stdout
    assert f"output: {out / 'adapter'}" in result.stdout
    assert (out / "adapter" / "adapter_config.json").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert (out / "loss.png").stat().st_size > 1000


def test_automodel_two_cpu_processes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    job = automodel_job(
        "tiny-dp",
        training={"max_seq_length": 64},
        schedule={"max_steps": 2, "seed": 1},
        batch={"global_batch_size": 4, "micro_batch_size": 1},
        parallelism={"num_gpus_per_node": 2},
    )
    out = tmp_path / "out"
    path = manifests(tmp_path, tiny_llama_dir, job)
    refused = kubetune_run("-f", str(path), "--output", str(out))
    assert refused.returncode == 1 and "--cpu-processes 2" in refused.stderr
    result = kubetune_run("-f", str(path), "--output", str(out), "--cpu-processes", "2")
    assert result.returncode == 0, result.stdout + result.stderr + (out / "trainer.log").read_text()
    assert (out / "adapter" / "adapter_config.json").exists()


def test_unsloth_lora(tiny_llama_dir: Path, tmp_path: Path) -> None:
    job = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "UnslothJob",
        "metadata": {"name": "tiny-unsloth"},
        "spec": {
            "model": {"name": "tiny", "load_in_4bit": False, "max_seq_length": 64},
            "dataset": {"path": "rows", "apply_chat_template": True},
            "training": {"lora": {"rank": 4, "alpha": 8}},
            "schedule": {"max_steps": 3},
            "optimizer": {"optim": "adamw_torch"},
        },
    }
    out = tmp_path / "out"
    path = manifests(tmp_path, tiny_llama_dir, job, rows_kind="messages")
    without = kubetune_run("-f", str(path), "--output", str(out), python=sys.executable)
    assert without.returncode == 1 and "KUBETUNE_UNSLOTH_PYTHON" in without.stderr
    result = kubetune_run("-f", str(path), "--output", str(out), python=unsloth_python())
    assert result.returncode == 0, result.stdout + result.stderr + (out / "trainer.log").read_text()
    assert (out / "adapter" / "adapter_config.json").exists()
    assert any("loss" in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())


def test_failure_reports_the_trainers_reason(tmp_path: Path) -> None:
    job = automodel_job("tiny-bad", schedule={"max_steps": 1})
    out = tmp_path / "out"
    path = manifests(tmp_path, tmp_path / "not-a-model", job)
    (tmp_path / "not-a-model").mkdir()
    result = kubetune_run("-f", str(path), "--output", str(out))
    assert result.returncode == 1
    assert "the trainer failed (exit 1)" in result.stdout and "config.json" in result.stdout
    assert (out / "termination-log").read_text().strip()
