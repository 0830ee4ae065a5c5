"""Sharded loading: build the model on the meta device, shard it, then let each rank read only its shard.

Without this every rank of a distributed job loads the whole model into host memory before
FSDP2 / tensor parallel / pipeline parallel throw most of it away, so N ranks on a node hold
N full copies at once. Here:

1. The model is built with its parameters on the meta device (no memory) and its buffers
   real: `accelerate.init_empty_weights(include_buffers=False)` runs the constructor, so
   non-persistent buffers such as the rotary `inv_freq` get the values the constructor
   computes; they are not in the checkpoint and `to_empty` would leave them as garbage.
   LoRA adapters are injected by peft on the meta model too (they follow the base layer's
   device).
2. The caller splits (pipeline), parallelises (tensor parallel) and shards (FSDP2) the
   meta model exactly as it would the loaded one.
3. `materialise`: `to_empty` allocates each rank's local shards only; then
   `torch.distributed.checkpoint.load` with its `HuggingFaceStorageReader` fills them from
   the model's safetensors files. DCP plans one read per local shard (a DTensor's chunk, or
   a whole plain tensor) and the reader uses `safe_open(...).get_slice`, so each rank reads
   only the rows and columns it keeps.

Why DCP's Hugging Face reader rather than `set_model_state_dict(full_state_dict=True,
broadcast_from_rank0=True)`: with the broadcast, rank 0 still holds the whole state dict in
host memory (the figure we want to halve), and every shard crosses the network; with the
reader no rank ever holds more than its shard plus one tensor slice, and the slicing for
FSDP2 (uneven dim-0 chunks), tensor parallel (column/row shards) and pipeline stages (a
subset of names) is DCP's, not ours.

The LoRA adapters' initial values must be the ones today's path draws (the parity tests
compare against one process): peft draws them from the CPU generator right after
`torch.manual_seed(seed)`, while it injects the adapters. `lora_initial_values` repeats that
injection on a second skeleton whose base weights are zero-stride CPU views (no memory), so
peft itself draws the same numbers in the same order; they are copied into the sharded
adapters.

Not covered, and loaded the old way with a log line naming why: checkpoints whose tensor
names or shapes differ from the model's parameters (transformers converts some layouts at
load time, e.g. fused MoE experts); and single-process runs, which hold one copy anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubetune_trainer.automodel.distributed import Runtime
from kubetune_trainer.automodel.model import _check_model_dir, apply_lora
from kubetune_trainer.automodel.settings import LoraSettings
from kubetune_trainer.common.termination import TrainerError

# Bench hook: load the whole model on every rank as before sharded loading existed, so
# bench/sharded_loading_bench.py can measure both in the same run.
REPLICATED_LOADING_ENV = "KUBETUNE_REPLICATED_LOADING"

PEFT_PREFIX = "base_model.model."


@dataclass
class ShardedLoad:
    """A meta model and what `materialise` needs to fill it after it has been sharded."""

    model: nn.Module
    path: Path
    # Model parameter/buffer name -> tensor name in the safetensors files (tied parameters
    # map every alias to the one name the checkpoint has).
    checkpoint_names: dict[str, str]
    # Values not in the checkpoint: the LoRA adapters' initial values and every buffer.
    adapters: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)


def checkpoint_tensors(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of every tensor in the model's safetensors files (headers only)."""
    from safetensors import safe_open

    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in list(f.keys()):
                piece = f.get_slice(key)
                tensors[key] = (tuple(piece.get_shape()), str(piece.get_dtype()))
    return tensors


def _meta_causal_lm(path: Path, dtype: torch.dtype) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    with init_empty_weights(include_buffers=False):
        # sdpa: the same attention as load_causal_lm (per-sample position ids for packing).
        model: Any = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, dtype=dtype, attn_implementation="sdpa"
        )
    # init_empty_weights re-creates each module's parameters on the meta device, which
    # unties tied ones (lm_head / embed_tokens); from_pretrained ties them, so do the same.
    model.tie_weights()
    model.config.use_cache = False
    built: nn.Module = model
    return built


def _base_name(name: str) -> str:
    """The checkpoint's name of a model parameter: peft adds a prefix and `.base_layer`."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX) :]
    return name.replace(".base_layer.", ".")


def lora_initial_values(path: Path, dtype: torch.dtype, lora: LoraSettings, seed: int) -> dict[str, torch.Tensor]:
    """The adapters' initial values exactly as `apply_lora` after `torch.manual_seed(seed)` draws them
    on a loaded model (see the module docstring)."""
    shadow = _meta_causal_lm(path, dtype)
    for module in shadow.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            # A zero-stride view of one element: the shape and dtype peft looks at, no memory.
            fake = torch.zeros(1, dtype=param.dtype).expand(param.shape)
            setattr(module, name, nn.Parameter(fake, requires_grad=param.requires_grad))
    torch.manual_seed(seed)
    shadow = apply_lora(shadow, lora)
    return {name: p.detach().clone() for name, p in shadow.named_parameters() if p.requires_grad}


def plan_sharded_load(
    path: Path, dtype: torch.dtype, lora: LoraSettings | None, seed: int, runtime: Runtime
) -> ShardedLoad | str:
    """A meta model to shard and then `materialise`, or why this model must be loaded whole."""
    if not runtime.distributed:
        return "one process holds one copy anyway"
    if os.environ.get(REPLICATED_LOADING_ENV):
        return f"{REPLICATED_LOADING_ENV} is set"
    _check_model_dir(path, "model")
    on_disk = checkpoint_tensors(path)
    if not on_disk:
        return f"no *.safetensors files in {path}"
    model = _meta_causal_lm(path, dtype)
    adapters: dict[str, torch.Tensor] = {}
    if lora is not None:
        adapters = lora_initial_values(path, dtype, lora, seed)
    # As build_model's whole-model path: seeded, then peft draws the adapters (to the meta
    # device here, the values come from `adapters`), so the generator ends in the same state.
    torch.manual_seed(seed)
    if lora is not None:
        model = apply_lora(model, lora)
    # Every alias of a parameter (tied embeddings: lm_head.weight and embed_tokens.weight are
    # one Parameter) maps to the name the checkpoint stores; a pipeline stage may keep only one
    # of the aliases, so each needs its entry. Persistent buffers load from the checkpoint when
    # it has them.
    aliases: dict[str, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name not in adapters:
            aliases.setdefault(f"param {id(param)}", []).append(name)
    persistent = set(model.state_dict().keys())
    for name, _ in model.named_buffers():
        if name in persistent and _base_name(name) in on_disk:
            aliases[f"buffer {name}"] = [name]
    checkpoint_names: dict[str, str] = {}
    shapes = {name: tuple(t.shape) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    for names in aliases.values():
        stored = [_base_name(n) for n in names if _base_name(n) in on_disk]
        if not stored:
            return f"the checkpoint has no tensor named {_base_name(names[0])!r} (its layout differs from the model's)"
        shape = on_disk[stored[0]][0]
        if shape != shapes[names[0]]:
            return (
                f"checkpoint tensor {stored[0]!r} has shape {list(shape)}, the model expects {list(shapes[names[0]])}"
            )
        for name in names:
            checkpoint_names[name] = stored[0]
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if b.device.type != "meta"}
    return ShardedLoad(model=model, path=path, checkpoint_names=checkpoint_names, adapters=adapters, buffers=buffers)


def _check_ties(model: nn.Module) -> None:
    """Tied parameters must still be one Parameter after sharding, or training would untie them."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    config = getattr(model, "config", None)
    if get_in is None or get_out is None or not getattr(config, "tie_word_embeddings", False):
        return
    embed, head = get_in(), get_out()
    if embed is None or head is None:  # a pipeline stage without one of them
        return
    if embed.weight is not head.weight:
        raise TrainerError("sharded loading untied the model's tied input and output embeddings")


def materialise(load: ShardedLoad, runtime: Runtime) -> int:
    """Allocate this rank's shards, read them from the safetensors files, restore adapters and buffers.

    Collective: every rank calls it. Returns the number of tensors read from the checkpoint.
    """
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    model = load.model
    model.to_empty(device=runtime.device)
    _check_ties(model)
    # Parameters and persistent buffers by their (unchanged) names; DTensors stay DTensors,
    # so DCP reads only the local shard of each into the storage `to_empty` allocated.
    targets: dict[str, torch.Tensor] = {}
    unfilled: list[str] = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        stored = load.checkpoint_names.get(name)
        if stored is not None:
            targets[stored] = tensor.detach()
        elif name not in load.adapters and name not in load.buffers:
            unfilled.append(name)
    if unfilled:
        raise TrainerError(f"sharded loading found no value for {len(unfilled)} tensors, e.g. {unfilled[:3]}")
    with torch.no_grad():
        dcp_load(targets, storage_reader=HuggingFaceStorageReader(str(load.path)))
        # Plain tensors on every rank: FSDP2 shards parameters only, tensor parallel only the
        # planned Linear weights.
        current = dict(model.named_buffers())
        for name, value in load.buffers.items():
            if name in current and load.checkpoint_names.get(name) is None:
                current[name].copy_(value)
    if load.adapters:
        present = dict(model.named_parameters())
        # Full tensors on every rank (the same seed drew them everywhere); set_model_state_dict
        # keeps each rank's slice of the sharded ones.
        adapters: dict[str, Any] = {name: value for name, value in load.adapters.items() if name in present}
        set_model_state_dict(model, adapters, options=StateDictOptions(full_state_dict=True, strict=False))
    return len(targets)
