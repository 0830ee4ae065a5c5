"""Trainer benchmarks (issue 9, items 5 and 6): the Automodel loop against Hugging Face Trainer + peft.

Rows (same model, data, batch, sequence length and LoRA config on both sides):
- tokens/s of our loop, run through its entrypoint (`python -m kubetune_trainer.automodel`),
  against HF Trainer + peft, LoRA and full weights, on the tiny Llama and SmolLM2-135M;
  each the median over the steps after the warm-up steps; ratio ours/HF (target >= 1.0);
- packed against unpacked on a dataset with skewed lengths: effective (non-pad) tokens/s
  and the padding fraction of the batches the trainer actually built;
- peak memory of each run (VmHWM on CPU, torch.cuda.max_memory_allocated on a GPU);
- on a GPU only: MFU = 6 x parameters x tokens/s / the card's dense bf16 peak (--peak-tflops).

Each measurement is a fresh interpreter (see trainer_common.run_measured). The models
and data are left in --work for bench/unsloth_bench.py, which measures Unsloth against
the HF rows written here.

    bash hack/run-in-venv.sh test python bench/trainer_bench.py --out /tmp/trainer.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "training")]

from trainer_common import (  # noqa: E402
    ROOT,
    combine,
    peak_memory_mib,
    run_measured,
    settings_label,
    skewed_rows,
    uniform_rows,
    warm_median,
    write_jsonl,
)

LORA = {"rank": 16, "alpha": 32, "merge": False, "target_modules": None}
LEARNING_RATE = {"lora": 1e-3, "all_weights": 1e-4}


def contract_weight_decay() -> float:
    """optimizer.weight_decay's default in the AutomodelJob contract: both sides train with it
    (HF's own default is 0, which would be less work than ours)."""
    from trainer_config import AUTOMODEL_DEFAULT_SPEC

    return float(AUTOMODEL_DEFAULT_SPEC["optimizer"]["weight_decay"])


def on_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# --- one measurement (runs in its own interpreter) ---------------------------------------


def batch_padding(lengths_per_batch: list[list[int]]) -> float:
    """Pad tokens over all tokens of right-padded batches (each padded to its longest row)."""
    real = sum(sum(b) for b in lengths_per_batch)
    total = sum(max(b) * len(b) for b in lengths_per_batch)
    return 1.0 - real / total


def our_padding(a: argparse.Namespace) -> float:
    """The padding of the batches our trainer built: the same tokenisation, packing and
    seeded batch order as train.py, replayed (the trainer does not log it per step)."""
    from transformers import AutoTokenizer

    from kubetune_trainer.automodel.batches import global_batch_indices
    from kubetune_trainer.data import FormatOptions, pack_examples, read_rows, tokenize_rows

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    examples, _ = tokenize_rows(read_rows(Path(a.data)), tokenizer, FormatOptions(max_seq_length=a.seq))
    items: list[Any] = list(examples)
    if a.packing:
        items, _ = pack_examples(examples, a.seq, micro_batch_size=a.micro)
    per_epoch = len(items) // a.micro
    batches = []
    for step in range(a.warmup, a.steps):
        epoch, in_epoch = divmod(step, per_epoch)
        indices = global_batch_indices(len(items), 0, epoch, in_epoch, a.micro)
        batches.append([len(items[i]["input_ids"]) for i in indices])
    return batch_padding(batches)


def measure_ours(a: argparse.Namespace) -> dict[str, Any]:
    from trainer_config import automodel_spec, write_trainer_config

    from kubetune_trainer.automodel.__main__ import main as entrypoint
    from kubetune_trainer.common.metrics import MetricsWriter

    work = Path(a.scratch)
    lora = LORA if a.finetuning == "lora" else None
    spec = automodel_spec(
        training={"finetuning_type": a.finetuning, "max_seq_length": a.seq, "lora": lora},
        # Validation only before step 1 and after the last step: outside every timed step.
        schedule={"max_steps": a.steps, "seed": 0, "val_check_interval": a.steps},
        batch={"global_batch_size": a.micro, "micro_batch_size": a.micro, "sequence_packing": a.packing},
        optimizer={"learning_rate": LEARNING_RATE[a.finetuning], "weight_decay": a.weight_decay},
    )
    output = work / "output"
    config = write_trainer_config(
        work / "config.json",
        spec=spec,
        model=Path(a.model),
        training_data=Path(a.data),
        validation_data=Path(a.validation),
        output=output,
    )
    os.environ["KUBETUNE_TERMINATION_LOG"] = str(work / "termination-log")
    rc = entrypoint(["--config", str(config)])
    if rc:
        raise RuntimeError(f"the Automodel entrypoint exited {rc}; see {work / 'termination-log'}")
    records = [m for m in MetricsWriter.read(output / "metrics.jsonl") if "tokens_per_second" in m]
    tps, n = warm_median([float(m["tokens_per_second"]) for m in records], a.warmup)
    memory, memory_kind = peak_memory_mib()
    return {
        "tokens_per_second": tps,
        "steps_measured": n,
        "padding_fraction": our_padding(a),
        "peak_memory_mib": memory,
        "memory_kind": memory_kind,
    }


def measure_hf(a: argparse.Namespace) -> dict[str, Any]:
    """HF Trainer + peft, set up as a user would (the approach of tests/training/automodel/gpu_check.py,
    extended to full weights, per-step token counts and medians)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from kubetune_trainer.automodel.model import apply_lora
    from kubetune_trainer.automodel.settings import LoraSettings
    from kubetune_trainer.data import FormatOptions, read_rows, tokenize_rows

    gpu = on_gpu()
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    examples, _ = tokenize_rows(read_rows(Path(a.data)), tokenizer, FormatOptions(max_seq_length=a.seq))
    model = AutoModelForCausalLM.from_pretrained(
        a.model, dtype=torch.bfloat16 if gpu else torch.float32, attn_implementation="sdpa"
    )
    if a.finetuning == "lora":
        model = apply_lora(model, LoraSettings(rank=16, alpha=32, target_modules=None, merge=False))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collated: list[list[int]] = []  # row lengths of each batch, in the order the Trainer asked for them

    def collate(items: list[dict[str, list[int]]]) -> dict[str, Any]:
        lengths = [len(i["input_ids"]) for i in items]
        collated.append(lengths)
        length = max(lengths)
        ids = torch.full((len(items), length), pad)
        labels = torch.full((len(items), length), -100)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for r, item in enumerate(items):
            n = len(item["input_ids"])
            ids[r, :n], labels[r, :n], mask[r, :n] = torch.tensor(item["input_ids"]), torch.tensor(item["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    times: list[float] = []

    class Clock(TrainerCallback):
        start = 0.0

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    args = TrainingArguments(
        output_dir=str(Path(a.scratch) / "hf"),
        per_device_train_batch_size=a.micro,
        max_steps=a.steps,
        learning_rate=LEARNING_RATE[a.finetuning],
        # The same work as ours: the same weight decay on the same parameters (HF, like our
        # loop, leaves biases and norm weights out).
        weight_decay=a.weight_decay,
        logging_steps=a.steps,
        save_strategy="no",
        report_to=[],
        bf16=gpu,
        use_cpu=not gpu,
        dataloader_drop_last=True,
        remove_unused_columns=False,
        seed=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=[dict(e) for e in examples], data_collator=collate, callbacks=[Clock()]
    )
    trainer.train()
    # The accelerate data loader fetches one batch ahead, but in order: batch k is step k.
    per_step = [sum(collated[k]) / t for k, t in enumerate(times)]
    tps, n = warm_median(per_step, a.warmup)
    memory, memory_kind = peak_memory_mib()
    return {
        "tokens_per_second": tps,
        "steps_measured": n,
        "padding_fraction": batch_padding(collated[a.warmup : len(times)]),
        "peak_memory_mib": memory,
        "memory_kind": memory_kind,
    }


def measure_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="trainer_bench.py measure")
    p.add_argument("trainer", choices=["ours", "hf"])
    for name in ("model", "data", "validation", "scratch", "result", "finetuning"):
        p.add_argument(f"--{name}", required=True)
    for name in ("steps", "warmup", "micro", "seq"):
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--weight-decay", type=float, required=True)
    a = p.parse_args(argv)
    out = measure_ours(a) if a.trainer == "ours" else measure_hf(a)
    Path(a.result).write_text(json.dumps(out))


# --- the driver --------------------------------------------------------------------------


def prepare_models(work: Path, quick: bool) -> dict[str, Path]:
    from tiny_llama import build_tiny_llama

    models = {"tiny Llama": build_tiny_llama(work / "tiny-llama")}
    if not quick:
        smol = subprocess.run(
            [sys.executable, str(ROOT / "hack" / "smollm2.py")], capture_output=True, text=True, check=False
        )
        if smol.returncode != 0:
            raise RuntimeError(f"hack/smollm2.py failed (exit {smol.returncode}):\n{smol.stderr[-3000:]}")
        models["SmolLM2-135M"] = Path(smol.stdout.strip().splitlines()[-1])
    return models


def parameters_of(model: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))  # type: ignore[no-untyped-call]
        return sum(p.numel() for p in skeleton.parameters())


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def ratio(value: float, baseline: float) -> float:
    return round(value / baseline, 3) if baseline else float("nan")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "measure":
        measure_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, help="models and data for unsloth_bench.py (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny Llama only, a few steps")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 12, quick 5)")
    parser.add_argument("--warmup", type=int, help="steps left out of the median (default 3, quick 2)")
    parser.add_argument("--micro", type=int, default=4, help="batch size (rows per step)")
    parser.add_argument("--seq", type=int, default=128, help="max_seq_length")
    parser.add_argument("--runs", type=int, default=1, help="repetitions of each pair, alternating sides")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak, for MFU (H100/H200: 989)"
    )
    args = parser.parse_args()
    steps = args.steps or (5 if args.quick else 12)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    weight_decay = contract_weight_decay()
    work = args.work or Path(tempfile.mkdtemp(prefix="kubetune-trainer-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    models = prepare_models(work, args.quick)
    rows_needed = args.micro * (steps + 2)
    uniform = write_jsonl(work / "data" / "uniform" / "train.jsonl", uniform_rows(rows_needed, seed=0))
    skewed = write_jsonl(work / "data" / "skewed" / "train.jsonl", skewed_rows(rows_needed * 8, seed=1))
    validation = write_jsonl(work / "data" / "validation" / "val.jsonl", uniform_rows(args.micro, seed=2))

    def measure_once(trainer: str, model: Path, data: Path, finetuning: str, packing: bool, tag: str) -> dict[str, Any]:
        scratch = work / "runs" / tag
        scratch.mkdir(parents=True, exist_ok=True)
        argv = [str(Path(__file__).resolve()), "measure", trainer, "--model", str(model), "--data", str(data)]
        argv += ["--validation", str(validation), "--scratch", str(scratch), "--result", str(scratch / "result.json")]
        argv += ["--finetuning", finetuning, "--steps", str(steps), "--warmup", str(warmup)]
        argv += ["--micro", str(args.micro), "--seq", str(args.seq)] + (["--packing"] if packing else [])
        argv += ["--weight-decay", str(weight_decay)]
        started = time.monotonic()
        load = load_average()
        result = run_measured(argv, scratch / "result.json", scratch / "log.txt")
        result["load_average"] = round((load + load_average()) / 2, 2)
        print(
            f"trainer bench: {tag}: {result['tokens_per_second']:.1f} tokens/s, "
            f"{result['peak_memory_mib']:.0f} MiB, load {result['load_average']} "
            f"({time.monotonic() - started:.0f} s)",
            flush=True,
        )
        return result

    def measure_pair(
        model: Path, data: Path, finetuning: str, tag: str, pair: tuple[tuple[str, bool], tuple[str, bool]]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Both sides of a comparison, alternating, --runs times; each figure the median over runs.
        Alternating keeps a burst of load from the other tenants of this machine off one side only."""
        runs: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
        for r in range(args.runs):
            for side, (trainer, packing) in enumerate(pair):
                runs[side].append(measure_once(trainer, model, data, finetuning, packing, f"{tag}-{side}-{r}"))
        return combine(runs[0]), combine(runs[1])

    rows: list[dict[str, Any]] = []
    gpu = torch.cuda.is_available()
    for label, model in models.items():
        settings = settings_label(label, args.micro, args.seq, steps, warmup, device)
        params = parameters_of(model) if gpu else 0
        for finetuning in ("lora", "all_weights"):
            slug = f"{label.split()[0].lower()}-{finetuning}"
            ours, hf = measure_pair(model, uniform, finetuning, slug, (("ours", False), ("hf", False)))
            what = f"{label}, {finetuning}"
            hf_name = f"trainer tokens/s: HF Trainer + peft, {what}"
            rows.append({"name": hf_name, "value": round(hf["tokens_per_second"], 1), "unit": "tokens/s",
                         "settings": settings, "steps_measured": hf["steps_measured"],
                         "load_average": hf["load_average"]})  # fmt: skip
            rows.append(
                {
                    "name": f"trainer tokens/s: Automodel loop, {what}",
                    "value": round(ours["tokens_per_second"], 1),
                    "unit": "tokens/s",
                    "baseline": round(hf["tokens_per_second"], 1),
                    "baseline_name": hf_name,
                    "ratio": ratio(ours["tokens_per_second"], hf["tokens_per_second"]),
                    "target": ">= 1.0",
                    "settings": settings,
                    "steps_measured": ours["steps_measured"],
                    "load_average": ours["load_average"],
                }
            )
            hf_mem = f"trainer peak memory: HF Trainer + peft, {what}"
            rows.append({"name": hf_mem, "value": round(hf["peak_memory_mib"]), "unit": "MiB",
                         "memory": hf["memory_kind"], "settings": settings})  # fmt: skip
            rows.append(
                {
                    "name": f"trainer peak memory: Automodel loop, {what}",
                    "value": round(ours["peak_memory_mib"]),
                    "unit": "MiB",
                    "baseline": round(hf["peak_memory_mib"]),
                    "baseline_name": hf_mem,
                    "ratio": ratio(ours["peak_memory_mib"], hf["peak_memory_mib"]),
                    "memory": ours["memory_kind"],
                    "settings": settings,
                }
            )
            if gpu:
                for who, res in (("Automodel loop", ours), ("HF Trainer + peft", hf)):
                    mfu = 6 * params * res["tokens_per_second"] / (args.peak_tflops * 1e12)
                    rows.append({"name": f"trainer MFU: {who}, {what}", "value": round(mfu, 4), "unit": "fraction",
                                 "settings": f"{settings}, peak {args.peak_tflops} TFLOP/s bf16, "
                                             f"{params} parameters"})  # fmt: skip

    # Packing: the larger model in a full run (the tiny one is all overhead), LoRA.
    label, model = list(models.items())[-1]
    settings = settings_label(label, args.micro, args.seq, steps, warmup, device) + ", skewed lengths, LoRA"
    unpacked, packed = measure_pair(model, skewed, "lora", "packing", (("ours", False), ("ours", True)))
    base_name = f"packing: effective tokens/s, unpacked, {label}"
    rows += [
        {"name": base_name, "value": round(unpacked["tokens_per_second"], 1), "unit": "tokens/s (non-pad)",
         "settings": settings},
        {"name": f"packing: effective tokens/s, packed, {label}", "value": round(packed["tokens_per_second"], 1),
         "unit": "tokens/s (non-pad)", "baseline": round(unpacked["tokens_per_second"], 1), "baseline_name": base_name,
         "ratio": ratio(packed["tokens_per_second"], unpacked["tokens_per_second"]), "settings": settings},
        {"name": f"packing: padding fraction, unpacked, {label}", "value": round(unpacked["padding_fraction"], 3),
         "unit": "fraction", "settings": settings},
        {"name": f"packing: padding fraction, packed, {label}", "value": round(packed["padding_fraction"], 3),
         "unit": "fraction", "settings": settings},
        {"name": f"packing: peak memory, unpacked, {label}", "value": round(unpacked["peak_memory_mib"]),
         "unit": "MiB", "memory": unpacked["memory_kind"], "settings": settings},
        {"name": f"packing: peak memory, packed, {label}", "value": round(packed["peak_memory_mib"]),
         "unit": "MiB", "memory": packed["memory_kind"], "settings": settings},
    ]  # fmt: skip
    document = {
        "device": device,
        "steps": steps,
        "warmup": warmup,
        "micro_batch": args.micro,
        "seq": args.seq,
        "weight_decay": weight_decay,
        "runs": args.runs,
        "work": str(work),
        "models": {k: str(v) for k, v in models.items()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2))
    print(f"trainer bench: {len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
