#!/usr/bin/env bash
# Delete the kind cluster that e2e/run.sh created (KIND_CLUSTER_NAME, default kubetune-e2e).
set -euo pipefail
name=${KIND_CLUSTER_NAME:-kubetune-e2e}
command -v kind >/dev/null || { echo "e2e/down.sh: kind not found on PATH" >&2; exit 1; }
kind delete cluster --name "$name"
