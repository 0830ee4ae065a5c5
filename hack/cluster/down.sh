#!/usr/bin/env bash
# make cluster-down: stop every process cluster-up started (by recorded pid) and
# remove ${KUBETUNE_CLUSTER_DIR:-<repo>/.cluster}.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec python3 "${here}/localcluster.py" down
