"""GPU check of the Unsloth trainer, run by gpu_check.sh on a machine with a CUDA GPU.

Runs the trainer's own entrypoint (as the pod does) for: QLoRA 4-bit + adamw_8bit
+ packing, 8-bit loading, full weights, and a merged_16bit save that plain
transformers reloads on the GPU; and the same QLoRA job on plain transformers +
peft + trl + bitsandbytes (a separate process that never imports unsloth) on the
same random ~0.5B Llama, tokens and batch. Prints a table and writes
OUT/gpu_check.json. Exits non-zero when a run fails or the GPU run substituted
any setting (on a GPU every field must be honoured).

Imports the trainer (trainer-images) and the operator's renderer (operator), which
gpu_check.sh puts on PYTHONPATH; nothing from tests/: the model, tokenizer and rows it
needs are made here.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STEPS = 20
BATCH = 8
SEQ = 1024


# Random sentences over a small vocabulary, for the tokenizer's training and the rows. The
# same words, special tokens and chat template as the training tests' tiny Llama
# (tests/training/tiny_llama.py), so that rows tokenize to the same lengths as in earlier
# runs of this check and their numbers stay comparable.
WORDS = [
    "the", "a", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "zero", "plus",
    "minus", "equals", "what", "is", "add", "sum", "of", "and", "answer", "question", "reverse", "copy",
    "word", "list", "number", "red", "green", "blue", "cat", "dog", "bird", "fish", "tree", "house", "river",
    "small", "big", "fast", "slow", "hello", "world", "please", "repeat", "after", "me", "say", "it",
    "again", "yes", "no", "ok", "done",
]  # fmt: skip
PAD, BOS, EOS = "<pad>", "<s>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def sentences(count: int, seed: int) -> list[str]:
    """Lines of 3 to 12 words and up to 3 numbers, shuffled, with a closing mark."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        tokens = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        tokens += [str(rng.randint(0, 99)) for _ in range(rng.randint(0, 3))]
        rng.shuffle(tokens)
        lines.append(" ".join(tokens) + rng.choice([".", "?", "!", ":", ","]))
    return lines


def build_tokenizer(out: Path, vocab_size: int) -> Any:
    """A byte-level BPE trained on `sentences`, saved with its chat template; plain text gets a BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sentences(2000, seed=0), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast


def build_model(work: Path) -> Path:
    """A random Llama of about 0.5B parameters (throughput needs no trained weights) + the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = work / "model"
    if (out / "config.json").exists():
        return out
    tokenizer = build_tokenizer(out, vocab_size=384)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    return out


def write_data(work: Path) -> Path:
    """Rows of 40 to 700 tokens, so that packing has padding to remove."""
    lines = sentences(20000, seed=0)
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.sample(lines, rng.randint(4, 60)))} for _ in range(600)]
    path = work / "data" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return work / "data"


def config_document(name: str, model_dir: Path, data: Path, out: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The trainer config the operator would render for an UnslothJob with these sections
    (each merged into the defaults), with the paths of this machine."""
    from kubetune.api.resources import UNSLOTH
    from kubetune.render import NO_PROGRESS, TrainerPaths, render_trainer_config
    from kubetune_api.unsloth import UnslothJobSpec

    document: dict[str, Any] = {"model": {"name": "tiny-llama"}, "dataset": {"path": "train"}}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(document.get(key), dict):
            document[key] = {**document[key], **value}
        else:
            document[key] = copy.deepcopy(value)
    return render_trainer_config(
        UNSLOTH,
        name=name,
        namespace="default",
        uid="00000000-0000-0000-0000-000000000000",
        spec=UnslothJobSpec.model_validate(document),
        paths=TrainerPaths(model=str(model_dir), training_data=str(data), output=str(out)),
        progress=NO_PROGRESS,
    )


def trainer_run(name: str, work: Path, model_dir: Path, data: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    sections = {
        "model": {"max_seq_length": SEQ},
        "schedule": {"max_steps": STEPS, "logging_steps": 5},
        "batch": {"per_device_train_batch_size": BATCH},
        **overrides,
    }
    out = work / name
    config = work / f"{name}.json"
    config.write_text(json.dumps(config_document(name, model_dir, data, out, sections)))
    env = {**os.environ, "KUBETUNE_TERMINATION_LOG": str(work / f"{name}.termination-log")}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer.unsloth", "--config", str(config)],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        check=False,
    )
    (work / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {
            "name": name,
            "ok": False,
            "error": (work / f"{name}.termination-log").read_text().strip(),
            "log_tail": (done.stdout + done.stderr)[-3000:],
        }
    result = json.loads((out / "result.json").read_text())
    return {
        "name": name,
        "ok": True,
        "wall_s": round(time.monotonic() - started, 1),
        "substitutions": result["substitutions"],
        "quantized_4bit": result["quantized_4bit"],
        "quantized_8bit": result["quantized_8bit"],
        "output_dir": result["output_dir"],
        "tokens_per_s": round(result["train_tokens"] / result["train_runtime_s"], 1)
        if result.get("train_tokens") and result.get("train_runtime_s")
        else None,
        "peak_gpu_memory_gib": result["peak_gpu_memory_gib"],
        "train_loss": result["train_loss"],
    }


BASELINE = r"""
import json, sys, time, torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer
from kubetune_trainer.unsloth.dataset import load_tokenized_dataset
model_dir, data_dir, out_dir, steps, batch, seq = sys.argv[1:7]
steps, batch, seq = int(steps), int(batch), int(seq)
assert "unsloth" not in sys.modules
tokenizer = AutoTokenizer.from_pretrained(model_dir)
quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                             device_map={"": 0})
model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
dataset, _ = load_tokenized_dataset(data_dir, tokenizer=tokenizer, text_field="text", apply_chat_template=False,
                                    max_seq_length=seq)
args = SFTConfig(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch, learning_rate=2e-4,
                 optim="adamw_8bit", bf16=True, max_length=seq, packing=True, logging_steps=5, save_strategy="no",
                 report_to="none", seed=3407, gradient_checkpointing=True,
                 gradient_checkpointing_kwargs={"use_reentrant": False}, disable_tqdm=True)
tokens = {}
from transformers import TrainerCallback
class Count(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "num_tokens" in logs:
            tokens["n"] = float(logs["num_tokens"])
trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=args, callbacks=[Count()])
torch.cuda.reset_peak_memory_stats()
result = trainer.train()
print("BASELINE " + json.dumps({"tokens_per_s": round(tokens["n"] / result.metrics["train_runtime"], 1),
    "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
    "train_loss": result.training_loss}))
"""


def baseline_run(work: Path, model: Path, data: Path) -> dict[str, Any]:
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            BASELINE,
            str(model),
            str(data),
            str(work / "baseline"),
            str(STEPS),
            str(BATCH),
            str(SEQ),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    (work / "baseline.log").write_text(done.stdout + done.stderr)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BASELINE ")), None)
    if done.returncode != 0 or line is None:
        return {"name": "plain_trl_qlora", "ok": False, "log_tail": (done.stdout + done.stderr)[-3000:]}
    return {
        "name": "plain_trl_qlora",
        "ok": True,
        "wall_s": round(time.monotonic() - started, 1),
        **json.loads(line[len("BASELINE ") :]),
    }


def reload_merged(path: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0})
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("what is two plus three?", return_tensors="pt").to("cuda")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    return {"dtype": str(model.dtype), "generated_tokens": int(out.shape[1] - ids["input_ids"].shape[1])}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    options = parser.parse_args()
    options.work.mkdir(parents=True, exist_ok=True)
    options.out.mkdir(parents=True, exist_ok=True)
    import torch

    card = torch.cuda.get_device_name(0)
    model, data = build_model(options.work), write_data(options.work)
    runs = [
        trainer_run("unsloth_qlora", options.work, model, data, {"dataset": {"packing": True}}),
        baseline_run(options.work, model, data),
        trainer_run(
            "unsloth_8bit",
            options.work,
            model,
            data,
            {"model": {"max_seq_length": SEQ, "load_in_4bit": False, "load_in_8bit": True}},
        ),
        trainer_run(
            "unsloth_full",
            options.work,
            model,
            data,
            {"model": {"max_seq_length": SEQ, "load_in_4bit": False}, "training": {"finetuning_type": "all_weights"}},
        ),
        trainer_run(
            "unsloth_merged_16bit",
            options.work,
            model,
            data,
            {"schedule": {"max_steps": 5, "logging_steps": 5}, "output": {"save_method": "merged_16bit"}},
        ),
    ]
    merged = next(r for r in runs if r["name"] == "unsloth_merged_16bit")
    if merged["ok"]:
        merged["reload"] = reload_merged(merged["output_dir"])
    summary = {
        "card": card,
        "model": "random Llama ~0.5B (hidden 1536, 16 layers, vocab 32000)",
        "steps": STEPS,
        "batch": BATCH,
        "max_seq_length": SEQ,
        "runs": runs,
    }
    (options.out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    print(f"card: {card}")
    print(f"{'run':24} {'ok':3} {'tokens/s':>10} {'peak GiB':>9} {'substitutions'}")
    for r in runs:
        subs = ", ".join(s["field"] for s in r.get("substitutions", [])) or "-"
        print(
            f"{r['name']:24} {'yes' if r['ok'] else 'NO':3} {r.get('tokens_per_s') or '-':>10} "
            f"{r.get('peak_gpu_memory_gib') or '-':>9} {subs}"
        )
    failed = [r["name"] for r in runs if not r["ok"]]
    substituted = [r["name"] for r in runs if r.get("substitutions")]
    if failed or substituted:
        print(f"FAIL: failed runs {failed}, runs with substitutions on GPU {substituted}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
