"""GPU check of the Automodel trainer (issue: "GPU check, when a GPU is available").

Runs on whatever device torch sees (it also runs on CPU, for a dry run):
1. our trainer, LoRA and full weights (bf16 on GPU), N steps;
2. Hugging Face Trainer + peft on the same model, data, batch and LoRA config;
and prints tokens/s and MFU (6 x parameters x tokens/s / peak FLOP/s) of each.
MFU counts the model's parameters (frozen ones included, as the forward/backward
of a LoRA run still multiplies through them) and ignores attention FLOPs.

    bash hack/run-in-venv.sh test python tests/training/automodel/gpu_check.py \\
        --model "$(bash hack/run-in-venv.sh test python hack/smollm2.py)" --steps 20 --peak-tflops 989

--peak-tflops: dense bf16 peak of the card (H100 SXM 989, H200 989, A100 312).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from tiny_llama import write_jsonl  # noqa: E402
from trainer_config import automodel_spec, write_trainer_config  # noqa: E402


def rows(count: int, seed: int, repeats: tuple[int, int] = (4, 8)) -> list[dict[str, Any]]:
    """Addition rows whose prompt repeats the question a number of times in `repeats` (length)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        question = " ".join(f"Please add the numbers {a} and {b} carefully." for _ in range(rng.randint(*repeats)))
        out.append({"prompt": question + " Answer: ", "completion": f"{a} plus {b} is {a + b}."})
    return out


def our_run(
    model: Path, data: Path, work: Path, finetuning_type: str, steps: int, micro: int, seq: int
) -> dict[str, float]:
    from kubetune_trainer.automodel.train import train
    from kubetune_trainer.common.config import load_config
    from kubetune_trainer.common.metrics import MetricsWriter

    lora = (
        None if finetuning_type == "all_weights" else {"rank": 16, "alpha": 32, "merge": False, "target_modules": None}
    )
    spec = automodel_spec(
        training={"finetuning_type": finetuning_type, "max_seq_length": seq, "lora": lora},
        schedule={"max_steps": steps, "seed": 0, "val_check_interval": steps},
        batch={"global_batch_size": micro, "micro_batch_size": micro},
        optimizer={"learning_rate": 1e-4 if finetuning_type == "all_weights" else 1e-3},
    )
    output = work / f"ours-{finetuning_type}"
    config = write_trainer_config(
        work / f"{finetuning_type}.json",
        spec=spec,
        model=model,
        training_data=data,
        validation_data=data,
        output=output,
    )
    train(load_config(config))
    records = [m for m in MetricsWriter.read(output / "metrics.jsonl") if "tokens_per_second" in m]
    warm = records[2:] or records  # the first steps include allocator/kernel warm-up
    return {"tokens_per_second": sum(m["tokens_per_second"] for m in warm) / len(warm)}


def hf_run(
    model_dir: Path, data_rows: list[dict[str, Any]], work: Path, steps: int, micro: int, seq: int
) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from kubetune_trainer.automodel.model import apply_lora
    from kubetune_trainer.automodel.settings import LoraSettings
    from kubetune_trainer.data import FormatOptions, tokenize_rows

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    examples, _ = tokenize_rows(data_rows, tokenizer, FormatOptions(max_seq_length=seq))
    on_gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.bfloat16 if on_gpu else torch.float32, attn_implementation="sdpa"
    )
    model = apply_lora(model, LoraSettings(rank=16, alpha=32, target_modules=None, merge=False))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(items: list[dict[str, list[int]]]) -> dict[str, Any]:
        length = max(len(i["input_ids"]) for i in items)
        ids = torch.full((len(items), length), pad)
        labels = torch.full((len(items), length), -100)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for r, item in enumerate(items):
            n = len(item["input_ids"])
            ids[r, :n], labels[r, :n], mask[r, :n] = torch.tensor(item["input_ids"]), torch.tensor(item["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    times: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            if on_gpu:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - self.start, 0))

    args = TrainingArguments(
        output_dir=str(work / "hf"),
        per_device_train_batch_size=micro,
        max_steps=steps,
        learning_rate=1e-3,
        logging_steps=steps,
        save_strategy="no",
        report_to=[],
        bf16=on_gpu,
        use_cpu=not on_gpu,
        dataloader_drop_last=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=[dict(e) for e in examples], data_collator=collate, callbacks=[Clock()]
    )
    trainer.train()
    mean_tokens = sum(len(e["input_ids"]) for e in examples) / len(examples) * micro
    warm = times[2:] or times
    return {"tokens_per_second": mean_tokens / (sum(t for t, _ in warm) / len(warm))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(args.model))
    with torch.device("meta"):
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    data_rows = rows(args.micro_batch * (args.steps + 2), seed=0)
    results: dict[str, Any] = {
        "device": device,
        "parameters": parameters,
        "micro_batch": args.micro_batch,
        "seq": args.seq,
        "steps": args.steps,
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_jsonl(work / "data" / "train.jsonl", data_rows)
        for kind in ("lora", "all_weights"):
            results[f"ours_{kind}"] = our_run(args.model, data, work, kind, args.steps, args.micro_batch, args.seq)
        results["hf_peft_lora"] = hf_run(args.model, data_rows, work, args.steps, args.micro_batch, args.seq)
    for key in ("ours_lora", "ours_all_weights", "hf_peft_lora"):
        tps = results[key]["tokens_per_second"]
        results[key]["mfu"] = 6 * parameters * tps / (args.peak_tflops * 1e12)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
