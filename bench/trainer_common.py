"""What the trainer benchmarks share: datasets, the measuring harness and row helpers.

Imported by bench/trainer_bench.py (test venv) and bench/unsloth_bench.py (unsloth venv),
so it needs nothing beyond the standard library at import time.

Every measurement runs in a fresh interpreter (`run_measured`), so its peak RSS
(VmHWM) is its own and not the high-water mark of an earlier run in the same process.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def peak_memory_mib() -> tuple[float, str]:
    """GPU: torch.cuda.max_memory_allocated; CPU: this process's RSS high-water mark."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    except ImportError:
        pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024, "VmHWM"
    raise RuntimeError("/proc/self/status has no VmHWM line; peak memory needs Linux")


def uniform_rows(count: int, seed: int) -> list[dict[str, Any]]:
    """Rows a little longer than the benchmark's sequence length, so nearly every row is full
    after truncation and padding is the same for every trainer whatever its batch order."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        body = " ".join(f"Please add the numbers {a} and {b} carefully." for _ in range(rng.randint(12, 16)))
        out.append({"text": f"{body} Answer: {a} plus {b} is {a + b}."})
    return out


def skewed_rows(count: int, seed: int) -> list[dict[str, Any]]:
    """Mostly short rows and a few long ones (lengths ~ lognormal), as chat data tends to be."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        repeats = max(1, min(40, int(rng.lognormvariate(0.3, 0.9))))
        body = " ".join(f"add {a} and {b}." for _ in range(repeats))
        out.append({"text": f"{body} Answer: {a + b}."})
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def warm_median(values: list[float], warmup: int) -> tuple[float, int]:
    """Median of the values after `warmup` (allocator, kernel selection, first-touch pages)."""
    kept = values[warmup:]
    if not kept:
        raise RuntimeError(f"no step left after {warmup} warm-up steps (got {len(values)} steps); raise --steps")
    return statistics.median(kept), len(kept)


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each figure over the repetitions."""
    return {
        key: statistics.median(r[key] for r in runs) if isinstance(runs[0][key], (int, float)) else runs[0][key]
        for key in runs[0]
    }


def run_measured(argv: list[str], result: Path, log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; it writes `result` (JSON)."""
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "trainer-images"), str(ROOT / "bench")]),
        **(env or {}),
    }
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT, env=full_env, check=False)
    if proc.returncode != 0 or not result.exists():
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"measurement {' '.join(argv)} failed (exit {proc.returncode}); log {log}:\n{tail}")
    loaded: dict[str, Any] = json.loads(result.read_text())
    return loaded


def settings_label(model: str, micro: int, seq: int, steps: int, warmup: int, device: str) -> str:
    return f"{model}, batch {micro}, seq {seq}, median of {steps - warmup} steps after {warmup} warm-up, {device}"
