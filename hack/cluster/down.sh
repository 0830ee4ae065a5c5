#!/usr/bin/env bash
# make cluster-down: stop every process cluster-up started (by recorded pid) and
# remove ${KUBETUNE_CLUSTER_DIR:-<repo>/.cluster}.
set -euo pipefail
# hack/cluster holds the localcluster package (stdlib only): runnable without make too.
export PYTHONPATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)${PYTHONPATH:+:${PYTHONPATH}}"
exec python3 -m localcluster down
