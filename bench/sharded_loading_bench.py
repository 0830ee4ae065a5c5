"""Peak host memory per rank: sharded loading (meta device + per-rank shard reads) against
replicated loading (every rank reads the whole model, as before issue 15) and one process.

Builds a Llama-style model of a few hundred MB on the fly (random weights, bf16 safetensors,
the tiny test tokenizer: no downloads), then runs the Automodel entrypoint a few LoRA steps:

- 1 process (world 1: loads the model whole, the reference);
- 2 processes under torchrun (FSDP2 over 2 CPU ranks, gloo) with KUBETUNE_REPLICATED_LOADING=1;
- 2 processes under torchrun, sharded loading (the default).

Three figures per process (per rank for the 2-process runs):
- through loading: the trainer's own line once the model is in place (ru_maxrss);
- through loading and STEPS steps: VmHWM at the end. The runs stop there through the
  trainer's stop hook (KUBETUNE_STOP_AFTER_STEP: checkpoint, exit 143), before the export,
  in which rank 0 rebuilds a whole model to write it out (a figure of the export, not of
  loading);
- private memory: the peak of RssAnon, sampled. VmHWM also counts pages of memory-mapped
  files (the safetensors while they are read, the libraries), which the ranks of a node share
  through the page cache.
A separate interpreter that only imports torch, transformers, peft and the trainer gives the
import baseline, which every figure contains. The losses of the three runs are compared too
(sharded loading must not change them).

    bash hack/run-in-venv.sh test python bench/sharded_loading_bench.py --out F [--quick] [--work DIR]

Writes a part for bench/merge.py (`rows`, plus the model and each run's per-rank figures);
bench/run.sh runs it unless BENCH_SKIP_SHARDED=1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "training")]

from trainer_common import ROOT  # noqa: E402

STEPS = 2
# The trainer's line after the model is in place (train.py), one per rank.
LOADED_LINE = re.compile(r"rank (\d+): model in place \(\w+ loading\), peak host memory so far (\d+) MiB")
EXIT_PREEMPTED = 143  # kubetune_api.constants.EXIT_PREEMPTED: what the stop hook exits with
# hidden 1024, 12 layers, MLP 2816, vocab 8000: 171M parameters, 342 MB of bf16 safetensors,
# 684 MB once loaded in fp32 (the trainer's CPU dtype). A small vocabulary on purpose: FSDP2
# keeps the root module's parameters (embeddings, head) unsharded through each step, which
# would add the same amount to both loading modes and blur the loading difference.
FULL = {"hidden_size": 1024, "num_layers": 12, "intermediate_size": 2816, "num_heads": 16, "vocab_size": 8000}
QUICK = {"hidden_size": 512, "num_layers": 6, "intermediate_size": 1408, "num_heads": 8, "vocab_size": 4000}


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line; this bench needs Linux")


def vm_hwm_mib() -> float:
    return status_mib("VmHWM")


class AnonSampler:
    """The peak of RssAnon (private memory), sampled every 10 ms: VmHWM also counts the pages
    of memory-mapped files (the safetensors, the libraries), which the ranks of a node share
    through the page cache; private memory is what each extra rank adds."""

    def __init__(self) -> None:
        import threading

        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, status_mib("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


# --- in the measuring processes ----------------------------------------------------------


def measure(argv: list[str]) -> None:
    """One rank (or the single process): train, then write this process's peak RSS."""
    parser = argparse.ArgumentParser(prog="sharded_loading_bench.py measure")
    parser.add_argument("--config", required=True)
    parser.add_argument("--result-dir", type=Path, required=True)
    a = parser.parse_args(argv)
    from kubetune_trainer.automodel.__main__ import main as entrypoint

    sampler = AnonSampler()
    rc = entrypoint(["--config", a.config])
    anon = sampler.stop()
    if rc == EXIT_PREEMPTED:  # stopped by the stop hook after STEPS steps, as asked
        rc = 0
    rank = os.environ.get("RANK", "0")
    a.result_dir.mkdir(parents=True, exist_ok=True)
    (a.result_dir / f"rank-{rank}.json").write_text(
        json.dumps({"rc": rc, "peak_rss_mib": vm_hwm_mib(), "peak_anon_mib": anon})
    )
    sys.exit(rc)


def measure_imports(argv: list[str]) -> None:
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import kubetune_trainer.automodel.train  # noqa: F401

    Path(argv[0]).write_text(json.dumps({"peak_rss_mib": vm_hwm_mib()}))


# --- the driver ---------------------------------------------------------------------------


def build_model(out: Path, size: dict[str, int]) -> tuple[Path, int]:
    """A random Llama of `size` with the tiny test tokenizer (a model's vocabulary may exceed
    its tokenizer's), saved as bf16 safetensors like the models people download: loading them
    in fp32 makes a private copy in every process. (An fp32 file loaded as fp32 would stay
    memory-mapped page cache, shared between the ranks of a node, and hide what each rank
    holds.) Returns the directory and the parameter count."""
    import torch
    from tiny_llama import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(out)
    config = LlamaConfig(
        vocab_size=size["vocab_size"],
        hidden_size=size["hidden_size"],
        intermediate_size=size["intermediate_size"],
        num_hidden_layers=size["num_layers"],
        num_attention_heads=size["num_heads"],
        num_key_value_heads=size["num_heads"],
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(out), safe_serialization=True)
    return out, count


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join([str(ROOT / "trainer-images"), str(HERE), out.get("PYTHONPATH", "")])
    out.setdefault("OMP_NUM_THREADS", "1")
    out["HF_HUB_OFFLINE"] = "1"
    for key in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE", "PET_NNODES", "PET_NPROC_PER_NODE"):
        out.pop(key, None)
    return out


def run(work: Path, model: Path, name: str, processes: int, replicated: bool) -> dict[str, Any]:
    from tiny_llama import task_rows, write_jsonl
    from trainer_config import automodel_spec, write_trainer_config

    from kubetune_trainer.common.metrics import MetricsWriter

    scratch = work / name
    shutil.rmtree(scratch / "output", ignore_errors=True)  # a checkpoint left there would resume
    spec = automodel_spec(
        training={"max_seq_length": 64, "lora": {"rank": 8, "alpha": 16, "merge": False, "target_modules": None}},
        # One step more than measured: the stop hook ends the run after STEPS, before the export.
        schedule={"max_steps": STEPS + 1, "seed": 7, "val_check_interval": STEPS},
        batch={"global_batch_size": 4, "micro_batch_size": 2},
        optimizer={"learning_rate": 1e-3, "warmup_steps": 0},
        parallelism={"num_gpus_per_node": processes},
    )
    config = write_trainer_config(
        scratch / "config.json",
        spec=spec,
        model=model,
        training_data=write_jsonl(work / "data" / "train.jsonl", task_rows(32, seed=3)),
        validation_data=write_jsonl(work / "data" / "val.jsonl", task_rows(4, seed=99)),
        output=scratch / "output",
    )
    me = [str(Path(__file__).resolve()), "measure", "--config", str(config), "--result-dir", str(scratch / "rss")]
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    extra = {"KUBETUNE_STOP_AFTER_STEP": str(STEPS)}
    if replicated:
        extra["KUBETUNE_REPLICATED_LOADING"] = "1"
    log = scratch / "log.txt"
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run([*launcher, *me], env={**env(), **extra}, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); log {log}:\n{tail}")
    per_rank = [json.loads((scratch / "rss" / f"rank-{r}.json").read_text()) for r in range(processes)]
    losses = [m["loss"] for m in MetricsWriter.read(scratch / "output" / "metrics.jsonl") if "loss" in m]
    text = log.read_text()
    loaded = {int(r): float(v) for r, v in LOADED_LINE.findall(text)}
    if sorted(loaded) != list(range(processes)):
        raise RuntimeError(f"{name}: not every rank logged its peak memory after loading; log {log}")
    return {
        "loading_mib": [loaded[r] for r in range(processes)],
        "run_mib": [r["peak_rss_mib"] for r in per_rank],
        "private_mib": [r["peak_anon_mib"] for r in per_rank],
        "losses": losses,
        "seconds": round(time.monotonic() - started, 1),
        "sharded": "sharded loading:" in text and "replicated loading" not in text,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "measure":
        measure(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "measure-imports":
        measure_imports(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, help="model, configs and logs (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="a smaller model (~45 MB of bf16 weights)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kubetune-sharded-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    size = QUICK if args.quick else FULL
    model, count = build_model(work / "model", size)
    weights_mib = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
    baseline_file = work / "imports.json"
    subprocess.run([sys.executable, __file__, "measure-imports", str(baseline_file)], env=env(), check=True)
    imports = json.loads(baseline_file.read_text())["peak_rss_mib"]

    one = run(work, model, "one-process", 1, replicated=False)
    replicated = run(work, model, "replicated-2", 2, replicated=True)
    sharded = run(work, model, "sharded-2", 2, replicated=False)
    if not sharded["sharded"] or replicated["sharded"]:
        raise RuntimeError(f"the runs did not load the way they were meant to; logs under {work}")
    worst = max(
        abs(a - b) / abs(b)
        for run_ in (replicated, sharded)
        for a, b in zip(run_["losses"], one["losses"], strict=True)
    )
    label = (
        f"Llama-style {count / 1e6:.0f}M parameters ({weights_mib:.0f} MiB bf16 safetensors, loaded in fp32), "
        "LoRA rank 8, "
        f"{STEPS} steps, CPU gloo, FSDP2 over 2 ranks; peak RSS = VmHWM of each rank over loading and the steps"
    )
    rows: list[dict[str, Any]] = [
        {"name": "sharded loading: import baseline (torch, transformers, peft, trainer)", "value": round(imports),
         "unit": "MiB", "settings": label},
    ]  # fmt: skip
    metrics = (
        ("loading_mib", "peak RSS per rank through loading"),
        ("run_mib", f"peak RSS per rank through loading and {STEPS} steps"),
        ("private_mib", f"peak private memory (RssAnon) per rank through loading and {STEPS} steps"),
    )
    for key, what in metrics:
        reference = one[key][0]
        rows.append({"name": f"{what}, 1 process", "value": round(reference), "unit": "MiB", "settings": label})
        for side, result in (("replicated", replicated), ("sharded", sharded)):
            peak = max(result[key])
            rows.append({
                "name": f"{what}, {side} loading, 2 ranks (max over ranks)", "value": round(peak), "unit": "MiB",
                "baseline": round(reference), "baseline_name": "1 process", "ratio": round(peak / reference, 3),
                "settings": label, "per_rank_mib": [round(v) for v in result[key]],
            })  # fmt: skip
    reference = one["loading_mib"][0] - imports
    for side, result in (("replicated", replicated), ("sharded", sharded)):
        above = max(result["loading_mib"]) - imports
        rows.append({
            "name": f"peak RSS per rank through loading above the import baseline, {side} loading, 2 ranks",
            "value": round(above), "unit": "MiB", "baseline": round(reference),
            "baseline_name": "1 process, above the import baseline", "ratio": round(above / reference, 3),
            "settings": label,
        })  # fmt: skip
    rows.append(
        {"name": "sharded loading: max relative loss difference vs 1 process", "value": worst, "unit": "relative",
         "settings": label}
    )  # fmt: skip
    part = {
        "runs": 1,
        "model": {**size, "parameters": count, "weights_mib": round(weights_mib)},
        "measured": {"one_process": one, "replicated_2": replicated, "sharded_2": sharded},
        "rows": rows,
    }
    args.out.write_text(json.dumps(part, indent=2) + "\n")
    for row in rows:
        print(f"{row['name']}: {row['value']} {row['unit']}" + (f" (ratio {row['ratio']})" if "ratio" in row else ""))


if __name__ == "__main__":
    main()
