"""What `make demo` shows after training: held-out loss before and after (the
trainer validates at step 0 and at the end), one held-out prompt answered by the
base model and by base + adapter, where the adapter is, and how long it took.
The last line is `held-out loss: BEFORE -> AFTER`, for scripts."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def held_out_losses(metrics: Path) -> tuple[float, float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    val = [r for r in rows if "val_loss" in r]
    if len(val) < 2:
        raise SystemExit(f"{metrics} has {len(val)} validation rows; the demo needs the one before and after training")
    return float(val[0]["val_loss"]), float(val[-1]["val_loss"])


def answer(model: torch.nn.Module, tokenizer: AutoTokenizer, prompt: str) -> str:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return str(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)).strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--validation", required=True, type=Path)
    parser.add_argument("--started", required=True, type=float, help="epoch seconds when the demo began")
    args = parser.parse_args()

    before, after = held_out_losses(args.run / "metrics.jsonl")
    adapter = args.run / "adapter"
    row = json.loads(args.validation.read_text().splitlines()[0])
    prompt, expected = row["messages"][0]["content"], row["messages"][1]["content"]

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    base.eval()
    said_before = answer(base, tokenizer, prompt)
    tuned = PeftModel.from_pretrained(base, adapter)
    tuned.eval()
    said_after = answer(tuned, tokenizer, prompt)

    def one_block(text: str) -> str:  # multi-line answers stay under their label
        return text.replace("\n", "\n" + " " * 20)

    print()
    print(f"prompt (held out):  {prompt}")
    print(f"expected:           {expected}")
    print(f"base model said:    {one_block(said_before)}")
    print(f"fine-tuned said:    {one_block(said_after)}")
    print(f"adapter:            {adapter}")
    print(f"loss curve:         {args.run / 'loss.png'}")
    print(f"took:               {time.time() - args.started:.0f}s")
    print(f"held-out loss: {before:.4f} -> {after:.4f}")


if __name__ == "__main__":
    main()
