"""A tiny Llama and its tokenizer, built on the fly for the training tests.

No downloads: the tokenizer is a byte-level BPE trained with the `tokenizers`
library on a synthetic corpus, the model is a randomly initialised
`LlamaForCausalLM`. Both are saved as an ordinary Hugging Face directory, so the
trainers load them exactly like a real model mounted into a pod.

Shared by the Automodel and the Unsloth test tiers; keep it free of anything
the Unsloth stack (transformers<=5.17) lacks. torch and transformers are
imported inside the functions so that importing this module is cheap.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

PAD = "<pad>"
BOS = "<s>"
EOS = "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)

# `<|role|>` is a single special token, so the template renders each turn as
# `<|user|>\ncontent<|end|>\n`; the assistant turn's `<|end|>` is the stop token.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

WORDS = [
    "the",
    "a",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "zero",
    "plus",
    "minus",
    "equals",
    "what",
    "is",
    "add",
    "sum",
    "of",
    "and",
    "answer",
    "question",
    "reverse",
    "copy",
    "word",
    "list",
    "number",
    "red",
    "green",
    "blue",
    "cat",
    "dog",
    "bird",
    "fish",
    "tree",
    "house",
    "river",
    "small",
    "big",
    "fast",
    "slow",
    "hello",
    "world",
    "please",
    "repeat",
    "after",
    "me",
    "say",
    "it",
    "again",
    "yes",
    "no",
    "ok",
    "done",
]

DEFAULT_VOCAB_SIZE = 384


def synthetic_corpus(num_lines: int = 2000, seed: int = 0) -> list[str]:
    """Lines covering the words, digits and punctuation the test tasks use."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        numbers = [str(rng.randint(0, 99)) for _ in range(rng.randint(0, 3))]
        tokens = words + numbers
        rng.shuffle(tokens)
        lines.append(" ".join(tokens) + rng.choice([".", "?", "!", ":", ","]))
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Any:
    """Train a byte-level BPE tokenizer and save it (with the chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Plain text gets a BOS like Llama's tokenizer; chat-rendered text carries
    # the BOS from the template and is tokenized with add_special_tokens=False.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
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
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_llama(
    out_dir: Path,
    *,
    hidden_size: int = 48,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 96,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 256,
) -> Path:
    """Save a random tiny Llama + tokenizer into out_dir (fp32) and return it.

    Different `seed`/sizes with the same `vocab_size` give models that share
    the tokenizer, as a distillation teacher and student must. With
    `tie_word_embeddings` the checkpoint has no lm_head.weight (the head is the
    input embedding).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / ".complete").exists():
        return out_dir
    tokenizer = build_tokenizer(out_dir, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / ".complete").write_text("ok\n")
    return out_dir


def build_tiny_qwen3_moe(
    out_dir: Path,
    *,
    hidden_size: int = 48,
    num_layers: int = 2,
    num_experts: int = 4,
    top_k: int = 2,
    moe_intermediate_size: int = 32,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
) -> Path:
    """Save a random tiny Qwen3-MoE (every layer sparse: 4 experts, top-2) + tokenizer (fp32).

    Qwen3-MoE because transformers 5 keeps its experts as one fused module (3D gate_up_proj /
    down_proj), the layout expert parallelism shards; the router aux loss stays off
    (output_router_logits False, the config's default).
    """
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / ".complete").exists():
        return out_dir
    tokenizer = build_tokenizer(out_dir, vocab_size=vocab_size)
    config = Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * moe_intermediate_size,
        moe_intermediate_size=moe_intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / ".complete").write_text("ok\n")
    return out_dir


def task_rows(num_rows: int, *, kind: str = "prompt_completion", seed: int = 0) -> list[dict[str, Any]]:
    """A small learnable task (addition written in words) in one of the row shapes.

    kind: "prompt_completion" ({prompt, completion}), "messages" ({messages}),
    "text" ({text}) or "columns" ({question, answer}, for dataset.prompt_template).
    """
    rng = random.Random(seed)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    rows: list[dict[str, Any]] = []
    for _ in range(num_rows):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        question = f"what is {names[a]} plus {names[b]}?"
        answer = f"the answer is {a + b}."
        if kind == "prompt_completion":
            rows.append({"prompt": question + " ", "completion": answer})
        elif kind == "messages":
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
        elif kind == "text":
            rows.append({"text": f"{question} {answer}"})
        elif kind == "columns":
            rows.append({"question": question, "answer": answer})
        else:
            raise ValueError(f"task_rows: unknown kind {kind!r}")
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path
