"""The repository's UnslothJob examples, rendered as the operator renders them, map and run unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from unsloth_helpers import REPO_ROOT, config_document, parsed

from kubetune_api.unsloth import UnslothJobSpec
from kubetune_trainer.unsloth.mapping import DeviceCapabilities, effective_settings, map_spec

EXAMPLES = sorted((REPO_ROOT / "examples").glob("unsloth-*.yaml"))
CPU = DeviceCapabilities("cpu", "x86_64 with AVX512-BF16", bf16=True, fp16=False, bnb_4bit=True, bnb_8bit=False)
GPU = DeviceCapabilities("cuda", "NVIDIA A100", bf16=True, fp16=True, bnb_4bit=True, bnb_8bit=True)


def example_spec(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    assert document["kind"] == "UnslothJob", path
    spec: dict[str, Any] = UnslothJobSpec.model_validate(document["spec"]).model_dump(mode="json")
    return spec


def test_there_are_examples() -> None:
    assert EXAMPLES, "examples/unsloth-*.yaml are gone; this test would check nothing"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_maps_on_gpu_unchanged_and_on_cpu_with_named_substitutions(path: Path) -> None:
    spec = example_spec(path)
    has_validation = spec["dataset"]["validation_path"] is not None
    requested = map_spec(
        parsed(config_document(spec, validation_data="/kubetune/data/validation" if has_validation else None))
    )
    _, gpu_subs = effective_settings(requested, GPU)
    assert gpu_subs == [], f"{path.name}: a GPU must run every field as written"
    _, cpu_subs = effective_settings(requested, CPU)
    assert all(s.reason for s in cpu_subs)


@pytest.mark.training
def test_qlora_example_runs_unchanged_on_cpu(
    tmp_path: Path, tiny_llama_dir: Path, task_data: dict[str, Path], restore_environ: None
) -> None:
    """examples/unsloth-qlora.yaml as the ConfigMap carries it; only the mounted paths are local."""
    from kubetune_trainer.common import load_config
    from kubetune_trainer.unsloth.train import run

    spec = example_spec(REPO_ROOT / "examples" / "unsloth-qlora.yaml")
    document = config_document(
        spec,
        model=tiny_llama_dir,
        training_data=task_data["train"],
        validation_data=task_data["validation"],
        output=tmp_path / "output",
        name="smollm2-qlora",
    )
    config = tmp_path / "config.json"
    config.write_text(json.dumps(document))
    result = run(load_config(config))
    assert result["global_step"] == spec["schedule"]["max_steps"]
    assert (tmp_path / "output" / "adapter" / "adapter_model.safetensors").exists()
    lines = [json.loads(x) for x in (tmp_path / "output" / "metrics.jsonl").read_text().splitlines()]
    evals = [m["step"] for m in lines if "val_loss" in m]
    assert evals == list(
        range(spec["schedule"]["eval_steps"], spec["schedule"]["max_steps"] + 1, spec["schedule"]["eval_steps"])
    )
