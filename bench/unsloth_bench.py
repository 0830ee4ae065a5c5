"""Unsloth trainer against the HF Trainer + peft baseline of bench/trainer_bench.py (issue 9, item 5).

Runs in the unsloth venv (a separate process from trainer_bench.py, whose rows it reads):
the same models, data file, batch, sequence length and LoRA rank, through the UnslothJob
trainer's entrypoint. Loading is made comparable to the fp32 HF baseline on CPU
(load_in_4bit false, dtype float32, no gradient checkpointing); on a GPU the trainer's
own bf16 defaults apply, as the baseline's do. tokens/s is the trainer's own per-step
figure (trl's token count over the time between log events, logging every step).

    bash hack/run-in-venv.sh unsloth python bench/unsloth_bench.py \\
        --trainer-rows /tmp/trainer.json --out /tmp/unsloth.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "training" / "unsloth")]

from trainer_common import peak_memory_mib, run_measured, settings_label, warm_median  # noqa: E402


def measure(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    import unsloth  # noqa: F401  # before transformers/peft, as in the trainer: it patches them
    from unsloth_helpers import config_document, read_metrics, unsloth_spec

    from kubetune_trainer.unsloth.__main__ import main as entrypoint

    gpu = torch.cuda.is_available()
    model_section: dict[str, Any] = {"name": "bench-model", "max_seq_length": a.seq}
    if not gpu:
        model_section |= {"load_in_4bit": False, "dtype": "float32"}
    training: dict[str, Any] = {"finetuning_type": a.finetuning, "use_gradient_checkpointing": "false"}
    if a.finetuning == "lora":
        training["lora"] = {"rank": 16, "alpha": 32}
    else:
        model_section["load_in_4bit"] = False  # full weights cannot be trained on quantized weights
    spec = unsloth_spec(
        model=model_section,
        training=training,
        schedule={"max_steps": a.steps, "logging_steps": 1, "seed": 0},
        batch={"per_device_train_batch_size": a.micro},
        optimizer={"learning_rate": 1e-3 if a.finetuning == "lora" else 1e-4},
    )
    work = Path(a.scratch)
    output = work / "output"
    document = config_document(spec, model=a.model, training_data=a.data, output=output)
    config = work / "config.json"
    config.write_text(json.dumps(document, indent=2))
    os.environ["KUBETUNE_TERMINATION_LOG"] = str(work / "termination-log")
    rc = entrypoint(["--config", str(config)])
    if rc:
        raise RuntimeError(f"the Unsloth entrypoint exited {rc}")
    values = [float(m["tokens_per_second"]) for m in read_metrics(output) if "tokens_per_second" in m]
    # The first logged step has no tokens/s (it needs the previous log's time): one fewer to skip.
    tps, n = warm_median(values, max(a.warmup - 1, 0))
    memory, memory_kind = peak_memory_mib()
    return {"tokens_per_second": tps, "steps_measured": n, "peak_memory_mib": memory, "memory_kind": memory_kind}


def measure_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="unsloth_bench.py measure")
    for name in ("model", "data", "scratch", "result", "finetuning"):
        p.add_argument(f"--{name}", required=True)
    for name in ("steps", "warmup", "micro", "seq"):
        p.add_argument(f"--{name}", type=int, required=True)
    a = p.parse_args(argv)
    Path(a.result).write_text(json.dumps(measure(a)))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "measure":
        measure_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer-rows", type=Path, required=True, help="trainer_bench.py's --out file")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", help="comma-separated model labels to measure (default: all of trainer-rows)")
    args = parser.parse_args()
    base = json.loads(args.trainer_rows.read_text())
    by_name = {r["name"]: r for r in base["rows"]}
    work = Path(base["work"])
    steps, warmup, micro, seq = base["steps"], base["warmup"], base["micro_batch"], base["seq"]

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    rows: list[dict[str, Any]] = []
    wanted = [m.strip() for m in args.models.split(",")] if args.models else list(base["models"])
    unknown = [m for m in wanted if m not in base["models"]]
    if unknown:
        parser.error(f"--models: {unknown} not among the trainer rows' models {list(base['models'])}")
    for label, model in base["models"].items():
        if label not in wanted:
            continue
        settings = settings_label(label, micro, seq, steps, warmup, device)
        for finetuning in ("lora", "all_weights"):
            tag = f"unsloth-{label.split()[0].lower()}-{finetuning}"
            scratch = work / "runs" / tag
            scratch.mkdir(parents=True, exist_ok=True)
            argv = [str(Path(__file__).resolve()), "measure", "--model", model]
            argv += ["--data", str(work / "data" / "uniform"), "--scratch", str(scratch)]
            argv += ["--result", str(scratch / "result.json"), "--finetuning", finetuning]
            argv += ["--steps", str(steps), "--warmup", str(warmup), "--micro", str(micro), "--seq", str(seq)]
            started = time.monotonic()
            load = float(Path("/proc/loadavg").read_text().split()[0])
            res = run_measured(argv, scratch / "result.json", scratch / "log.txt")
            load = round((load + float(Path("/proc/loadavg").read_text().split()[0])) / 2, 2)
            print(f"unsloth bench: {tag}: {res['tokens_per_second']:.1f} tokens/s, "
                  f"{res['peak_memory_mib']:.0f} MiB ({time.monotonic() - started:.0f} s)", flush=True)  # fmt: skip
            what = f"{label}, {finetuning}"
            for kind, key, unit, digits in (
                ("tokens/s", "tokens_per_second", "tokens/s", 1),
                ("peak memory", "peak_memory_mib", "MiB", 0),
            ):
                hf_name = f"trainer {kind}: HF Trainer + peft, {what}"
                row: dict[str, Any] = {
                    "name": f"trainer {kind}: Unsloth, {what}",
                    "value": round(res[key], digits),
                    "unit": unit,
                    "settings": settings + (", fp32, no 4-bit, no gradient checkpointing" if "CPU" in device else ""),
                }
                if hf_name in by_name:
                    hf_value = float(by_name[hf_name]["value"])
                    row |= {"baseline": hf_value, "baseline_name": hf_name,
                            "ratio": round(res[key] / hf_value, 3) if hf_value else None}  # fmt: skip
                if kind == "tokens/s":
                    row["steps_measured"] = res["steps_measured"]
                    row["load_average"] = load
                else:
                    row["memory"] = res["memory_kind"]
                rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    print(f"unsloth bench: {len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
