#!/usr/bin/env bash
# The Unsloth trainer's GPU check (ARCHITECTURE.md test tier 4). Not run in CI: CI has no GPU.
#
#   bash trainer-images/unsloth/gpu_check.sh prepare
#       here (with network to PyPI): the pinned wheels the GPU image lacks, for its Python 3.12,
#       into .whl/ (git-ignored via .git/info/exclude), repacked to fit the 64 MiB carry limit
#       (unsloth without its Studio web app, bitsandbytes with only its CUDA 13.0 + CPU libraries).
#   bash trainer-images/unsloth/gpu_check.sh run
#       on the GPU machine, from the repository root, with .whl carried: installs the wheels into
#       /tmp/site and runs gpu_check.py (QLoRA 4-bit + adamw_8bit + packing, 8-bit loading,
#       full weights, merged_16bit save; tokens/s and peak memory against plain
#       transformers + peft + trl on the same model and batch). Summary in $OUT/gpu_check.json.
#
# With the device tool: run(command="bash trainer-images/unsloth/gpu_check.sh run",
#                           carry=[".whl"], timeout_s=600)
# The GPU image already has torch (2.11, cu130), transformers 5.17.0 and accelerate 1.15.0, which
# the pins accept; everything else below is the version pinned in requirements.txt (pydantic for the
# API model that renders the specs, as the operator does).
set -euo pipefail
cd "$(dirname "$0")/../.."
here=trainer-images/unsloth

pin() { grep -i "^$1==" "$here/requirements.txt" | head -1; }

prepare() {
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  rm -rf .whl && mkdir -p .whl
  local dl
  dl=$(mktemp -d)
  local names=(unsloth unsloth_zoo trl peft bitsandbytes datasets torchao diffusers cut-cross-entropy tyro
               msgspec hf_transfer dill multiprocess docstring_parser typeguard structlog json5 nest-asyncio
               pydantic pydantic_core annotated-types typing-inspection)
  for name in "${names[@]}"; do
    spec=$(pin "$name")
    [ -n "$spec" ] || { echo "gpu_check.sh: $name is not pinned in $here/requirements.txt" >&2; exit 1; }
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      -d "$dl" "$spec"
  done
  python3 - "$dl" .whl <<'PY'
import base64, hashlib, pathlib, sys, zipfile
src, dst = map(pathlib.Path, sys.argv[1:])
# Dropped to fit the carry limit; neither is imported by training.
DROP = {
    "unsloth-": lambda n: n.startswith(("studio/", "unsloth_cli/")),
    "bitsandbytes-": lambda n: n.startswith("bitsandbytes/libbitsandbytes_") and not n.endswith(("_cuda130.so", "_cpu.so")),
}
for wheel in sorted(src.glob("*.whl")):
    drop = next((f for prefix, f in DROP.items() if wheel.name.startswith(prefix)), None)
    if drop is None:
        (dst / wheel.name).write_bytes(wheel.read_bytes())
        continue
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(dst / wheel.name, "w", zipfile.ZIP_DEFLATED) as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        kept = [i for i in zin.infolist() if not drop(i.filename) and i.filename != record_name]
        lines = []
        for info in kept:
            data = zin.read(info)
            zout.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{info.filename},sha256={digest},{len(data)}")
        lines.append(f"{record_name},,")
        zout.writestr(record_name, "\n".join(lines) + "\n")
total = sum(p.stat().st_size for p in dst.glob("*.whl"))
print(f"gpu_check.sh: {len(list(dst.glob('*.whl')))} wheels in {dst}, {total / 2**20:.1f} MiB")
if total > 60 * 2**20:
    sys.exit("gpu_check.sh: the wheels exceed the 64 MiB carry limit")
PY
  rm -rf "$dl"
}

run() {
  [ -d .whl ] || { echo "gpu_check.sh: .whl/ is missing; run 'gpu_check.sh prepare' here and carry .whl" >&2; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD/trainer-images:$PWD/operator"
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
  python3 -c "import torch, transformers, trl, peft, bitsandbytes, unsloth; print('versions:', torch.__version__, transformers.__version__, trl.__version__, peft.__version__, bitsandbytes.__version__, unsloth.__version__)"
  python3 "$here/gpu_check.py" --work /tmp/gpu-check --out "${OUT:-/tmp/gpu-check-out}"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
