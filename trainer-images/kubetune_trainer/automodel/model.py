"""Loading the student (and teacher), LoRA, and the data/tensor parallel wrapping."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubetune_trainer.automodel.distributed import Runtime
from kubetune_trainer.automodel.settings import LoraSettings
from kubetune_trainer.common.termination import TrainerError

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and lossy for tiny test models)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _check_model_dir(path: Path, what: str) -> None:
    if not (path / "config.json").exists():
        raise TrainerError(
            f"{what} directory {path} has no config.json; it must be a Hugging Face model directory "
            "(config.json + safetensors + tokenizer)"
        )


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    _check_model_dir(path, "model")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        # Padding positions carry label -100 and sit after a causal row's
        # real tokens, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: Path, dtype: torch.dtype, what: str = "model") -> nn.Module:
    from transformers import AutoModelForCausalLM

    _check_model_dir(path, what)
    # sdpa honours per-sample position ids (packing) through transformers' mask
    # builder; flash-attention would need a GPU build.
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def lora_config(settings: LoraSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=0.0,
        # peft's "all-linear" = every nn.Linear except the output head, which is
        # what the schema's `null = all linear layers` means for a causal LM.
        target_modules=settings.target_modules if settings.target_modules else "all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    from peft import get_peft_model

    try:
        peft_model: nn.Module = get_peft_model(model, lora_config(settings))
        return peft_model
    except ValueError as exc:
        raise TrainerError(f"spec.training.lora.target_modules: {exc}") from None


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def vocab_size_of(path: Path) -> int | None:
    config = json.loads((path / "config.json").read_text())
    value = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(value) if value is not None else None


def check_teacher_vocab(student_path: Path, teacher_path: Path, student_tokenizer: Any) -> None:
    """Logit distillation compares distributions over the same token ids."""
    _check_model_dir(teacher_path, "teacher model")
    student_vocab, teacher_vocab = vocab_size_of(student_path), vocab_size_of(teacher_path)
    if student_vocab != teacher_vocab:
        raise TrainerError(
            f"the teacher's vocabulary ({teacher_vocab} tokens, {teacher_path}) differs from the student's "
            f"({student_vocab} tokens, {student_path}); logit distillation needs the same tokenizer and "
            "vocabulary: pick a teacher from the student's model family"
        )
    if (teacher_path / "tokenizer.json").exists() or (teacher_path / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        teacher_tokenizer = AutoTokenizer.from_pretrained(str(teacher_path))
        if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
            raise TrainerError(
                f"the teacher's tokenizer ({teacher_path}) maps tokens to different ids than the student's "
                f"({student_path}); logit distillation needs the same tokenizer: pick a teacher from the "
                "student's model family"
            )


class Teacher:
    """The frozen teacher.

    teacher_precision picks its dtype; on CPU every precision is upcast to
    fp32 (CPU half-precision kernels are slow or missing). offload_teacher on
    a GPU keeps the weights in CPU memory and moves them to the GPU only for
    the teacher's forward pass of each micro batch, freeing the GPU memory
    for the student's backward pass.
    """

    def __init__(self, path: Path, precision: str, device: torch.device, offload: bool) -> None:
        dtype = PRECISION_DTYPES[precision] if device.type == "cuda" else torch.float32
        self.precision_used = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
        self.model = load_causal_lm(path, dtype, "teacher model")
        self.model.eval()
        self.model.requires_grad_(False)
        self.device = device
        self.offload = offload and device.type == "cuda"
        if not self.offload:
            self.model.to(device)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if self.offload:
            self.model.to(self.device)
        try:
            out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
            logits: torch.Tensor = out.logits.float()
            return logits
        finally:
            if self.offload:
                self.model.to("cpu")


def llama_tp_plan(model: nn.Module) -> dict[str, Any]:
    """Colwise q/k/v and gate/up, Rowwise o/down: one all-reduce per attention and MLP block.

    Works for Llama/Qwen/Mistral-style decoders whose attention reshapes with
    `-1` heads (so each rank runs its share of heads). Embeddings, norms and
    the head stay replicated. With LoRA, peft's wrapper is parallelised in place:
    the base Linear and lora_B shard like the original output dim, lora_A stays
    replicated for colwise layers; the reverse for rowwise ones.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, Any] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)
        # peft nests the original Linear as `<proj>.base_layer` and adds
        # `<proj>.lora_A.default` / `<proj>.lora_B.default`.
        if leaf == "base_layer":
            proj = parent[-2]
            role = "base"
        elif len(parent) >= 3 and parent[-2] in ("lora_A", "lora_B"):
            proj = name.rsplit(".", 3)[-3]
            role = parent[-2]
        else:
            proj = leaf
            role = "base"
        colwise = proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
        rowwise = proj in ("o_proj", "down_proj")
        if colwise and role in ("base", "lora_B"):
            plan[name] = ColwiseParallel()
        elif rowwise and role in ("base", "lora_A"):
            plan[name] = RowwiseParallel()
    return plan


def apply_tensor_parallel(model: nn.Module, runtime: Runtime) -> None:
    from torch.distributed.tensor.parallel import parallelize_module

    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", heads)
    tp = runtime.parallel.tp
    if heads is None or heads % tp or (kv_heads or heads) % tp:
        raise TrainerError(
            f"parallelism.tensor_parallel_size {tp} must divide the model's attention heads ({heads}) and "
            f"key/value heads ({kv_heads})"
        )
    plan = llama_tp_plan(model)
    if not plan:
        raise TrainerError(
            "tensor parallelism found no q/k/v/o_proj or gate/up/down_proj layers; only Llama/Qwen-style "
            "decoders are supported with tensor_parallel_size > 1"
        )
    parallelize_module(model, runtime.mesh["tp"], plan)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    inner: Any = model
    for attr in ("base_model", "model"):
        # peft: PeftModel.base_model (LoraModel).model (the CausalLM).model (the decoder)
        while hasattr(inner, attr) and not hasattr(inner, "layers"):
            inner = getattr(inner, attr)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TrainerError("cannot find the decoder layers of this model (expected model.layers)")
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def apply_fsdp(model: nn.Module, runtime: Runtime) -> None:
    """FSDP2: one shard group per decoder layer, then the rest at the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from kubetune_trainer.automodel.expert_parallel import expert_parameters

    # With expert parallel the experts are already split over the dp ranks (Shard(0) DTensors):
    # FSDP2 must neither gather them nor average their (different) gradients.
    ignored = expert_parameters(model) if (runtime.parallel.ep or 1) > 1 else None
    mesh = runtime.fsdp_mesh
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if runtime.device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored)
