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
#   e2e       the user's path on the real node alone (NODES=real-only): the images built
#             without Docker and pulled from the node's registry, `helm install`, jobs
#             applied with kubectl and trained in pods (the README's e2e blocks; root)
# `hack/test.sh STAGE...` runs some of them.
set -euo pipefail
cd "$(dirname "$0")/.."
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(lint unit cluster training e2e)

run() { echo; echo "=== $* ($(date -u +%H:%M:%S)) ==="; }

# The e2e tier's images take many minutes to build on a cold machine (pip downloads and
# gigabyte layers: I/O more than CPU), so when e2e is among the stages they are built in
# the background while the other stages run; the e2e stage waits for that build. Warm
# (buildah's layer cache), the build takes seconds either way.
images_log=""
images_pid=""
if [[ " ${stages[*]} " == *" e2e "* ]]; then
  bash hack/cluster/node-deps.sh --images
  images_log=$(mktemp -t kubetune-images.XXXXXX)
  KUBETUNE_REGISTRY=127.0.0.1:5111/kubetune bash hack/images.sh --standin-base >"$images_log" 2>&1 &
  images_pid=$!
  echo "hack/test.sh: building the e2e images in the background (log: $images_log)"
fi

# The control plane's Go build (every binary from source: about 34 min on a cold 2-core
# machine, seconds once cached) starts in the background too when a stage needs it, so it
# overlaps lint's venv downloads instead of following them (the cold run of 2026-12-02
# took 90 min with it in the unit stage). The first stage that needs it waits for it.
build_log=""
build_pid=""
if [[ " ${stages[*]} " =~ " "(unit|cluster|e2e)" " ]]; then
  build_log=$(mktemp -t kubetune-build.XXXXXX)
  bash hack/cluster/build.sh >"$build_log" 2>&1 &
  build_pid=$!
  echo "hack/test.sh: building the control plane in the background (log: $build_log)"
fi
control_plane() {
  if [[ -n "$build_pid" ]]; then
    if ! wait "$build_pid"; then
      tail -40 "$build_log"
      echo "hack/test.sh: building the control plane failed; the whole log is $build_log" >&2
      exit 1
    fi
    build_pid=""
    grep '^build.sh: ' "$build_log" || true
  fi
  bash hack/cluster/build.sh  # cached by then: checks every binary is in place
}

for stage in "${stages[@]}"; do
  case "$stage" in
    lint)
      run "lint: ruff and mypy"
      bash hack/run-in-venv.sh dev ruff check operator tests hack bench trainer-images e2e examples
      bash hack/run-in-venv.sh dev ruff format --check operator tests hack bench trainer-images e2e examples
      bash hack/run-in-venv.sh dev mypy
      MYPYPATH=operator:tests:hack/cluster:tests/unit:tests/e2e bash hack/run-in-venv.sh dev mypy --strict \
        --ignore-missing-imports --explicit-package-bases tests/support tests/cluster tests/unit tests/e2e \
        hack/cluster/localcluster hack/cluster/wrapmod.py hack/cluster/tcpforward.py bench/operator_bench.py
      # The trainer package needs torch's types, which only the test environment has;
      # unsloth is absent there, so its type: ignore lines are not "unused".
      bash hack/run-in-venv.sh test mypy --strict --ignore-missing-imports --no-warn-unused-ignores \
        trainer-images/kubetune_trainer
      ;;
    unit)
      run "unit tests: schema, rules, CRDs, CLI, builders, chart, images"
      # Every control-plane binary, not only helm: test_helm's real-API-server test needs them,
      # and on a cold machine their Go build (over 15 min beside the background image build)
      # ran past that test's pytest timeout. Waited for here, outside any test's clock.
      control_plane
      bash hack/run-in-venv.sh dev python -m pytest tests/unit -q
      ;;
    cluster)
      run "cluster tests: a real control plane on loopback"
      control_plane
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
    e2e)
      run "e2e: the user's path on the real node (images, helm install, jobs in pods)"
      control_plane
      if ! wait "$images_pid"; then
        tail -40 "$images_log"
        echo "hack/test.sh: building the images failed; the whole log is $images_log" >&2
        exit 1
      fi
      grep '^hack/images.sh: built' "$images_log"
      bash hack/run-in-venv.sh test python -m pytest tests/e2e -q -s --durations=0
      ;;
    *) echo "hack/test.sh: unknown stage '$stage' (lint, unit, cluster, training, e2e)" >&2; exit 2 ;;
  esac
done
