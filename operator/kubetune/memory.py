"""The pre-flight memory check: a job against the seed's GPU memory guidelines.

The seed gives, per model size, the GPU memory a LoRA run needs and the fewest GPUs a
full-weight run needs (training-configuration.md, "GPU memory guidelines"). A job that
asks for fewer GPUs, or smaller ones, than its row gets a warning (condition MemoryRisk
in the cluster, a line from `kubetune validate`), never a refusal: the guideline is
conservative, and 4-bit or 8-bit loading changes it, so quantized Unsloth jobs are not
checked at all.

Pure: the operator, the CLI and the tests call `memory_risk` with what they know.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from kubetune_api import constants as c

Method = Literal["lora", "full"]

BILLION = 1_000_000_000


@dataclass(frozen=True)
class GpuNeed:
    """At least `gpus` devices of at least `gb` GB each."""

    gpus: int
    gb: int
    words: str  # as the seed writes it

    def met_by(self, gpus: int, gb_per_gpu: float | None) -> bool:
        # An unknown device size cannot be held against the job: only the count is checked.
        return gpus >= self.gpus and (gb_per_gpu is None or gb_per_gpu >= self.gb)


@dataclass(frozen=True)
class Guideline:
    """One row of the seed's table: the sizes it stands for and what each method needs."""

    size: str  # the row's label in the seed: 1B, 3B, 7-8B, 13B, 70B
    # Parameter counts in [low, high) take this row. The bounds sit between the rows'
    # sizes (about their geometric means), so a model sold as "1B" (Llama 3.2 1B has
    # 1.24 B) or "8B" (8.03 B) lands on its own row rather than the next one up, and a
    # 32B model on the 70B row rather than on a 13B row that would ask far too little.
    low: float
    high: float
    lora: GpuNeed
    full: GpuNeed

    def need(self, method: Method) -> GpuNeed:
        return self.lora if method == "lora" else self.full


# The seed's table. "2-4 × 80 GB" for a 7-8B full-weight run is checked at its lower end:
# fewer than two is below every reading of the guideline.
GUIDELINES: tuple[Guideline, ...] = (
    Guideline("1B", 0.5 * BILLION, 1.7 * BILLION, GpuNeed(1, 16, "16 GB"), GpuNeed(1, 24, "1 × 24 GB")),
    Guideline("3B", 1.7 * BILLION, 4.7 * BILLION, GpuNeed(1, 24, "24 GB"), GpuNeed(2, 24, "2 × 24 GB")),
    Guideline("7-8B", 4.7 * BILLION, 10 * BILLION, GpuNeed(1, 40, "40 GB"), GpuNeed(2, 80, "2-4 × 80 GB")),
    Guideline("13B", 10 * BILLION, 30 * BILLION, GpuNeed(1, 80, "80 GB"), GpuNeed(4, 80, "4 × 80 GB")),
    Guideline("70B", 30 * BILLION, float("inf"), GpuNeed(2, 80, "2 × 80 GB"), GpuNeed(8, 80, "8+ × 80 GB")),
)


def guideline_for(parameters: int) -> Guideline | None:
    """The row for a parameter count; None below the smallest row (under 0.5 B the seed
    says nothing, and such models fit any GPU the table names)."""
    return next((g for g in GUIDELINES if g.low <= parameters < g.high), None)


def _size(parameters: int) -> str:
    return f"{parameters / BILLION:.3g}B"


def memory_risk(parameters: int | None, method: Method | None, gpus: int, gb_per_gpu: float | None) -> str | None:
    """Why the job is below its guideline, in words naming the row; None when it is not
    (or when the guideline does not apply: no parameter count, quantized loading, a
    model under the smallest row, or no GPU at all, as on `kubetune run` on CPU)."""
    if parameters is None or method is None or gpus <= 0:
        return None
    row = guideline_for(parameters)
    if row is None:
        return None
    need = row.need(method)
    if need.met_by(gpus, gb_per_gpu):
        return None
    what = "LoRA" if method == "lora" else "full-weight fine-tuning"
    asked = f"{gpus} GPU(s)" + (f" of {gb_per_gpu:g} GB" if gb_per_gpu is not None else "")
    beyond = " (larger than the table's largest row)" if parameters >= 100 * BILLION else ""
    return (
        f"a {_size(parameters)}-parameter model{beyond} asks for {asked}; the GPU memory guideline for "
        f"{what} of {row.size} models is {need.words}: the job may run out of GPU memory "
        "(a warning only: the guideline is conservative)"
    )


def smallest_labelled_gpu_gb(nodes: Iterable[Mapping[str, Any]]) -> float | None:
    """The smallest GPU among the nodes labelled by GPU feature discovery
    (nvidia.com/gpu.memory, MiB per device), in GB as cards are sold (81559 MiB -> 80);
    None when no node says. The smallest, because a job without a node selector may land
    on any of them, and the check only warns."""
    sizes = []
    for node in nodes:
        value = ((node.get("metadata") or {}).get("labels") or {}).get(c.LABEL_GPU_MEMORY_MIB, "")
        if isinstance(value, str) and value.isdigit() and int(value) > 0:
            sizes.append(sold_as_gb(int(value)))
    return min(sizes, default=None)


def sold_as_gb(mib: int) -> float:
    """A device's memory in MiB, as its card is sold in GB: an H100 80 GB reports 81559 MiB,
    an A10 24 GB 23028 MiB (the driver reserves some), so round to the nearest of the sizes
    cards are sold in, else to a whole GB."""
    gb = mib / 1024
    sold = min(SOLD_SIZES_GB, key=lambda size: abs(size - gb))
    return float(sold) if abs(sold - gb) <= 0.1 * sold else float(round(gb))


SOLD_SIZES_GB = (8, 12, 16, 24, 32, 40, 48, 80, 94, 96, 141, 144, 180, 192, 288)
