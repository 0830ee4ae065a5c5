"""Floating-point settings of the training process."""

from __future__ import annotations


def flush_denormals() -> bool:
    """Treat subnormal floats as zero on the CPU; True when the CPU took the setting.

    Why: LoRA starts with a zero `lora_B`, so the first steps' gradients and Adam moments of
    the adapters are tiny, and on x86 every multiply that meets a subnormal takes a
    microcode slow path: the tiny-Llama LoRA bench ran at 0.26x Hugging Face until this
    was set (bench/README.md). Values below ~1.2e-38 in fp32 carry nothing a training step
    can use, so results are unchanged within float tolerance.

    Call it before the first tensor operation: the flag lives in each thread's MXCSR and
    the OpenMP worker threads copy it from the thread that creates them, at their creation.
    It changes nothing on a GPU (CUDA kernels do not read it), so it is set everywhere.
    """
    import torch

    return bool(torch.set_flush_denormal(True))
