"""Put a base model and a chat dataset on the e2e claims; runs in a Job on the cluster, in the
Automodel trainer image (it has torch, transformers and tokenizers).

  --model tiny   a tiny random Llama and a BPE tokenizer trained here (no download; CPU runs)
  --model hub    SmolLM2-135M-Instruct and SmolLM2-360M-Instruct from the Hugging Face Hub,
                 at the paths examples/entities.yaml names (needs internet from the pod)

Writes, under the mounted claims (under $KUBETUNE_SEED_ROOT instead of / when set, for tests):
  /models/<model dirs>                    Hugging Face format
  /datasets/chat/train/rows.jsonl         {"messages": [...]} rows
  /datasets/chat/validation/rows.jsonl
  /output/<job>/                          one empty directory per job name given, writable
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ["<pad>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def chat_rows(count: int, seed: int) -> list[dict[str, list[dict[str, str]]]]:
    """Small additions in words: easy to learn, so a falling loss is visible in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, 4), rng.randint(0, 5)
        question = f"what is {NUMBERS[a]} plus {NUMBERS[b]}?"
        rows.append(
            {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": NUMBERS[a + b]}]}
        )
    return rows


def write_tiny_model(out: Path, rows: list[dict[str, list[dict[str, str]]]]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [m["content"] for row in rows for m in row["messages"]]
    tok.train_from_iterator(corpus * 4, trainers.BpeTrainer(vocab_size=256, special_tokens=SPECIAL))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|end|>", chat_template=CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "hub"), required=True)
    parser.add_argument("--job", action="append", default=[], help="job name whose output directory to create")
    args = parser.parse_args()

    root = Path(os.environ.get("KUBETUNE_SEED_ROOT", "/"))
    rows = chat_rows(96, seed=0)
    for split, part in (("train", rows[:80]), ("validation", rows[80:])):
        directory = root / "datasets" / "chat" / split
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    if args.model == "tiny":
        write_tiny_model(root / "models" / "tiny-llama", rows)
    else:
        from huggingface_hub import snapshot_download

        for repo, path in (
            ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
            ("HuggingFaceTB/SmolLM2-360M-Instruct", "smollm2-360m-instruct"),
        ):
            snapshot_download(
                repo, local_dir=root / "models" / path, allow_patterns=["*.json", "*.safetensors", "*.txt"]
            )
    for job in args.job:
        (root / "output" / job).mkdir(parents=True, exist_ok=True)
    print(f"seeded: model={args.model}, {len(rows)} chat rows, output dirs for {args.job}")


if __name__ == "__main__":
    main()
