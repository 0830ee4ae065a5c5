"""GPU check of context parallel (issue 15, item 3): CP 2 over 2 GPUs against CP 1 on one GPU.

Ring attention runs only on CUDA's SDPA kernels, so this is the parity check that cannot
run in `make test` (test_context_parallel.py covers what CPU can). It builds a tiny Llama
(grouped-query attention, 4,096 positions) and rows of 600 to 950 tokens, then trains
the same job through the trainer's entrypoint twice per finetuning type:
- reference: num_gpus_per_node 1 (CUDA_VISIBLE_DEVICES=0);
- context parallel: num_gpus_per_node 2, context_parallel_size 2 (the entrypoint relaunches
  itself under torchrun; each rank holds half of every row's tokens).
Both sides have data-parallel size 1 and the same global batch, so train losses, validation
losses and gradient norms must agree up to bf16 rounding. It prints one JSON summary (also
written to $OUT/cp_gpu_check.json when OUT is set) and exits 1 when a difference exceeds
the tolerance.

    bash hack/run-in-venv.sh test python tests/training/automodel/cp_gpu_check.py

`--dry-run-on-cpu` runs the same on CPU (where context parallel uses the all-gather
attention, not ring attention): it checks this script, not the GPU path.

With the device tool (2 GPUs needed): run(command="bash hack/run-in-venv.sh test python
tests/training/automodel/cp_gpu_check.py", timeout_s=900).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from automodel_helpers import trainer_env  # noqa: E402
from gpu_check import rows  # noqa: E402
from tiny_llama import build_tiny_llama, write_jsonl  # noqa: E402
from trainer_config import automodel_spec, write_trainer_config  # noqa: E402

# bf16 autocast on both sides; CP changes the order of the attention sums (online softmax
# over ring steps), which moves bf16 results by well under 1%. A wrong shard, shift or
# gradient scale moves them by far more (losses by ~1e-1, grad norms by 2x).
RTOL = 2e-2
SEQ = 1024


def run(work: Path, model: Path, data: Path, name: str, finetuning_type: str, gpus: int, cpu: bool) -> list[float]:
    lora = None if finetuning_type == "all_weights" else {"rank": 8, "alpha": 16, "merge": False}
    spec = automodel_spec(
        training={"finetuning_type": finetuning_type, "max_seq_length": SEQ, "lora": lora},
        schedule={"max_steps": 4, "seed": 0, "val_check_interval": 2},
        batch={"global_batch_size": 4, "micro_batch_size": 2},
        optimizer={"learning_rate": 1e-4 if finetuning_type == "all_weights" else 1e-3},
        parallelism={"num_gpus_per_node": gpus, "context_parallel_size": gpus},
    )
    output = work / name
    config = write_trainer_config(
        work / f"{name}.json", spec=spec, model=model, training_data=data, validation_data=data, output=output
    )
    env = trainer_env({"CUDA_VISIBLE_DEVICES": "" if cpu else ",".join(str(i) for i in range(gpus))})
    command = [sys.executable, "-m", "kubetune_trainer.automodel", "--config", str(config)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        sys.exit(f"cp_gpu_check: {name} failed ({done.returncode}):\n{done.stderr[-6000:]}")
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    validation = [m["val_loss"] for m in metrics if "val_loss" in m]
    norms = [m["grad_norm"] for m in metrics if "grad_norm" in m]
    return [float(v) for v in losses + validation + norms]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run-on-cpu", action="store_true", help="run on CPU: checks the script only")
    args = parser.parse_args()
    import torch

    cpu = args.dry_run_on_cpu
    if not cpu and torch.cuda.device_count() < 2:
        sys.exit(f"cp_gpu_check: needs 2 CUDA GPUs, this machine has {torch.cuda.device_count()}; nothing was run")
    device = "cpu (dry run: all-gather attention)" if cpu else torch.cuda.get_device_name()
    summary: dict[str, Any] = {"device": device, "seq": SEQ, "rtol": RTOL}
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_llama(work / "model", num_heads=4, num_kv_heads=2, max_position_embeddings=4096)
        data = write_jsonl(work / "data" / "train.jsonl", rows(24, seed=0, repeats=(20, 28)))
        for finetuning_type in ("lora", "all_weights"):
            reference = run(work, model, data, f"cp1-{finetuning_type}", finetuning_type, 1, cpu)
            sharded = run(work, model, data, f"cp2-{finetuning_type}", finetuning_type, 2, cpu)
            worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(sharded, reference, strict=True))
            summary[finetuning_type] = {"cp1": reference, "cp2": sharded, "max_relative_difference": worst}
            failed = failed or worst > RTOL
    text = json.dumps(summary, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "cp_gpu_check.json").write_text(text + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
