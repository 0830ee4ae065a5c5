#!/usr/bin/env bash
# The README's test command (`make test`): installs what the tests need (cached
# outside the clone, see hack/venv.sh and hack/cluster/build.sh) and runs every tier:
#   lint      ruff + mypy
#   unit      schema, rules, CRDs, CLI, builders, chart (helm lint/template), images
#   cluster   CRDs, CEL and the operator on a real control plane (etcd, kube-apiserver,
#             controller-manager, scheduler, kwok, training-operator) on loopback, plus
#             pods that really run on its real node (kubelet, containerd, kube-proxy,
#             CoreDNS; tests/cluster/test_real_node.py; needs root)
#   training  real training on CPU: the Automodel loop (single process and torchrun),
#             the Unsloth trainer, and `kubetune run` for both
# `hack/test.sh STAGE...` runs some of them.
set -euo pipefail
cd "$(dirname "$0")/.."
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(lint unit cluster training)

run() { echo; echo "=== $* ($(date -u +%H:%M:%S)) ==="; }

for stage in "${stages[@]}"; do
  case "$stage" in
    lint)
      run "lint: ruff and mypy"
      bash hack/run-in-venv.sh dev ruff check operator tests hack bench trainer-images e2e examples
      bash hack/run-in-venv.sh dev ruff format --check operator tests hack bench trainer-images e2e examples
      bash hack/run-in-venv.sh dev mypy
      MYPYPATH=operator:tests:hack/cluster:tests/unit bash hack/run-in-venv.sh dev mypy --strict \
        --ignore-missing-imports --explicit-package-bases tests/support tests/cluster tests/unit \
        hack/cluster/localcluster.py hack/cluster/wrapmod.py hack/cluster/tcpforward.py bench/operator_bench.py
      # The trainer package needs torch's types, which only the test environment has;
      # unsloth is absent there, so its type: ignore lines are not "unused".
      bash hack/run-in-venv.sh test mypy --strict --ignore-missing-imports --no-warn-unused-ignores \
        trainer-images/kubetune_trainer
      ;;
    unit)
      run "unit tests: schema, rules, CRDs, CLI, builders, chart, images"
      bash hack/cluster/build.sh helm
      bash hack/run-in-venv.sh dev python -m pytest tests/unit -q
      ;;
    cluster)
      run "cluster tests: a real control plane on loopback"
      bash hack/cluster/build.sh
      # test_real_node.py makes the session's cluster start the real node too.
      bash hack/cluster/node-deps.sh
      bash hack/run-in-venv.sh dev python -m pytest tests/cluster -q
      ;;
    training)
      run "training tests: the Automodel trainer and kubetune run, on CPU"
      bash hack/run-in-venv.sh unsloth true  # kubetune run's Unsloth test needs this environment
      bash hack/run-in-venv.sh test python -m pytest tests/training/automodel tests/training/localrun -q -m "not slow"
      run "training tests: the Unsloth trainer, on CPU"
      bash hack/run-in-venv.sh unsloth python -m pytest tests/training/unsloth -q
      ;;
    *) echo "hack/test.sh: unknown stage '$stage' (lint, unit, cluster, training)" >&2; exit 2 ;;
  esac
done
