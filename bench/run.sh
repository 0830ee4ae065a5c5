#!/usr/bin/env bash
# `make bench`: operator and trainer benchmarks, each in its venv, merged into
# bench/results/<date>-<machine>.json, then a table. Not part of `make test`.
#
#   make bench                      full run (~20 min on 2 cores)
#   BENCH_QUICK=1 bash bench/run.sh smoke run (~3 min): 20/50 jobs, tiny Llama only, 5 steps;
#                                   writes bench/results/<date>-<machine>-quick.json
# Other knobs: BENCH_OPERATOR_JSON=FILE reuses an operator_bench.py result instead of
# running it again, BENCH_TRAINER_JSON=FILE likewise for trainer_bench.py (its --work
# must still exist for Unsloth); BENCH_UNSLOTH_MODELS="tiny Llama" limits Unsloth to those
# models (comma-separated labels); BENCH_RUNS=N repeats each trainer comparison N times, alternating
# sides (default 1; medians over runs; Unsloth's HF baseline is run beside it in its venv);
# BENCH_SCALE=1000,3000 sets the scale curve's sizes ("" leaves it out; full default
# 1000,3000,10000, ~15 min; BENCH_SCALE_TIMEOUT=S, default 3600) and draws bench/scale.png; BENCH_SKIP_UNSLOTH=1 leaves Unsloth out; BENCH_SKIP_SHARDED=1 leaves
# out the sharded-loading memory part (sharded_loading_bench.py, ~6 min); BENCH_WORK=DIR keeps the
# intermediate files (default: a temp dir, removed at the end).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

quick=${BENCH_QUICK:-0}
work=${BENCH_WORK:-}
if [[ -z "$work" ]]; then
  work=$(mktemp -d -t kubetune-bench-XXXXXX)
  trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work"
parts=()

if [[ "$quick" == 1 ]]; then
  mode=quick; op_args=(--latency-jobs 20 --throughput-jobs 50); tr_args=(--quick)
else
  mode=full; op_args=(--latency-jobs 200 --throughput-jobs 1000); tr_args=()
fi

started=$SECONDS
if [[ -n "${BENCH_OPERATOR_JSON:-}" ]]; then
  echo "bench: operator rows reused from $BENCH_OPERATOR_JSON"
  [[ "$BENCH_OPERATOR_JSON" -ef "$work/operator.json" ]] || cp "$BENCH_OPERATOR_JSON" "$work/operator.json"
else
  echo "bench: operator (${op_args[*]}) ..."
  # A bounded wait: the operator bench waits up to 30 min for stragglers, and a run that
  # loses jobs must not hold the trainer rows hostage. Its failure becomes a row.
  limit=${BENCH_OPERATOR_TIMEOUT:-$([[ "$quick" == 1 ]] && echo 300 || echo 1200)}
  if ! timeout --signal=TERM --kill-after=30 "$limit" \
      bash hack/run-in-venv.sh dev python bench/operator_bench.py "${op_args[@]}" --out "$work/operator.json"; then
    echo "bench: the operator bench failed or ran past ${limit}s; its rows are missing" >&2
    printf '{"rows": [{"name": "operator bench", "value": null, "unit": "", "error": "%s"}]}\n' \
      "failed or ran past ${limit}s (operator_bench.py ${op_args[*]})" > "$work/operator.json"
  fi
fi
parts+=(--part "$work/operator.json")
echo "bench: operator done at $((SECONDS - started)) s"

# The scale curve (issue 18): each size on a fresh cluster, jobs spread over 100 namespaces.
scale=${BENCH_SCALE-$([[ "$quick" == 1 ]] && echo "" || echo "1000,3000,10000")}
if [[ -n "$scale" ]]; then
  echo "bench: operator scale curve ($scale jobs over 100 namespaces) ..."
  if timeout --signal=TERM --kill-after=30 "${BENCH_SCALE_TIMEOUT:-3600}" bash hack/run-in-venv.sh dev \
      python bench/operator_bench.py --scale "$scale" --scale-namespaces 100 --out "$work/scale.json"; then
    parts+=(--part "$work/scale.json")
  else
    echo "bench: the scale curve failed or ran past ${BENCH_SCALE_TIMEOUT:-3600}s; its rows are missing" >&2
  fi
  echo "bench: scale curve done at $((SECONDS - started)) s"
fi

if [[ -n "${BENCH_TRAINER_JSON:-}" ]]; then
  echo "bench: trainer rows reused from $BENCH_TRAINER_JSON"
  [[ "$BENCH_TRAINER_JSON" -ef "$work/trainer.json" ]] || cp "$BENCH_TRAINER_JSON" "$work/trainer.json"
else
  echo "bench: trainer (Automodel loop vs HF Trainer + peft) ..."
  bash hack/run-in-venv.sh test python bench/trainer_bench.py "${tr_args[@]}" --runs "${BENCH_RUNS:-1}" \
    --work "$work/trainer-work" --out "$work/trainer.json"
fi
parts+=(--part "$work/trainer.json")
echo "bench: trainer done at $((SECONDS - started)) s"

if [[ "${BENCH_SKIP_SHARDED:-0}" != 1 ]]; then
  echo "bench: peak memory per rank, sharded vs replicated loading ..."
  bash hack/run-in-venv.sh test python bench/sharded_loading_bench.py "${tr_args[@]}" \
    --work "$work/sharded-work" --out "$work/sharded_loading.json"
  parts+=(--part "$work/sharded_loading.json")
  echo "bench: sharded loading done at $((SECONDS - started)) s"
fi

if [[ "${BENCH_SKIP_UNSLOTH:-0}" != 1 ]]; then
  echo "bench: Unsloth vs the same HF baseline ..."
  bash hack/run-in-venv.sh unsloth python bench/unsloth_bench.py --trainer-rows "$work/trainer.json" \
    --out "$work/unsloth.json" --runs "${BENCH_RUNS:-1}" ${BENCH_UNSLOTH_MODELS:+--models "$BENCH_UNSLOTH_MODELS"}
  parts+=(--part "$work/unsloth.json")
  echo "bench: unsloth done at $((SECONDS - started)) s"
fi

# Versions, each read from the venv that ran the part.
pkg_versions='import importlib.metadata as m, json, sys
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = m.version(name)
    except m.PackageNotFoundError:
        out[name] = None
print(json.dumps(out))'
bash hack/run-in-venv.sh dev python -c "$pkg_versions" kopf kubernetes_asyncio aiohttp > "$work/v-dev.json"
bash hack/run-in-venv.sh test python -c "$pkg_versions" torch transformers peft > "$work/v-test.json"
if [[ "${BENCH_SKIP_UNSLOTH:-0}" != 1 ]]; then
  bash hack/run-in-venv.sh unsloth python -c "$pkg_versions" unsloth unsloth_zoo torch transformers peft trl \
    > "$work/v-unsloth.json"
else
  echo '{}' > "$work/v-unsloth.json"
fi
python3 - "$work" > "$work/versions.json" <<'EOF'
import json, re, sys
from pathlib import Path
work = Path(sys.argv[1])
env = dict(
    line.split("=", 1) for line in Path("hack/cluster/versions.env").read_text().splitlines()
    if "=" in line and not line.startswith("#")
)
kubetune = re.search(r'__version__ = "([^"]+)"', Path("operator/kubetune/__init__.py").read_text()).group(1)
print(json.dumps({
    "kubetune": kubetune,
    "kubernetes": env.get("KUBERNETES_VERSION"),
    "training_operator": env.get("TRAINING_OPERATOR_VERSION"),
    "operator_venv": json.loads((work / "v-dev.json").read_text()),
    "trainer_venv": json.loads((work / "v-test.json").read_text()),
    "unsloth_venv": json.loads((work / "v-unsloth.json").read_text()),
}, indent=2))
EOF

bash hack/run-in-venv.sh dev python bench/merge.py "${parts[@]}" --versions "$work/versions.json" --mode "$mode" \
  | tee "$work/merge.txt"
if [[ -f "$work/scale.json" ]]; then
  results=$(sed -n 's/^results: //p' "$work/merge.txt")
  bash hack/run-in-venv.sh dev python bench/scale_plot.py "$results" --out bench/scale.png
fi
echo "bench: total $((SECONDS - started)) s"
