"""Real Unsloth runs on the tiny Llama, on Unsloth's CPU backend (unsloth 2026.10.9).

Each run is a few steps on 2 cores. The entrypoint runs are subprocesses, as in
the pod; the others call `train.run` in-process to save the import time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Before transformers / peft, as in the trainer: importing unsloth patches them.
import unsloth  # noqa: F401
from unsloth_helpers import REPO_ROOT, parsed, read_metrics, run_entrypoint, unsloth_spec

from kubetune_api.constants import EXIT_PREEMPTED
from kubetune_trainer.common import load_config
from kubetune_trainer.unsloth.mapping import DeviceCapabilities, effective_settings, map_spec

pytestmark = pytest.mark.training

CPU_BANNER = "no GPU found, training on CPU"


def short_spec(**overrides: Any) -> dict[str, Any]:
    """A few steps at a learning rate a tiny random model visibly learns with."""
    base: dict[str, Any] = {
        "model": {"max_seq_length": 64},
        "dataset": {"apply_chat_template": True, "validation_path": "validation"},
        "schedule": {"max_steps": 8, "eval_steps": 4, "save_steps": 4},
        "batch": {"per_device_train_batch_size": 4},
        "optimizer": {"learning_rate": 3e-3},
    }
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return unsloth_spec(**base)


def run_in_process(config: Path) -> dict[str, Any]:
    from kubetune_trainer.unsloth.train import run

    result: dict[str, Any] = run(load_config(config))
    return result


def config_paths(config: Path) -> dict[str, str]:
    paths: dict[str, str] = json.loads(config.read_text())["paths"]
    return paths


def expected_substitutions(config: Path, device: dict[str, Any]) -> list[dict[str, Any]]:
    """What the pure function predicts for the device the run reported."""
    document = json.loads(config.read_text())
    _, subs = effective_settings(map_spec(parsed(document)), DeviceCapabilities(**device))
    return [s.as_dict() for s in subs]


def generate(model: Any, tokenizer: Any) -> str:
    import torch

    inputs = tokenizer("what is two plus three?", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > inputs["input_ids"].shape[1], "generate() produced no token"
    return str(tokenizer.decode(out[0][inputs["input_ids"].shape[1] :]))


def test_lora_run_through_the_entrypoint(
    tmp_path: Path, write_config: Callable[..., Path], tiny_llama_dir: Path
) -> None:
    config = write_config(short_spec())
    done = run_entrypoint(config, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not (tmp_path / "termination-log").exists()
    assert CPU_BANNER in done.stdout + done.stderr
    # Which shape each file of the fileset was read as (part-0 holds messages rows, part-1 text rows).
    train_dir = config_paths(config)["training_data"]
    assert f"training data file {train_dir}/part-0.jsonl: messages=24 (text = column 'text')" in done.stderr
    assert f"training data file {train_dir}/part-1.jsonl: text=24 (text = column 'text')" in done.stderr

    output = tmp_path / "output"
    result = json.loads((output / "result.json").read_text())
    assert result["kind"] == "adapter" and result["output_dir"] == str(output / "adapter")
    assert result["device"]["kind"] == "cpu"

    # Every substitution was predicted by the pure function, logged as a warning, and recorded.
    predicted = expected_substitutions(config, result["device"])
    assert result["substitutions"] == predicted
    fields = {s["field"] for s in predicted}
    assert {"optimizer.optim", "training.use_gradient_checkpointing"} <= fields
    for sub in predicted:
        assert f"WARNING: {sub['field']}: requested {sub['requested']!r}" in done.stderr
    # 4-bit QLoRA really runs on this CPU when bitsandbytes passes Unsloth's probe, and not otherwise.
    assert result["quantized_4bit"] == result["device"]["bnb_4bit"]

    metrics = read_metrics(output)
    assert metrics[0]["event"] == "effective_settings" and metrics[0]["substitutions"] == predicted
    train = [m for m in metrics if "loss" in m]
    val = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in train] == list(range(1, 9))
    assert all({"epoch", "lr", "loss"} <= m.keys() for m in train)
    assert [m["step"] for m in val] == [4, 8]
    assert val[-1]["val_loss"] < val[0]["val_loss"] < 6.0, val  # ln(vocab 384) = 5.95 at random init
    assert sorted(p.name for p in (output / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]

    # The adapter reloads with plain transformers + peft and generates.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = output / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["r"] == 16 and adapter_config["lora_alpha"] == 16
    assert sorted(adapter_config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), adapter)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().max()) > 0 for p in lora_b), "the adapter was not trained"
    generate(model, tokenizer)


def test_merged_16bit_reloads_and_matches_base_plus_adapter(
    tmp_path: Path,
    write_config: Callable[..., Path],
    tiny_llama_dir: Path,
    restore_environ: None,
    capfd: pytest.CaptureFixture[str],
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = write_config(
        short_spec(
            output={"save_method": "merged_16bit"}, schedule={"eval_steps": None}, dataset={"validation_path": None}
        ),
        validation=False,
    )
    result = run_in_process(config)
    merged_dir = tmp_path / "output" / "model"
    assert result["kind"] == "full" and result["output_dir"] == str(merged_dir)
    if result["quantized_4bit"]:
        assert "Unsloth's CPU backend cannot merge into 4-bit weights" in capfd.readouterr().err

    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    # 16-bit weights: bfloat16 where the CPU has it natively, else float16 (what the trainer's
    # own merge from a 4-bit base picks). This machine decides: the previous CI machine had
    # AVX512-BF16, a later one (AMD EPYC without it) wrote float16.
    assert merged.dtype == (torch.bfloat16 if result["device"]["bf16"] else torch.float16), result["device"]
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    generate(merged, tokenizer)

    # Same function as base + the final checkpoint's adapter, merged in fp32.
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "output" / "checkpoints" / "checkpoint-8"
    ).merge_and_unload()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = tokenizer("what is one plus one? the answer is 2.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = merged(ids).logits.float()
        want = reference(ids).logits
        untrained = base(ids).logits
    assert torch.allclose(got, want, atol=0.05), float((got - want).abs().max())
    assert float((want - untrained).abs().max()) > 0.05, "the merge changed nothing"


def test_unsloth_cpu_backend_cannot_merge_into_4bit_itself(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Why the trainer merges merged_16bit itself when the CPU run is 4-bit (see train.save_output)."""
    from unsloth_zoo.cpu.runtime import cpu_bnb_4bit_supported

    if not cpu_bnb_4bit_supported():
        pytest.skip("bitsandbytes 4-bit does not run on this CPU, so no 4-bit model to merge into")
    from unsloth import FastLanguageModel  # type: ignore[attr-defined,unused-ignore]

    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_llama_dir), max_seq_length=64, load_in_4bit=True)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    model = FastLanguageModel.get_peft_model(model, r=4)
    with pytest.raises(NotImplementedError, match="4-bit model is not supported on CPU"):
        model.save_pretrained_merged(str(tmp_path / "m"), tokenizer, save_method="merged_16bit")
    with pytest.raises(NotImplementedError, match="not supported on CPU"):
        model.save_pretrained_merged(str(tmp_path / "m"), tokenizer, save_method="merged_4bit")


def test_full_weight_run_with_mlflow(
    tmp_path: Path, write_config: Callable[..., Path], tiny_llama_dir: Path, restore_environ: None
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tracking = tmp_path / "mlruns"
    # A local file store stands in for the tracking server (no network here); MLflow 3 wants the opt-in.
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    spec = short_spec(
        model={"load_in_4bit": False},
        training={"finetuning_type": "all_weights"},
        optimizer={"learning_rate": 1e-3},
        integrations={"mlflow": {"tracking_uri": tracking.as_uri(), "experiment_name": "unsloth-ci"}},
    )
    result = run_in_process(write_config(spec))
    model_dir = tmp_path / "output" / "model"
    assert result["kind"] == "full" and result["output_dir"] == str(model_dir)
    assert result["effective"]["from_pretrained"]["full_finetuning"] is True
    assert result["effective"]["get_peft_model"] is None

    trained = AutoModelForCausalLM.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    changed = [n for n, p in trained.named_parameters() if not torch.allclose(p.float(), base.state_dict()[n].float())]
    assert len(changed) > len(list(base.parameters())) // 2, "full-weight training left most weights unchanged"
    generate(trained, AutoTokenizer.from_pretrained(model_dir))

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking.as_uri())
    experiment = client.get_experiment_by_name("unsloth-ci")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and "loss" in runs[0].data.metrics


def test_cpu_substitutions_are_applied_logged_and_recorded(
    tmp_path: Path, write_config: Callable[..., Path], restore_environ: None, capfd: pytest.CaptureFixture[str]
) -> None:
    """A job asking for every GPU-only setting at once: 8-bit loading, packing, fp16, paged 8-bit AdamW."""
    spec = short_spec(
        model={"load_in_4bit": False, "load_in_8bit": True, "dtype": "float16"},
        dataset={"packing": True},
        optimizer={"optim": "paged_adamw_8bit"},
        hardware={"gpus": "0", "precision": "fp16"},
        schedule={"max_steps": 3, "eval_steps": None, "save_steps": None},
        integrations={"wandb": {"project": "kubetune-ci"}},
    )
    os.environ.update({"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"})
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)  # nothing set it: the spec's selection applies
    result = run_in_process(write_config(spec))
    err = capfd.readouterr().err
    got = {s["field"]: (s["requested"], s["effective"]) for s in result["substitutions"]}
    device = result["device"]
    precision = "bf16" if device["bf16"] else "fp16" if device["fp16"] else "fp32"
    assert got == {
        "model.load_in_8bit": (True, False),
        "model.dtype": ("float16", "bfloat16" if device["bf16"] else "float32"),
        **({"hardware.precision": ("fp16", precision)} if precision != "fp16" else {}),
        "optimizer.optim": ("paged_adamw_8bit", "adamw_torch_fused"),
        "dataset.packing": (True, False),
        "hardware.gpus": ("0", None),
        "training.use_gradient_checkpointing": ("unsloth", True),
    }
    for field in got:
        assert f"WARNING: {field}: requested" in err
    # What Unsloth built agrees with the prediction: nothing beyond it was changed on the way.
    assert result["quantized_8bit"] is False and result["quantized_4bit"] is False
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    sft = result["effective"]["sft_config"]
    assert (sft["optim"], sft["packing"], sft["fp16"]) == ("adamw_torch_fused", False, precision == "fp16")
    assert list((tmp_path / "wandb").glob("offline-run-*")), "the wandb integration wrote no run"


def test_merged_4bit_on_cpu_fails_before_training(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    config = write_config(short_spec(output={"save_method": "merged_4bit"}))
    done = run_entrypoint(config, tmp_path)
    assert done.returncode == 1
    reason = (tmp_path / "termination-log").read_text()
    assert reason.count("\n") == 1 and "merged_4bit cannot be written on cpu" in reason
    assert not (tmp_path / "output" / "checkpoints").exists(), "it trained before refusing"


def test_sigterm_checkpoints_and_the_restarted_pod_resumes(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    config = write_config(
        short_spec(schedule={"max_steps": 16, "save_steps": 2, "eval_steps": None}, dataset={"validation_path": None}),
        validation=False,
    )
    env = {
        **os.environ,
        "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log"),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "trainer-images"), str(REPO_ROOT / "operator")]),
    }
    checkpoints = tmp_path / "output" / "checkpoints"
    first = subprocess.Popen(
        [sys.executable, "-m", "kubetune_trainer.unsloth", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Wait for the first checkpoint (a state change, not a duration) before the "eviction".
        while not (checkpoints / "checkpoint-2" / "trainer_state.json").exists():
            assert first.poll() is None, first.stdout.read() if first.stdout else ""
            time.sleep(0.2)
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    # 143, not 1: the Job's podFailurePolicy fails the job at once on 1 (the trainer's own
    # error), and a preempted pod must be replaced and resume instead.
    assert first.returncode == EXIT_PREEMPTED, out[-3000:]
    assert "stopped by signal" in (tmp_path / "termination-log").read_text()
    stopped_at = max(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    assert 2 <= stopped_at < 16

    done = run_entrypoint(config, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"resuming from {checkpoints / f'checkpoint-{stopped_at}'}" in done.stderr
    result = json.loads((tmp_path / "output" / "result.json").read_text())
    assert result["resumed_from_step"] == stopped_at and result["global_step"] == 16
    steps = [m["step"] for m in read_metrics(tmp_path / "output") if "loss" in m]
    assert steps == list(range(1, 17)), "metrics.jsonl must read like one uninterrupted run"


def test_a_job_started_from_another_jobs_checkpoint_trains_on_from_its_step(
    tmp_path: Path, write_config: Callable[..., Path], restore_environ: None
) -> None:
    """spec.resume_from: the transformers Trainer resumes from the other job's checkpoint-2
    (weights, optimizer, scheduler, data position), so steps 3-4 repeat the source's."""
    spec = short_spec(schedule={"max_steps": 4, "save_steps": 2, "eval_steps": None}, dataset={"validation_path": None})
    source = run_in_process(write_config(spec, validation=False, output=tmp_path / "source"))
    assert source["global_step"] == 4
    checkpoint = tmp_path / "source" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").exists()

    branch = run_in_process(write_config(spec, validation=False, output=tmp_path / "branch", resume_from=checkpoint))
    assert branch["global_step"] == 4
    losses = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "source") if "loss" in m}
    branched = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "branch") if "loss" in m}
    assert sorted(branched) == [3, 4]
    assert branched == pytest.approx({step: losses[step] for step in (3, 4)}, rel=1e-4)


def test_rows_the_spec_cannot_read_fail_with_file_row_and_fix(
    tmp_path: Path, write_config: Callable[..., Path], restore_environ: None
) -> None:
    from kubetune_trainer.data import DataError

    # The messages rows of the training set without dataset.apply_chat_template.
    config = write_config(
        short_spec(dataset={"apply_chat_template": False, "validation_path": None}, schedule={"eval_steps": None}),
        validation=False,
    )
    with pytest.raises(DataError, match=r"part-0\.jsonl row 1: .*messages rows need apply_chat_template"):
        run_in_process(config)
    assert not (tmp_path / "output" / "checkpoints").exists()


def test_progress_patches_reach_the_job_status(
    tmp_path: Path, write_config: Callable[..., Path], restore_environ: None
) -> None:
    """The trainer's log events become status.progress merge patches (a loopback HTTP server stands in for
    the API server's /status endpoint; the in-cluster address and token come from the pod)."""
    import http.server
    import threading

    from kubetune_trainer.common import ProgressReporter
    from kubetune_trainer.unsloth.train import run

    patches: list[dict[str, Any]] = []

    class StatusEndpoint(http.server.BaseHTTPRequestHandler):
        def do_PATCH(self) -> None:
            assert self.headers["Content-Type"] == "application/merge-patch+json"
            patches.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StatusEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/apis/kubetune.io/v1alpha1/namespaces/default/unslothjobs/t/status"
        reporter = ProgressReporter(url, min_interval_s=0.0)
        cfg = load_config(write_config(short_spec()))
        run(cfg, progress=reporter)
    finally:
        server.shutdown()
    progress = [p["status"]["progress"] for p in patches]
    assert progress, "no progress patch arrived"
    last = progress[-1]
    assert last["step"] == 8 and last["maxSteps"] == 8
    assert "trainLoss" in last and "validationLoss" in last and "updatedAt" in last
    assert [h["step"] for h in last["history"]] == list(range(1, 9))
    # Saved at 4 and 8 (save_steps 4), each after the validation of its step (eval_steps 4).
    validated = {h["step"]: h["validationLoss"] for h in last["history"] if "validationLoss" in h}
    on_claim = f"unsloth-test/{cfg.metadata.uid}/checkpoints"  # <name>/<uid>: where the pod's mount is on the claim
    assert [(c["step"], c["path"], c["validationLoss"]) for c in last["checkpoints"]] == [
        (4, f"{on_claim}/checkpoint-4", validated[4]),
        (8, f"{on_claim}/checkpoint-8", validated[8]),
    ]
    assert last["checkpoints"][1]["epoch"] == last["epoch"]


def test_listed_checkpoints_are_the_complete_ones_with_the_validation_of_their_step(
    tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    """Read from the state trl saves with each checkpoint (written here by transformers' own
    TrainerState): a directory without it is still being written and is left out."""
    from transformers import TrainerState

    from kubetune_trainer.unsloth.train import listed_checkpoints

    cfg = load_config(write_config(short_spec()))
    root = cfg.paths.checkpoints
    logs = {
        4: [{"step": 2, "eval_loss": 2.5}, {"step": 4, "loss": 2.0}],  # no validation at step 4
        6: [{"step": 2, "eval_loss": 2.5}, {"step": 6, "loss": 1.8}, {"step": 6, "eval_loss": 1.9}],
    }
    for step, log_history in logs.items():
        (root / f"checkpoint-{step}").mkdir(parents=True)
        state = TrainerState(epoch=step / 8, global_step=step, log_history=log_history)
        state.save_to_json(str(root / f"checkpoint-{step}" / "trainer_state.json"))
    (root / "checkpoint-8").mkdir()  # being written
    (root / "runs").mkdir()
    listed = [c.model_dump(by_alias=True, exclude_none=True, exclude={"time"}) for c in listed_checkpoints(cfg, root)]
    on_claim = f"unsloth-test/{cfg.metadata.uid}/checkpoints"
    assert listed == [
        {"step": 4, "epoch": 0.5, "path": f"{on_claim}/checkpoint-4"},
        {"step": 6, "epoch": 0.75, "validationLoss": 1.9, "path": f"{on_claim}/checkpoint-6"},
    ]
    assert listed_checkpoints(cfg, tmp_path / "nothing") == []
