#!/usr/bin/env bash
# make cluster-up: build (cached) and start the local control plane; idempotent.
# NODES=real (make cluster-up NODES=real) also starts the real node, kubetune-real-0
# (kubelet + containerd, pods really run; root): see hack/cluster/README.md.
# NODES=real-only: the real node alone and untainted, no kwok nodes (the e2e tier's cluster).
# State in ${KUBETUNE_CLUSTER_DIR:-<repo>/.cluster}; then: export KUBECONFIG=.cluster/kubeconfig
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
case "${NODES:-kwok}" in
  kwok) ;;
  real)
    bash "${here}/node-deps.sh"
    export KUBETUNE_REAL_NODE=1
    ;;
  real-only)
    bash "${here}/node-deps.sh"
    export KUBETUNE_REAL_NODE=1 KUBETUNE_KWOK_NODES=0
    ;;
  *)
    echo "up.sh: NODES=${NODES} is not a node kind; use NODES=kwok (default: fake kwok nodes only)," \
      "NODES=real (the kwok nodes plus a real kubelet node, tainted) or NODES=real-only (the real node alone," \
      "untainted: the user's path, as on a GPU cluster)" >&2
    exit 2
    ;;
esac
bash "${here}/build.sh" >&2
# hack/cluster holds the localcluster package (stdlib only): runnable without make too.
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"
exec python3 -m localcluster up
