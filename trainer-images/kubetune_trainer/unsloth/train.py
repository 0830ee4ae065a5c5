"""The Unsloth run: config -> effective settings -> load -> LoRA -> trl SFT -> save.

Order matters: CUDA_VISIBLE_DEVICES and the offline switches are set before
torch is imported, and `unsloth` is imported before trl / transformers so that
its patches apply.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kubetune_api import constants as c
from kubetune_api.status import Checkpoint
from kubetune_trainer.common import (
    ConfigError,
    MetricsWriter,
    ProgressReporter,
    StopSignal,
    TrainerConfig,
    UnslothTrainerConfig,
    expect_kind,
)
from kubetune_trainer.common.numerics import flush_denormals
from kubetune_trainer.common.progress import status_checkpoint
from kubetune_trainer.common.resume import checkpoint_at
from kubetune_trainer.common.termination import Preempted
from kubetune_trainer.unsloth.mapping import (
    DeviceCapabilities,
    Substitution,
    UnslothKwargs,
    effective_settings,
    map_spec,
)

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Unsloth tries to reach the hub for statistics and update checks; the pod has no network.
UNSLOTH_ENV = {"UNSLOTH_DISABLE_STATISTICS": "1"}
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = c.CHECKPOINT_STATE_FILE  # trl writes it after the weights and optimizer state


def warn(message: str) -> None:
    print(f"kubetune-trainer: WARNING: {message}", file=sys.stderr, flush=True)


def info(message: str) -> None:
    print(f"kubetune-trainer: {message}", file=sys.stderr, flush=True)


def complete_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """trl's complete checkpoints (those with trainer_state.json): (step, directory), oldest first."""
    if not checkpoints.is_dir():
        return []
    found = []
    for child in checkpoints.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and (child / STATE_FILE).exists():
            found.append((int(match.group(1)), child))
    return sorted(found)


def last_checkpoint(checkpoints: Path) -> tuple[Path, int] | None:
    """The newest complete trl checkpoint and its step."""
    found = complete_checkpoints(checkpoints)
    if not found:
        return None
    step, path = found[-1]
    return path, step


def listed_checkpoints(cfg: TrainerConfig, checkpoints: Path) -> list[Checkpoint]:
    """trl's complete checkpoints as the job's status lists them: the epoch and the validation
    loss of that step from the state trl saved with it, the time when that state was written.
    One whose state cannot be read is left out: the list is for display, never worth a failed run."""
    listed = []
    for step, path in complete_checkpoints(checkpoints):
        state_file = path / STATE_FILE
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
            committed_at = state_file.stat().st_mtime
        except (OSError, ValueError):
            continue
        # trl evaluates before it saves, so an evaluation at this step is in the saved log.
        evaluated = [e["eval_loss"] for e in state.get("log_history", []) if e.get("step") == step and "eval_loss" in e]
        epoch = state.get("epoch")
        listed.append(
            status_checkpoint(
                cfg,
                path,
                step=step,
                epoch=float(epoch) if isinstance(epoch, int | float) else None,
                committed_at=committed_at,
                validation_loss=float(evaluated[-1]) if evaluated else None,
            )
        )
    return listed


def prepare_environment(requested: UnslothKwargs) -> None:
    """Before torch loads: GPU selection, offline hub, integrations.

    hardware.gpus names host GPU indices (a selection, not a reservation). In a pod the
    device plugin exposes the one GPU the operator requested, numbered 0, and the operator
    sets CUDA_VISIBLE_DEVICES=0: a value already in the environment therefore wins, and the
    spec's indices apply where nothing set it (`kubetune run` on a multi-GPU host).
    """
    for key, value in {**OFFLINE_ENV, **UNSLOTH_ENV}.items():
        os.environ.setdefault(key, value)
    for key, value in requested.env.items():
        if key == "CUDA_VISIBLE_DEVICES" and key in os.environ:
            info(
                f"hardware.gpus {value!r}: keeping CUDA_VISIBLE_DEVICES={os.environ[key]!r} from the environment "
                "(in a pod the one allotted GPU is device 0)"
            )
            continue
        os.environ[key] = value


def _torch_dtype(name: str | None) -> Any:
    import torch

    return None if name is None else getattr(torch, name)


def observe_model(model: Any, effective: UnslothKwargs) -> list[Substitution]:
    """Differences between what was asked of Unsloth's loader and what it built.

    The CPU loader can still fall back on its own (bitsandbytes rejects layers
    narrower than 64 features), so the model is checked, not trusted.
    """
    subs: list[Substitution] = []
    fp = effective.from_pretrained
    quantized_4bit = any(type(m).__name__ == "Linear4bit" for m in model.modules())
    quantized_8bit = any(type(m).__name__ == "Linear8bitLt" for m in model.modules())
    if fp["load_in_4bit"] and not quantized_4bit:
        subs.append(
            Substitution(
                "model.load_in_4bit",
                True,
                False,
                "Unsloth's loader fell back to 16-bit weights (bitsandbytes rejected this "
                "model's layer sizes; see its 'Unsloth (CPU)' line above)",
            )
        )
    if fp["load_in_8bit"] and not quantized_8bit:
        subs.append(Substitution("model.load_in_8bit", True, False, "Unsloth's loader kept 16-bit weights"))
    wanted = fp["dtype"]
    actual = str(getattr(model, "dtype", "")).replace("torch.", "")
    if wanted is not None and not (quantized_4bit or quantized_8bit) and actual != wanted:
        subs.append(Substitution("model.dtype", wanted, actual, "Unsloth's loader chose another dtype"))
    return subs


def observe_sft_config(args: Any, effective: UnslothKwargs) -> list[Substitution]:
    """Differences between the SFTConfig asked for and the one Unsloth's patches left."""
    subs: list[Substitution] = []
    sft = effective.sft_config
    optim = str(getattr(args.optim, "value", args.optim))
    if optim != sft["optim"]:
        subs.append(Substitution("optimizer.optim", sft["optim"], optim, "changed by Unsloth's SFTConfig patch"))
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    wanted = "bf16" if sft["bf16"] else "fp16" if sft["fp16"] else "fp32"
    if precision != wanted:
        subs.append(Substitution("hardware.precision", wanted, precision, "changed by Unsloth's SFTConfig patch"))
    if bool(args.packing) != bool(sft["packing"]):
        subs.append(
            Substitution("dataset.packing", sft["packing"], bool(args.packing), "changed by Unsloth's SFTConfig patch")
        )
    return subs


def _metrics_callback(
    metrics: MetricsWriter,
    progress: ProgressReporter,
    stop: StopSignal | None,
    checkpoints: Callable[[], Sequence[Checkpoint]],
) -> Any:
    from transformers import TrainerCallback

    class KubetuneCallback(TrainerCallback):  # type: ignore[misc]
        """trl's log events -> metrics.jsonl + job progress; saves -> the status's checkpoint list;
        SIGTERM -> checkpoint and stop."""

        def __init__(self) -> None:
            self.last_tokens: float | None = None  # trl's cumulative num_tokens
            self._last_time: float | None = None

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
            logs = logs or {}
            step = int(state.global_step)
            epoch = float(state.epoch or 0.0)
            if "loss" in logs:
                record: dict[str, Any] = {
                    "step": step,
                    "epoch": epoch,
                    "loss": float(logs["loss"]),
                    "lr": float(logs.get("learning_rate", 0.0)),
                    "max_steps": int(state.max_steps),
                }
                if "grad_norm" in logs and logs["grad_norm"] is not None:
                    record["grad_norm"] = float(logs["grad_norm"])
                tokens = logs.get("num_tokens")
                now = time.monotonic()
                if tokens is not None and self.last_tokens is not None and self._last_time is not None:
                    elapsed = now - self._last_time
                    if elapsed > 0:
                        record["tokens_per_second"] = (float(tokens) - self.last_tokens) / elapsed
                if tokens is not None:
                    self.last_tokens, self._last_time = float(tokens), now
                metrics.write(record)
                progress.report(
                    step=step,
                    max_steps=int(state.max_steps),
                    epoch=epoch,
                    train_loss=record["loss"],
                    tokens_seen=float(tokens) if tokens is not None else None,
                )
            if "eval_loss" in logs:
                # Evaluation time is not training throughput: restart the tokens/s window.
                self._last_time = None
                metrics.write({"step": step, "epoch": epoch, "val_loss": float(logs["eval_loss"])})
                progress.report(
                    step=step, max_steps=int(state.max_steps), epoch=epoch, validation_loss=float(logs["eval_loss"])
                )

        def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            # Called after the Trainer wrote the checkpoint and removed the ones past its
            # save_total_limit, so the list read from disk is the one to show.
            if progress.enabled:
                progress.checkpoints_changed(checkpoints())

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if stop is not None and stop.requested:
                control.should_save = True
                control.should_training_stop = True

    return KubetuneCallback()


def _save_merged_16bit_from_base(
    model: Any, tokenizer: Any, base_dir: str, out_dir: Path, device: DeviceCapabilities
) -> None:
    """merged_16bit for a 4-bit-loaded LoRA where Unsloth's CPU backend cannot merge.

    What Unsloth's GPU path does too: the base reloaded in 16-bit, the trained
    adapter applied on top, merged, saved.
    """
    import tempfile

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.bf16 or device.kind == "cuda" else torch.float16
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        model.save_pretrained(tmp)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
        merged = PeftModel.from_pretrained(base, tmp).merge_and_unload()
        merged.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def save_output(
    model: Any,
    tokenizer: Any,
    effective: UnslothKwargs,
    *,
    base_dir: str,
    output: Path,
    device: DeviceCapabilities,
    quantized_4bit: bool,
) -> Path:
    """Write output/adapter or output/model as output.save_method says."""
    out_dir = output / effective.output_subdir
    out_dir.mkdir(parents=True, exist_ok=True)
    method = effective.save_method
    if effective.get_peft_model is None:
        # all_weights: the trained model as it is (save_method is lora by the schema's rule).
        model.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
    elif method == "lora":
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    elif method == "merged_16bit":
        if device.kind == "cpu" and quantized_4bit:
            info(
                "merged_16bit: Unsloth's CPU backend cannot merge into 4-bit weights; merging the adapter "
                "into the 16-bit base reloaded from the model directory (as Unsloth does on GPU)"
            )
            _save_merged_16bit_from_base(model, tokenizer, base_dir, out_dir, device)
        else:
            model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_16bit")
    elif method == "merged_4bit":
        # Unsloth makes the caller confirm the lossy 4-bit merge with the _forced spelling.
        model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_4bit_forced")
    else:  # pragma: no cover - map_spec already refused it
        raise ConfigError(f"spec.output.save_method {method!r} is not supported")
    return out_dir


def run(
    config: TrainerConfig, *, handle_signals: bool = False, progress: ProgressReporter | None = None
) -> dict[str, Any]:
    """Train as the config says and return what result.json holds.

    handle_signals: stop at the next step on SIGTERM/SIGINT with a checkpoint
    (the entrypoint sets it; an in-process caller keeps its own handlers).
    progress: where progress goes; default: what the config's `progress` block says.
    """
    cfg = expect_kind(config, UnslothTrainerConfig)
    requested = map_spec(cfg)
    prepare_environment(requested)

    # Before `import unsloth`, whose CPU probes run the first tensor operations.
    flush_denormals()
    started = time.monotonic()
    # unsloth before trl: importing it patches trl / transformers (on CPU: the CPU backend).
    import unsloth
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel  # type: ignore[attr-defined,unused-ignore]

    from kubetune_trainer.unsloth.dataset import load_tokenized_dataset
    from kubetune_trainer.unsloth.device import probe_device

    device = probe_device()
    effective, substitutions = effective_settings(requested, device)
    for sub in substitutions:
        warn(sub.message())

    output = cfg.paths.output
    output.mkdir(parents=True, exist_ok=True)
    resume = last_checkpoint(cfg.paths.checkpoints)
    metrics = MetricsWriter(output / "metrics.jsonl", resume_step=resume[1] if resume else None)
    if progress is None:
        progress = ProgressReporter.from_config(cfg)
    if progress.enabled:
        # What earlier pods of this job committed: a restart keeps the status's list.
        progress.checkpoints_changed(listed_checkpoints(cfg, cfg.paths.checkpoints))
    stop = StopSignal.install() if handle_signals else None

    fp = dict(effective.from_pretrained)
    model_dir = str(fp.pop("model_name"))
    fp["dtype"] = _torch_dtype(fp["dtype"])
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=model_dir, **fp)
    observed = observe_model(model, effective)
    quantized_4bit = any(type(m).__name__ == "Linear4bit" for m in model.modules())
    quantized_8bit = any(type(m).__name__ == "Linear8bitLt" for m in model.modules())
    if effective.get_peft_model is not None:
        model = FastLanguageModel.get_peft_model(model, **effective.get_peft_model)

    data = effective.data
    load = {
        "tokenizer": tokenizer,
        "text_field": data["text_field"],
        "apply_chat_template": data["apply_chat_template"],
        "max_seq_length": data["max_seq_length"],
    }
    # Which shape each file was read as (text is the dataset.text_field column): a fileset
    # whose rows hold both text and messages says here which one was trained on.
    column = f"text = column {data['text_field']!r}"
    train_ds, report = load_tokenized_dataset(data["training_data"], **load)
    info(f"training data: {report.summary()}")
    for line in report.file_lines():
        info(f"training data file {line} ({column})")
    eval_ds = None
    if data["validation_data"] is not None:
        eval_ds, report = load_tokenized_dataset(data["validation_data"], **load)
        info(f"validation data: {report.summary()}")
        for line in report.file_lines():
            info(f"validation data file {line} ({column})")

    args = SFTConfig(**effective.sft_config)
    observed += observe_sft_config(args, effective)
    for sub in observed:
        warn(sub.message())
    substitutions += observed
    metrics.write(
        {
            "step": resume[1] if resume else 0,
            "epoch": 0.0,
            "event": "effective_settings",
            "device": device.kind,
            "device_name": device.name,
            "substitutions": [s.as_dict() for s in substitutions],
        }
    )

    callback = _metrics_callback(metrics, progress, stop, lambda: listed_checkpoints(cfg, cfg.paths.checkpoints))
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        args=args,
        callbacks=[callback],
    )
    start_from: Path | None = resume[0] if resume else None
    if resume:
        info(f"resuming from {resume[0]} (step {resume[1]})")
    elif cfg.paths.resume_from is not None:
        # Another job's checkpoint (spec.resume_from), until this job has its own.
        start_from = checkpoint_at(cfg.paths.resume_from)
        info(f"starting from another job's checkpoint {start_from}")
    train_result = trainer.train(resume_from_checkpoint=str(start_from) if start_from else None)
    progress.close()
    metrics.close()
    if stop is not None and stop.requested:
        # The callback asked the Trainer to save a full checkpoint at this step before stopping.
        raise Preempted(
            f"stopped by signal {stop.received} at step {trainer.state.global_step}; "
            "a restarted pod resumes from output/checkpoints"
        )

    out_dir = save_output(
        model, tokenizer, effective, base_dir=model_dir, output=output, device=device, quantized_4bit=quantized_4bit
    )
    result = {
        "output_dir": str(out_dir),
        "kind": "adapter" if out_dir.name == "adapter" else "full",
        "backend": "unsloth",
        "save_method": effective.save_method,
        "unsloth_version": getattr(unsloth, "__version__", None),
        "device": {
            "kind": device.kind,
            "name": device.name,
            "bf16": device.bf16,
            "fp16": device.fp16,
            "bnb_4bit": device.bnb_4bit,
            "bnb_8bit": device.bnb_8bit,
        },
        "quantized_4bit": quantized_4bit,
        "quantized_8bit": quantized_8bit,
        "substitutions": [s.as_dict() for s in substitutions],
        "effective": effective.as_dict(),
        "global_step": int(trainer.state.global_step),
        "train_loss": float(train_result.training_loss),
        # Throughput and memory of this attempt, for the GPU check's comparison with plain trl.
        "train_runtime_s": float(train_result.metrics.get("train_runtime", 0.0)),
        "train_tokens": callback.last_tokens,
        "peak_gpu_memory_gib": _peak_gpu_memory_gib(),
        "resumed_from_step": resume[1] if resume else None,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    (output / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    info(f"done: {result['kind']} written to {out_dir} after {result['global_step']} steps")
    return result


def _peak_gpu_memory_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return round(float(torch.cuda.max_memory_allocated()) / 2**30, 3)
