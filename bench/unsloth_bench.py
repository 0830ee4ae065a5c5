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

from trainer_common import combine, peak_memory_mib, run_measured, settings_label, warm_median  # noqa: E402


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
        # The HF baseline's optimizer: AdamW with its weight decay (Unsloth's CPU backend then
        # runs torch's fused AdamW, the same update rule; the trainer says so in its log).
        optimizer={
            "learning_rate": 1e-3 if a.finetuning == "lora" else 1e-4,
            "weight_decay": a.weight_decay,
            "optim": "adamw_torch",
        },
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


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def measured(argv: list[str], scratch: Path, what: str) -> dict[str, Any]:
    """One measurement in a fresh interpreter, with the load average around it."""
    started, load = time.monotonic(), load_average()
    res = run_measured(argv, scratch / "result.json", scratch / "log.txt")
    res["load_average"] = round((load + load_average()) / 2, 2)
    elapsed = time.monotonic() - started
    print(f"unsloth bench: {what}: {res['tokens_per_second']:.1f} tokens/s, "
          f"{res['peak_memory_mib']:.0f} MiB ({elapsed:.0f} s)", flush=True)  # fmt: skip
    return res


def measure_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="unsloth_bench.py measure")
    for name in ("model", "data", "scratch", "result", "finetuning"):
        p.add_argument(f"--{name}", required=True)
    for name in ("steps", "warmup", "micro", "seq"):
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--weight-decay", type=float, required=True)
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
    parser.add_argument(
        "--runs", type=int, default=1, help="repetitions of each pair (Unsloth, then HF in this venv); medians"
    )
    args = parser.parse_args()
    base = json.loads(args.trainer_rows.read_text())
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
            common = ["--finetuning", finetuning, "--steps", str(steps), "--warmup", str(warmup)]
            common += ["--micro", str(micro), "--seq", str(seq), "--weight-decay", str(base.get("weight_decay", 0.0))]
            sides: dict[str, list[dict[str, Any]]] = {"unsloth": [], "hf": []}
            for r in range(args.runs):
                # Alternating, each in a fresh interpreter of this venv: HF Trainer + peft with this
                # venv's transformers and peft (the versions Unsloth patches), beside Unsloth.
                for side in ("unsloth", "hf"):
                    scratch = work / "runs" / f"{tag}-{side}-{r}"
                    scratch.mkdir(parents=True, exist_ok=True)
                    if side == "unsloth":
                        argv = [str(Path(__file__).resolve()), "measure", "--model", model]
                        argv += ["--data", str(work / "data" / "uniform")]
                    else:
                        argv = [str(HERE / "trainer_bench.py"), "measure", "hf", "--model", model]
                        argv += ["--data", str(work / "data" / "uniform" / "train.jsonl")]
                        argv += ["--validation", str(work / "data" / "validation" / "val.jsonl")]
                    argv += ["--scratch", str(scratch), "--result", str(scratch / "result.json"), *common]
                    sides[side].append(measured(argv, scratch, f"{tag} {side} run {r}"))
            res, hf = combine(sides["unsloth"]), combine(sides["hf"])
            load = res["load_average"]
            what = f"{label}, {finetuning}"
            for kind, key, unit, digits in (
                ("tokens/s", "tokens_per_second", "tokens/s", 1),
                ("peak memory", "peak_memory_mib", "MiB", 0),
            ):
                hf_name = f"trainer {kind}: HF Trainer + peft (unsloth venv), {what}"
                rows.append(
                    {
                        "name": hf_name,
                        "value": round(hf[key], digits),
                        "unit": unit,
                        "settings": settings,
                        "runs": args.runs,
                    }
                )
                row: dict[str, Any] = {
                    "name": f"trainer {kind}: Unsloth, {what}",
                    "value": round(res[key], digits),
                    "unit": unit,
                    "settings": settings
                    + (
                        ", fp32, no 4-bit, no gradient checkpointing, fused AdamW (Unsloth's CPU backend)"
                        if "CPU" in device
                        else ""
                    ),
                }
                hf_value = float(hf[key])
                row |= {"baseline": round(hf_value, digits), "baseline_name": hf_name, "runs": args.runs,
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
