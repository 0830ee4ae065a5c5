"""The Automodel training loop: SFT and logit distillation on torch + transformers + peft.

One optimizer step per global batch. Each data-parallel rank runs
`grad_accumulation` micro batches; the loss is summed over target tokens and
divided by the global batch's target-token count (all ranks), so the result is
the same per-token loss whatever the split, and data parallel (FSDP2 averages
gradients over ranks) is corrected by a factor dp (dp x cp with context parallel,
whose ranks each hold part of every row: context_parallel.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kubetune_api import constants as c
from kubetune_trainer.automodel import checkpoint as ckpt
from kubetune_trainer.automodel.batches import Batch, collate, global_batch_indices, rank_micro_batches
from kubetune_trainer.automodel.cadence import validation_cadence
from kubetune_trainer.automodel.context_parallel import ContextParallel, ModelInputs, use_causal_sdpa
from kubetune_trainer.automodel.distributed import Runtime, init_runtime
from kubetune_trainer.automodel.loading import ShardedLoad, materialise, plan_sharded_load
from kubetune_trainer.automodel.losses import sft_or_distillation_loss
from kubetune_trainer.automodel.model import (
    Teacher,
    apply_fsdp,
    apply_lora,
    apply_tensor_parallel,
    check_teacher_vocab,
    load_causal_lm,
    load_tokenizer,
)
from kubetune_trainer.automodel.settings import AutomodelSettings, parse_settings
from kubetune_trainer.common.config import AutomodelTrainerConfig, TrainerConfig, expect_kind
from kubetune_trainer.common.integrations import IntegrationLogger
from kubetune_trainer.common.metrics import MetricsWriter
from kubetune_trainer.common.numerics import flush_denormals
from kubetune_trainer.common.progress import ProgressReporter
from kubetune_trainer.common.resume import checkpoint_at
from kubetune_trainer.common.signals import StopSignal
from kubetune_trainer.common.termination import TrainerError
from kubetune_trainer.data import IGNORE_INDEX, FormatOptions, holdout_split, pack_examples, read_rows, tokenize_rows

MAX_GRAD_NORM = 1.0
# Test hook: behave as if SIGTERM arrived right after this optimizer step.
STOP_AFTER_STEP_ENV = "KUBETUNE_STOP_AFTER_STEP"


def peak_rss_mib() -> float:
    """This process's peak resident memory (ru_maxrss is in KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log(runtime: Runtime | None, message: str) -> None:
    if runtime is None or runtime.is_main:
        print(f"kubetune-trainer: {message}", file=sys.stderr, flush=True)


@dataclass
class Datasets:
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    pad_id: int


def prepare_data(
    cfg: AutomodelTrainerConfig, settings: AutomodelSettings, tokenizer: Any, runtime: Runtime | None
) -> Datasets:
    options = FormatOptions(max_seq_length=settings.max_seq_length, prompt_template=settings.prompt_template)
    train_examples, report = tokenize_rows(read_rows(cfg.paths.training_data), tokenizer, options)
    log(runtime, f"training data: {report.summary()}")
    for line in report.file_lines():
        log(runtime, f"training data file {line}")
    if cfg.paths.validation_data is not None:
        val_examples, val_report = tokenize_rows(read_rows(cfg.paths.validation_data), tokenizer, options)
        log(runtime, f"validation data: {val_report.summary()}")
        for line in val_report.file_lines():
            log(runtime, f"validation data file {line}")
    else:
        train_examples, val_examples = holdout_split(train_examples, seed=settings.seed)
        log(runtime, f"no validation fileset: held out {len(val_examples)} examples (seed {settings.seed})")
    train: list[dict[str, Any]] = [dict(e) for e in train_examples]
    validation: list[dict[str, Any]] = [dict(e) for e in val_examples]
    if settings.sequence_packing:
        packed, packing_report = pack_examples(
            train_examples, settings.max_seq_length, micro_batch_size=settings.micro_batch_size
        )
        log(runtime, f"sequence packing: {packing_report.summary()}")
        train = [dict(p) for p in packed]
    return Datasets(train=train, validation=validation, pad_id=int(tokenizer.pad_token_id))


def linear_schedule(warmup: int, total: int) -> Any:
    """Linear warmup from 0, then linear decay to 0 at the last step (HF's linear schedule)."""

    def factor(step: int) -> float:
        if step < warmup:
            return float(step) / float(max(1, warmup))
        return max(0.0, float(total - step) / float(max(1, total - warmup)))

    return factor


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; biases and norm weights are not decayed."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def grad_norm_and_clip(params: list[nn.Parameter], runtime: Runtime, max_norm: float) -> float:
    """Global L2 norm over all ranks' gradients (DTensor shards included), then clip."""
    from torch.distributed.tensor import DTensor

    squares = torch.zeros((), dtype=torch.float64)
    for param in params:
        grad = param.grad
        if grad is None:
            continue
        norm = torch.linalg.vector_norm(grad.float())
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares += float(norm.item()) ** 2
    if runtime.parallel.pp > 1:
        # Each pipeline stage only sees its own parameters.
        import torch.distributed as dist

        total = torch.tensor([squares.item()], dtype=torch.float64)
        dist.all_reduce(total, group=runtime.group("pp"))
        squares = total[0]
    norm_value = math.sqrt(float(squares))
    coefficient = max_norm / (norm_value + 1e-6)
    if coefficient < 1.0:
        for param in params:
            if param.grad is not None:
                param.grad.mul_(coefficient)
    return norm_value


def fused_adamw(params: list[nn.Parameter], runtime: Runtime) -> bool:
    """Fused AdamW (one kernel over all parameters, DTensor shards included), as HF Trainer's
    default (adamw_torch_fused since torch 2.8); unfused AdamW on CPU is torch's per-tensor
    loop. Not where the parameters mix DTensors and plain tensors (tensor parallel with LoRA
    and no FSDP2 leaves some adapters plain): the fused kernel refuses such a mix."""
    from torch.distributed.tensor import DTensor

    kinds = {isinstance(p, DTensor) for p in params}
    return runtime.device.type in ("cpu", "cuda") and len(kinds) <= 1


class Engine:
    """Forward/backward of one micro batch for models that run whole on each rank (single, FSDP2, TP)."""

    def __init__(
        self, model: nn.Module, settings: AutomodelSettings, runtime: Runtime, teacher: Teacher | None
    ) -> None:
        self.model = model
        self.settings = settings
        self.runtime = runtime
        self.teacher = teacher
        self.pad_to: int | None = None
        self.n_micro = 1
        self.context_parallel: ContextParallel | None = None

    def _autocast(self) -> Any:
        if self.runtime.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def inputs(self, batch: Batch) -> contextlib.AbstractContextManager[ModelInputs]:
        """The forward's inputs; with context parallel, this rank's shard, and the forward and
        backward must both run inside the context (ring attention's backward is collective too)."""
        if self.context_parallel is not None:
            return self.context_parallel.shard(batch.input_ids, batch.labels, batch.position_ids)
        return contextlib.nullcontext(ModelInputs(batch.input_ids, batch.labels, batch.position_ids, False))

    def losses(self, inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        with self._autocast():
            logits = self.model(input_ids=inputs.input_ids, position_ids=inputs.position_ids, use_cache=False).logits
        teacher_logits = self.teacher.logits(inputs.input_ids, inputs.position_ids) if self.teacher else None
        parts = sft_or_distillation_loss(
            logits,
            inputs.labels,
            teacher_logits,
            self.settings.distillation_ratio,
            self.settings.distillation_temperature,
            labels_shifted=inputs.labels_shifted,
        )
        return parts.total, parts.ce_sum, parts.kd_sum

    def train_micro_batches(self, batches: list[Batch], target_tokens: int) -> tuple[float, float, float]:
        """Backward over the rank's micro batches; returns local (loss, ce, kd) sums."""
        self.model.train()
        loss_sum = ce_sum = kd_sum = 0.0
        scale = self.runtime.grad_ranks / max(1, target_tokens)
        from torch.distributed.fsdp import FSDPModule

        fsdp = self.model if isinstance(self.model, FSDPModule) else None
        for index, batch in enumerate(batches):
            if fsdp is not None:
                # Reduce-scatter gradients once per optimizer step, not per micro batch.
                fsdp.set_requires_gradient_sync(index == len(batches) - 1)
            with self.inputs(batch.to(self.runtime.device)) as inputs:
                total, ce, kd = self.losses(inputs)
                (total * scale).backward()  # type: ignore[no-untyped-call]
            loss_sum += float(total.detach())
            ce_sum += float(ce.detach())
            kd_sum += float(kd.detach()) if kd is not None else 0.0
        return loss_sum, ce_sum, kd_sum

    @torch.no_grad()
    def eval_batches(self, batches: list[Batch]) -> tuple[float, float]:
        self.model.eval()
        ce_total = kd_total = 0.0
        for batch in batches:
            with self.inputs(batch.to(self.runtime.device)) as inputs:
                _, ce, kd = self.losses(inputs)
            ce_total += float(ce)
            kd_total += float(kd) if kd is not None else 0.0
        return ce_total, kd_total


def build_model(
    cfg: AutomodelTrainerConfig, settings: AutomodelSettings, runtime: Runtime
) -> tuple[nn.Module, ShardedLoad | None]:
    """The model to parallelise: on the meta device when it can be loaded shard-wise (then
    `materialise` fills it after sharding), else loaded whole."""
    lora = settings.lora
    # LoRA on GPU: frozen base weights in bf16, adapters in fp32 (peft upcasts
    # them). Full-weight: fp32 master weights, bf16 compute (autocast / FSDP2).
    load_dtype = torch.bfloat16 if (runtime.device.type == "cuda" and lora is not None) else torch.float32
    plan = plan_sharded_load(cfg.paths.model, load_dtype, lora, settings.seed, runtime)
    if isinstance(plan, ShardedLoad):
        log(runtime, "sharded loading: model built on the meta device, each rank reads only its shard")
        return plan.model, plan
    if runtime.distributed:
        log(runtime, f"replicated loading (every rank reads the whole model): {plan}")
    model = load_causal_lm(cfg.paths.model, load_dtype)
    torch.manual_seed(settings.seed)
    if lora is not None:
        model = apply_lora(model, lora)
    return model, None


def run_validation(
    engine: Any, validation: list[dict[str, Any]], pad_id: int, runtime: Runtime, micro: int
) -> dict[str, float]:
    """Token-weighted CE (and KL to the teacher) over the whole validation set, split over dp ranks.

    Every rank runs the same number of micro batches in groups of the engine's
    micro-batch count (pipeline schedules are collective and fixed-size);
    filler rows carry no target token.
    """
    dp, dp_rank = runtime.parallel.dp, runtime.dp_rank
    group = engine.n_micro * micro
    per_rank = math.ceil(len(validation) / dp / group) * group
    mine = validation[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    filler = {"input_ids": [pad_id, pad_id], "labels": [IGNORE_INDEX, IGNORE_INDEX]}
    mine = mine + [filler] * (per_rank - len(mine))
    batches = [collate(mine[i : i + micro], pad_id, pad_to=engine.pad_to) for i in range(0, per_rank, micro)]
    ce_total = kd_total = tokens = 0.0
    for start in range(0, len(batches), engine.n_micro):
        chunk = batches[start : start + engine.n_micro]
        result = engine.eval_batches(chunk)
        ce, kd = result if isinstance(result, tuple) else (result, 0.0)
        if runtime.reports_loss:
            ce_total += ce
            kd_total += kd
        if runtime.counts_tokens:
            tokens += sum(b.target_tokens for b in chunk)
    ce_total, kd_total, tokens = runtime.all_reduce_sum([ce_total, kd_total, tokens])
    return {"val_loss": ce_total / max(tokens, 1.0), "val_kl": kd_total / max(tokens, 1.0)}


def export_outputs(
    cfg: AutomodelTrainerConfig, settings: AutomodelSettings, model: nn.Module, tokenizer: Any, runtime: Runtime
) -> dict[str, Any]:
    """Write adapter/ or model/ (Hugging Face format) + tokenizer, and result.json (rank 0)."""
    output = cfg.paths.output
    plain = not runtime.distributed
    if not plain:
        staging = output / "checkpoints" / "export"
        if runtime.is_main and staging.exists():
            shutil.rmtree(staging)
        runtime.barrier()
        ckpt.save_trainable_for_export(staging, model, runtime)
    result: dict[str, Any] = {}
    if runtime.is_main:
        export_model: Any
        if plain:
            export_model = model
        else:
            # Rebuild an unsharded CPU copy and fill it from the DCP export.
            export_model = load_causal_lm(cfg.paths.model, torch.float32)
            if settings.lora is not None:
                export_model = apply_lora(export_model, settings.lora)
            ckpt.load_trainable_into(staging, export_model)
        export_model = export_model.to("cpu")
        if settings.finetuning_type == "lora":
            target = output / "adapter"
            kind = "adapter"
            export_model.save_pretrained(str(target), safe_serialization=True)
        else:
            target = output / "model"
            kind = "full"
            if settings.lora is not None:
                export_model = export_model.merge_and_unload()
            # Full weights are saved in the base model's dtype on GPU (bf16) and fp32 on CPU.
            save_dtype = torch.bfloat16 if runtime.device.type == "cuda" else torch.float32
            export_model.to(save_dtype).save_pretrained(str(target), safe_serialization=True)
        tokenizer.save_pretrained(str(target))
        result = {
            "output_dir": str(target),
            "kind": kind,
            "finetuning_type": settings.finetuning_type,
            "training_type": settings.training_type,
            "base_model": str(cfg.paths.model),
        }
        if not plain:
            shutil.rmtree(output / "checkpoints" / "export", ignore_errors=True)
    runtime.barrier()
    return result


def train(config: TrainerConfig, *, progress: ProgressReporter | None = None) -> int:
    """progress: where rank 0's progress goes; default: what the config's `progress` block says."""
    cfg = expect_kind(config, AutomodelTrainerConfig)
    settings = parse_settings(cfg)
    flush_denormals()
    runtime = init_runtime(settings)
    stop = StopSignal.install()
    try:
        return _train(cfg, settings, runtime, stop, progress)
    finally:
        stop.restore()
        runtime.shutdown()


def _train(
    cfg: AutomodelTrainerConfig,
    settings: AutomodelSettings,
    runtime: Runtime,
    stop: StopSignal,
    reporter: ProgressReporter | None,
) -> int:
    started = time.monotonic()
    stop_after = int(os.environ[STOP_AFTER_STEP_ENV]) if os.environ.get(STOP_AFTER_STEP_ENV) else None
    output = cfg.paths.output
    if runtime.is_main:
        output.mkdir(parents=True, exist_ok=True)
    log(
        runtime,
        f"seed {settings.seed}{'' if settings.seed_was_set else ' (derived from the job identity)'}; "
        f"world {runtime.world_size} = pp {settings.parallel.pp} x dp {settings.parallel.dp} x "
        f"cp {settings.parallel.cp} x tp {settings.parallel.tp}; device {runtime.device}",
    )
    tokenizer = load_tokenizer(cfg.paths.model)
    teacher: Teacher | None = None
    if settings.training_type == "distillation":
        assert cfg.paths.teacher_model is not None  # AutomodelTrainerConfig requires it for distillation
        check_teacher_vocab(cfg.paths.model, cfg.paths.teacher_model, tokenizer)
    data = prepare_data(cfg, settings, tokenizer, runtime)

    steps_per_epoch = len(data.train) // settings.global_batch_size
    if steps_per_epoch == 0:
        raise TrainerError(
            f"the training set has {len(data.train)} {'packed rows' if settings.sequence_packing else 'examples'}, "
            f"fewer than batch.global_batch_size {settings.global_batch_size}; lower the batch size or add data"
        )
    total_steps = settings.epochs * steps_per_epoch
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)
    cadence = validation_cadence(settings.val_check_interval, steps_per_epoch)
    log(
        runtime,
        f"{len(data.train)} training rows, {len(data.validation)} validation examples; "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps, grad accumulation {settings.grad_accumulation}, "
        f"validation and a checkpoint {cadence.describe()}",
    )

    model, sharded = build_model(cfg, settings, runtime)
    engine: Any
    if settings.parallel.pp > 1:
        from kubetune_trainer.automodel.pipeline import PipelineEngine, split_for_pipeline

        model = split_for_pipeline(model, runtime)
    if settings.parallel.tp > 1:
        apply_tensor_parallel(model, runtime)
    if (settings.parallel.ep or 1) > 1:
        from kubetune_trainer.automodel.expert_parallel import apply_expert_parallel

        layers = apply_expert_parallel(model, runtime.mesh["dp"])
        log(runtime, f"expert parallel {settings.parallel.ep}: the experts of {layers} MoE layers split over dp ranks")
    if settings.parallel.cp > 1:
        use_causal_sdpa(model)
        log(runtime, f"context parallel {settings.parallel.cp}: ring attention over SDPA, rows split over cp ranks")
    if runtime.grad_ranks > 1:
        apply_fsdp(model, runtime)
    if sharded is not None:
        read = materialise(sharded, runtime)
        log(runtime, f"sharded loading: {read} tensors read shard-wise from {cfg.paths.model}")
    else:
        model.to(runtime.device)
    # Every rank: what a pod's memory request must cover for loading (bench/sharded_loading_bench.py reads it).
    print(
        f"kubetune-trainer: rank {runtime.rank}: model in place ({'sharded' if sharded else 'whole'} loading), "
        f"peak host memory so far {peak_rss_mib():.0f} MiB",
        file=sys.stderr,
        flush=True,
    )
    if settings.training_type == "distillation":
        assert cfg.paths.teacher_model is not None
        teacher = Teacher(cfg.paths.teacher_model, settings.teacher_precision, runtime.device, settings.offload_teacher)
        log(
            runtime,
            f"teacher {cfg.paths.teacher_model} frozen in {teacher.precision_used}"
            f"{' (upcast on CPU)' if teacher.precision_used != settings.teacher_precision else ''}"
            f"{', offloaded to CPU between steps' if teacher.offload else ''}",
        )
    if settings.parallel.pp > 1:
        engine = PipelineEngine(model, settings, runtime, teacher)
    else:
        engine = Engine(model, settings, runtime, teacher)
        if settings.parallel.cp > 1:
            engine.context_parallel = ContextParallel(runtime.mesh["cp"], settings.parallel.cp, data.pad_id)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        decay_groups(model, settings.weight_decay),
        lr=settings.learning_rate,
        betas=(0.9, 0.999),
        eps=1e-8,
        fused=fused_adamw(params, runtime),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(settings.warmup_steps, total_steps))

    step = 0
    checkpoints = output / "checkpoints"
    resume_from = ckpt.latest_checkpoint(checkpoints)
    # Another job's checkpoint (spec.resume_from) counts only until this job has its own: a
    # restarted pod goes on from where this job got to.
    branched = resume_from is None and cfg.paths.resume_from is not None
    if resume_from is None and cfg.paths.resume_from is not None:
        resume_from = checkpoint_at(cfg.paths.resume_from)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, runtime)
        if state.seed != settings.seed and not branched:
            # The data order comes from the seed: a restart must keep it to go on exactly.
            raise TrainerError(
                f"checkpoint {resume_from} was written with seed {state.seed}, this run has {settings.seed}"
            )
        # As the transformers Trainer's resume_from_checkpoint does (and so the Unsloth
        # trainer): the scheduler's base rate is the checkpoint's, its shape (warmup,
        # length) this job's.
        scheduler.load_state_dict(state.scheduler)
        step = state.step
        where = "started from another job's checkpoint" if branched else "resumed from"
        log(runtime, f"{where} {resume_from} at step {step}")

    metrics = MetricsWriter(
        output / "metrics.jsonl", resume_step=step if resume_from else None, enabled=runtime.is_main
    )
    progress = reporter if reporter is not None else ProgressReporter.from_config(cfg, rank=runtime.rank)
    if progress.enabled:
        # What earlier pods of this job committed: a restart keeps the status's list.
        progress.checkpoints_changed(ckpt.listed_checkpoints(cfg, checkpoints))
    trackers = IntegrationLogger.from_spec(cfg.spec, run_name=cfg.name, rank=runtime.rank)
    success = False
    try:

        def validate(at_step: int) -> dict[str, float]:
            values = run_validation(engine, data.validation, data.pad_id, runtime, settings.micro_batch_size)
            record: dict[str, Any] = {
                "step": at_step,
                "epoch": at_step / steps_per_epoch,
                "val_loss": values["val_loss"],
            }
            if teacher is not None:
                record["val_kl"] = values["val_kl"]
            metrics.write(record)
            trackers.log_metrics(record, step=at_step)
            progress.report(
                step=at_step, max_steps=total_steps, epoch=at_step / steps_per_epoch, validation_loss=values["val_loss"]
            )
            log(runtime, f"step {at_step}: validation loss {values['val_loss']:.4f}")
            return values

        def save(at_step: int, validation_loss: float | None) -> None:
            state = ckpt.TrainerState(
                step=at_step,
                seed=settings.seed,
                scheduler=scheduler.state_dict(),
                epoch=at_step / steps_per_epoch,
                validation_loss=validation_loss,
            )
            path = ckpt.save_checkpoint(checkpoints, model, optimizer, state, runtime)
            log(runtime, f"checkpoint {path}")
            if progress.enabled:
                # From disk, after save_checkpoint removed the older one.
                progress.checkpoints_changed(ckpt.listed_checkpoints(cfg, checkpoints))

        if step == 0:
            validate(0)
        last_validated = step
        micro = settings.micro_batch_size
        tokens_seen = 0  # this run's, for the progress's tokens/s (only differences count)
        while step < total_steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            indices = global_batch_indices(len(data.train), settings.seed, epoch, in_epoch, settings.global_batch_size)
            global_items = [data.train[i] for i in indices]
            global_targets = sum(collate([item], data.pad_id).target_tokens for item in global_items)
            mine = rank_micro_batches(indices, settings.parallel.dp, runtime.dp_rank, micro)
            batches = [collate([data.train[i] for i in group], data.pad_id, pad_to=engine.pad_to) for group in mine]
            tick = time.monotonic()
            optimizer.zero_grad(set_to_none=True)
            loss_sum, ce_sum, kd_sum = engine.train_micro_batches(batches, global_targets)
            grad_norm = grad_norm_and_clip(params, runtime, MAX_GRAD_NORM)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            step += 1
            if not runtime.reports_loss:
                loss_sum = ce_sum = kd_sum = 0.0
            loss_sum, ce_sum, kd_sum = runtime.all_reduce_sum([loss_sum, ce_sum, kd_sum])
            elapsed = max(time.monotonic() - tick, 1e-9)
            real_tokens = sum(len(item["input_ids"]) for item in global_items)
            record: dict[str, Any] = {
                "step": step,
                "epoch": step / steps_per_epoch,
                "loss": loss_sum / global_targets,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_second": real_tokens / elapsed,
                "max_steps": total_steps,
            }
            if teacher is not None:
                record["ce_loss"] = ce_sum / global_targets
                record["kd_loss"] = kd_sum / global_targets
            if not math.isfinite(record["loss"]):
                raise TrainerError(
                    f"the training loss became {record['loss']} at step {step}; lower optimizer.learning_rate"
                )
            metrics.write(record)
            trackers.log_metrics(record, step=step)
            tokens_seen += real_tokens
            progress.report(
                step=step,
                max_steps=total_steps,
                epoch=step / steps_per_epoch,
                train_loss=record["loss"],
                tokens_seen=tokens_seen,
            )
            log(runtime, f"step {step}/{total_steps} loss {record['loss']:.4f} lr {lr:.3g} grad_norm {grad_norm:.3f}")
            validation_loss = None  # this step's, for its checkpoint's entry in the status
            if cadence.validates_after(step) or step == total_steps:
                validation_loss = validate(step)["val_loss"]
                last_validated = step
                if step < total_steps:
                    save(step, validation_loss)
            if stop_after is not None and step >= stop_after:
                stop.request()
            if _stop_requested(stop, runtime) and step < total_steps:
                save(step, validation_loss)
                reason = f"stopped by signal at step {step}/{total_steps}; checkpoint saved, a restart resumes there"
                log(runtime, reason)
                from kubetune_trainer.common.termination import write_termination_log

                if runtime.is_main:
                    write_termination_log(reason)
                return c.EXIT_PREEMPTED  # as if killed by SIGTERM: the Job / PyTorchJob restarts the pod
        del last_validated
        result = export_outputs(cfg, settings, model, tokenizer, runtime)
        if runtime.is_main:
            result.update({"steps": step, "seconds": round(time.monotonic() - started, 2)})
            (output / "result.json").write_text(json.dumps(result, indent=2) + "\n")
            if checkpoints.exists():
                shutil.rmtree(checkpoints, ignore_errors=True)
            progress.checkpoints_changed([])  # removed: the status lists none (close() sends it)
            log(runtime, f"done: {result['kind']} in {result['output_dir']} after {step} steps")
        success = True
        return 0
    finally:
        metrics.close()
        progress.close()
        trackers.close(success=success)


def _stop_requested(stop: StopSignal, runtime: Runtime) -> bool:
    """All ranks must agree to stop (SIGTERM may reach pods at different steps)."""
    flag = 1.0 if stop.requested else 0.0
    return runtime.all_reduce_sum([flag])[0] > 0
