"""What the training device can do, probed once after `import unsloth`."""

from __future__ import annotations

from kubetune_trainer.unsloth.mapping import DeviceCapabilities


def probe_device() -> DeviceCapabilities:
    """CUDA when torch sees a GPU, else Unsloth's CPU backend with its own capability probes.

    The CPU probes are unsloth_zoo's (a real NF4 forward+backward for bnb_4bit,
    CPU flags for bf16/fp16), so the prediction in `effective_settings` uses the
    very answers Unsloth's CPU loader will get.
    """
    import torch

    if torch.cuda.is_available():
        return DeviceCapabilities(
            kind="cuda",
            name=torch.cuda.get_device_name(0),
            bf16=bool(torch.cuda.is_bf16_supported()),
            fp16=True,
            bnb_4bit=True,
            bnb_8bit=True,
        )
    import platform

    from unsloth_zoo.cpu.runtime import cpu_bf16_supported, cpu_bnb_4bit_supported, cpu_fp16_supported

    return DeviceCapabilities(
        kind="cpu",
        name=f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        bf16=bool(cpu_bf16_supported()),
        fp16=bool(cpu_fp16_supported()),
        bnb_4bit=bool(cpu_bnb_4bit_supported()),
        bnb_8bit=False,
    )
