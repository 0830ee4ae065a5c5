#!/usr/bin/env bash
# Run a command inside one of the project's cached virtual environments.
# Usage: hack/run-in-venv.sh dev|test|unsloth COMMAND [ARGS...]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
which=$1; shift
case "$which" in
  dev) reqs=(requirements/operator.txt requirements/dev.txt requirements/fetch.txt requirements/test-servers.txt) ;;
  test) reqs=(requirements/operator.txt requirements/dev.txt trainer-images/automodel/requirements.txt) ;;
  unsloth) reqs=(trainer-images/unsloth/requirements.txt) ;;
  *) echo "hack/run-in-venv.sh: unknown environment '$which' (dev, test or unsloth)" >&2; exit 2 ;;
esac
cd "$here"
venv=$(bash hack/venv.sh "$which" "${reqs[@]}")
export PATH="$venv/bin:$PATH"
# hack/cluster holds the localcluster package (tests, benchmarks and `python -m localcluster`).
export PYTHONPATH="$here/operator:$here/trainer-images:$here/hack/cluster${PYTHONPATH:+:$PYTHONPATH}"
exec "$@"
