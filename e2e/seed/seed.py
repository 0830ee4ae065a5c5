"""Put a base model and a chat dataset on the e2e claims; runs in a Job on the cluster, in the
Automodel trainer image (it has torch, transformers and tokenizers).

SmolLM2-135M-Instruct and SmolLM2-360M-Instruct from the Hugging Face Hub, at the paths
examples/entities.yaml names (needs internet from the pod). e2e/run.sh's E2E_MODE=examples runs
it; the CPU mode seeds through the end-to-end tier's claims pod instead (tests/e2e).

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", action="append", default=[], help="job name whose output directory to create")
    args = parser.parse_args()

    root = Path(os.environ.get("KUBETUNE_SEED_ROOT", "/"))
    rows = chat_rows(96, seed=0)
    for split, part in (("train", rows[:80]), ("validation", rows[80:])):
        directory = root / "datasets" / "chat" / split
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    from huggingface_hub import snapshot_download

    for repo, path in (
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
        ("HuggingFaceTB/SmolLM2-360M-Instruct", "smollm2-360m-instruct"),
    ):
        snapshot_download(repo, local_dir=root / "models" / path, allow_patterns=["*.json", "*.safetensors", "*.txt"])
    for job in args.job:
        (root / "output" / job).mkdir(parents=True, exist_ok=True)
    print(f"seeded: SmolLM2 135M and 360M, {len(rows)} chat rows, output dirs for {args.job}")


if __name__ == "__main__":
    main()
