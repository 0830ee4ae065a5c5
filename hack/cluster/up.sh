#!/usr/bin/env bash
# make cluster-up: build (cached) and start the local control plane; idempotent.
# State in ${KUBETUNE_CLUSTER_DIR:-<repo>/.cluster}; then: export KUBECONFIG=.cluster/kubeconfig
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "${here}/build.sh" >&2
exec python3 "${here}/localcluster.py" up
