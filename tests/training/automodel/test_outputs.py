"""LoRA, merged LoRA and full-weight outputs are Hugging Face directories that reload and generate."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from automodel_helpers import Job, run_in_process, tiny_spec
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.training


def _generate(model: torch.nn.Module, tokenizer_dir: Path) -> str:
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    inputs = tokenizer("what is two plus three? ", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)  # type: ignore[operator]
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5 or out[0, -1] == tokenizer.eos_token_id
    return str(tokenizer.decode(out[0][inputs["input_ids"].shape[1] :]))


def test_lora_adapter_reloads_with_peft_and_generates(make_job: Callable[..., Job], tiny_llama_dir: Path) -> None:
    job = make_job(tiny_spec())
    assert run_in_process(job) == 0
    adapter = job.output / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert json.loads((job.output / "result.json").read_text())["kind"] == "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    # target_modules null = every linear layer except the head.
    leaves = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    model = PeftModel.from_pretrained(base, str(adapter))
    _generate(model, adapter)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    # lora_B starts at zero; training must have moved it.
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())
    metrics = job.metrics()
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert all(
        {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_second"} <= m.keys() for m in metrics if "loss" in m
    )
    assert [m["step"] for m in metrics if "val_loss" in m] == [0, 4]


def test_target_modules_restrict_the_adapter(make_job: Callable[..., Job]) -> None:
    job = make_job(tiny_spec(training={"lora": {"target_modules": ["q_proj", "v_proj"]}}, schedule={"max_steps": 1}))
    assert run_in_process(job) == 0
    config = json.loads((job.output / "adapter" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}


def test_merged_lora_equals_base_plus_adapter(
    make_job: Callable[..., Job], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    spec = tiny_spec(training={"finetuning_type": "lora_merged", "lora": {"merge": True}}, schedule={"max_steps": 3})
    merged_job = make_job(spec, name="merged")
    assert run_in_process(merged_job) == 0
    # The same run with finetuning_type lora gives the adapter that was merged.
    adapter_job = make_job(tiny_spec(schedule={"max_steps": 3}), name="adapter")
    assert run_in_process(adapter_job) == 0

    merged_dir = merged_job.output / "model"
    assert json.loads((merged_job.output / "result.json").read_text())["kind"] == "full"
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    _generate(merged, merged_dir)
    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    adapter = load_file(str(adapter_job.output / "adapter" / "adapter_model.safetensors"))
    merged_weights = load_file(str(merged_dir / "model.safetensors"))
    scale = 16 / 8  # alpha / rank
    checked = 0
    for key, base_weight in base.items():
        stem = key.removesuffix(".weight")
        a_key = f"base_model.model.{stem}.lora_A.weight"
        b_key = f"base_model.model.{stem}.lora_B.weight"
        if a_key in adapter:
            expected = base_weight + scale * adapter[b_key] @ adapter[a_key]
            torch.testing.assert_close(merged_weights[key], expected, rtol=1e-5, atol=1e-6)
            checked += 1
        else:
            torch.testing.assert_close(merged_weights[key], base_weight)
    assert checked == 2 * 7  # 2 layers x 7 projections


def test_all_weights_model_reloads_and_changed(make_job: Callable[..., Job], tiny_llama_dir: Path) -> None:
    job = make_job(tiny_spec(training={"finetuning_type": "all_weights", "lora": None}, schedule={"max_steps": 2}))
    assert run_in_process(job) == 0
    model_dir = job.output / "model"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    _generate(model, model_dir)
    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    trained = load_file(str(model_dir / "model.safetensors"))
    assert base.keys() == trained.keys()
    assert not torch.equal(base["model.layers.0.mlp.down_proj.weight"], trained["model.layers.0.mlp.down_proj.weight"])


def test_epochs_and_fractional_validation_cadence(make_job: Callable[..., Job], tmp_path: Path) -> None:
    from tiny_llama import task_rows, write_jsonl

    data = write_jsonl(tmp_path / "small" / "train.jsonl", task_rows(20, seed=8))
    # 20 rows / global batch 8 = 2 steps per epoch (4 rows dropped); 0.5 epoch = every step.
    job = make_job(tiny_spec(schedule={"max_steps": None, "epochs": 2, "val_check_interval": 0.5}), training_data=data)
    assert run_in_process(job) == 0
    metrics = job.metrics()
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert [m["epoch"] for m in metrics if "loss" in m] == [0.5, 1.0, 1.5, 2.0]
    assert [m["step"] for m in metrics if "val_loss" in m] == [0, 1, 2, 3, 4]
    assert all(m["max_steps"] == 4 for m in metrics if "loss" in m)


@pytest.mark.parametrize(
    "interval,validated,saved",
    [
        (0.5, [0, 3, 5, 8, 10], [3, 5, 8]),  # mid-epoch (step 3 of 5) and every epoch end
        (1.0, [0, 5, 10], [5]),  # one epoch, not every step
        (1, [0, 5, 10], [5]),  # 1.0 as the API server stores it: the same
        (3, [0, 3, 5, 6, 9, 10], [3, 5, 6, 9]),  # a step count, and the epoch ends besides
    ],
)
def test_validation_and_checkpoints_follow_the_cadence_over_odd_epochs(
    make_job: Callable[..., Job],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    interval: float,
    validated: list[int],
    saved: list[int],
) -> None:
    from tiny_llama import task_rows, write_jsonl

    # 40 rows / global batch 8 = 5 steps per epoch: half an epoch is no whole step.
    data = write_jsonl(tmp_path / "odd" / "train.jsonl", task_rows(40, seed=8))
    job = make_job(
        tiny_spec(schedule={"max_steps": None, "epochs": 2, "val_check_interval": interval}), training_data=data
    )
    assert run_in_process(job) == 0
    assert [m["step"] for m in job.metrics() if "val_loss" in m] == validated
    # A checkpoint after every validation but the last (the run's end exports the model instead).
    logged = re.findall(r"kubetune-trainer: checkpoint \S+/step-(\d+)", capsys.readouterr().err)
    assert [int(s) for s in logged] == saved
