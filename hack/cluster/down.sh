#!/usr/bin/env bash
# make cluster-down: stop every process cluster-up started (by recorded pid) and
# remove ${KUBETUNE_CLUSTER_DIR:-<repo>/.cluster}.
# Run by make, whose PYTHONPATH holds hack/cluster (the localcluster package).
set -euo pipefail
exec python3 -m localcluster down
