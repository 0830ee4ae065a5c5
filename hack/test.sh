#!/usr/bin/env bash
# The README's test command (`make test`): installs what the tests need (cached
# outside the clone) and runs every tier. `hack/test.sh STAGE...` runs some stages.
set -euo pipefail
cd "$(dirname "$0")/.."
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(lint unit)

run() { echo; echo "=== $* ==="; }

for stage in "${stages[@]}"; do
  case "$stage" in
    lint)
      run "lint: ruff and mypy"
      bash hack/run-in-venv.sh dev ruff check operator tests hack bench
      bash hack/run-in-venv.sh dev ruff format --check operator
      bash hack/run-in-venv.sh dev mypy
      ;;
    unit)
      run "unit tests: schema, rules, CRDs, CLI"
      bash hack/run-in-venv.sh dev python -m pytest tests/unit -q
      ;;
    *) echo "hack/test.sh: unknown stage '$stage'" >&2; exit 2 ;;
  esac
done
