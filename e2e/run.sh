#!/usr/bin/env bash
# End-to-end run on a kind cluster (needs Docker): create the cluster, build and load the images,
# install the Kubeflow training-operator, advertise fake GPUs, then run the end-to-end tier's own
# tests (tests/e2e, the body `make test` runs on the local cluster's real node) against it: they
# install the chart, seed the claims through a pod, and train SmolLM2 jobs in pods.
# Not run in CI (no Docker engine there).
#
# Usage: e2e/run.sh            (E2E_MODE=cpu: SmolLM2-135M on the CPU, no GPU needed; a laptop can run it)
#        E2E_MODE=examples E2E_CLUSTER=current e2e/run.sh
#                              (examples/*.yaml on the current kubectl context: needs NVIDIA GPUs,
#                               ReadWriteMany storage and internet for the SmolLM2 download)
# Environment:
#   E2E_MODE          cpu (default) | examples
#   E2E_CLUSTER       kind (default: create/reuse kind cluster $KIND_CLUSTER_NAME) | current
#   KIND_CLUSTER_NAME kubetune-e2e
#   KIND_NODE_IMAGE   kind node image (default: kind's own; the chart needs Kubernetes 1.30+)
#   E2E_NAMESPACE     namespace of the jobs in E2E_MODE=examples (default kubetune-e2e; the cpu
#                     mode uses the README's team-a)
#   E2E_EXAMPLES      example files for E2E_MODE=examples (default: automodel-lora.yaml unsloth-qlora.yaml)
#   E2E_SKIP_BUILD    1: do not run hack/images.sh (the images already exist locally / in the registry)
#   E2E_TIMEOUT       seconds to wait for each job to finish in E2E_MODE=examples (default 1800)
#   E2E_PYTEST_ARGS   extra pytest arguments in E2E_MODE=cpu (e.g. "-k unsloth")
#   KUBETUNE_HELM     helm binary (default: helm on PATH, else the one hack/cluster/build.sh builds)
# Leaves the cluster up for inspection; e2e/down.sh deletes it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck source=hack/cluster/versions.env
source hack/cluster/versions.env

mode=${E2E_MODE:-cpu}
cluster=${E2E_CLUSTER:-kind}
kind_name=${KIND_CLUSTER_NAME:-kubetune-e2e}
ns=${E2E_NAMESPACE:-kubetune-e2e}
release_ns=kubetune-system
timeout=${E2E_TIMEOUT:-1800}
examples=${E2E_EXAMPLES:-automodel-lora.yaml unsloth-qlora.yaml}

say() { echo; echo "=== e2e: $* ==="; }
die() { echo "e2e/run.sh: $*" >&2; exit 1; }

case "$mode" in cpu|examples) ;; *) die "E2E_MODE=$mode: use cpu or examples" ;; esac
case "$cluster" in kind|current) ;; *) die "E2E_CLUSTER=$cluster: use kind or current" ;; esac
[[ "$timeout" =~ ^[0-9]+$ ]] || die "E2E_TIMEOUT=$timeout: give seconds"
# The examples ask for real GPUs (4-bit loading, 8-bit optimizers) and ReadWriteMany claims,
# which a kind cluster does not have.
[[ "$mode" == examples && "$cluster" == kind ]] && die "E2E_MODE=examples needs a GPU cluster: set E2E_CLUSTER=current"

helm_bin=${KUBETUNE_HELM:-$(command -v helm || echo "${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/bin/helm-${HELM_VERSION}/helm")}
[[ -x "$helm_bin" ]] || die "helm not found: install helm v3, or run 'bash hack/cluster/build.sh helm', or set KUBETUNE_HELM"
command -v kubectl >/dev/null || die "kubectl not found on PATH"
if [[ "$cluster" == kind ]]; then
  command -v docker >/dev/null || die "docker not found: the kind end-to-end run needs a Docker engine"
  docker info >/dev/null 2>&1 || die "docker cannot reach its engine: start Docker first"
  command -v kind >/dev/null || die "kind not found: install it (https://kind.sigs.k8s.io/docs/user/quick-start/)"
fi

# --- cluster ---------------------------------------------------------------------------
if [[ "$cluster" == kind ]]; then
  ctx="kind-${kind_name}"
  if kind get clusters 2>/dev/null | grep -qx "$kind_name"; then
    say "reusing kind cluster $kind_name"
  else
    say "creating kind cluster $kind_name"
    node_image=()
    [[ -n "${KIND_NODE_IMAGE:-}" ]] && node_image=(--image "$KIND_NODE_IMAGE")
    kind create cluster --name "$kind_name" --config e2e/kind-config.yaml "${node_image[@]}" --wait 180s
  fi
else
  ctx=$(kubectl config current-context)
  say "using the current context $ctx"
fi
k() { kubectl --context "$ctx" "$@"; }
h() { "$helm_bin" --kube-context "$ctx" "$@"; }

# --- images ----------------------------------------------------------------------------
mapfile -t images < <(bash hack/images.sh --list)
# The seed job runs in the Automodel trainer image: it has torch, transformers and tokenizers.
automodel_image=${images[1]}
if [[ "${E2E_SKIP_BUILD:-0}" != 1 ]]; then
  say "building ${images[*]}"
  bash hack/images.sh
fi
if [[ "$cluster" == kind ]]; then
  say "loading the images into kind"
  for image in "${images[@]}"; do kind load docker-image --name "$kind_name" "$image"; done
fi

# --- Kubeflow training-operator (PyTorchJob) --------------------------------------------
say "installing the Kubeflow training-operator ${TRAINING_OPERATOR_VERSION}"
k apply --server-side --force-conflicts \
  -k "github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=${TRAINING_OPERATOR_VERSION}"
k -n kubeflow rollout status deployment/training-operator --timeout=5m

# --- no GPUs: advertise some ----------------------------------------------------------
if [[ "$mode" == cpu && "$cluster" == current ]]; then
  # Never write fake GPUs into a cluster this script did not create.
  say "E2E_CLUSTER=current: not advertising fake GPUs; the jobs need nodes with nvidia.com/gpu"
elif [[ "$mode" == cpu ]]; then
  # Every job asks for nvidia.com/gpu. With no device plugin, an extended resource written into
  # the node status is enough for the scheduler and the kubelet to run the pod; the container
  # gets no GPU and the trainers fall back to the CPU. No operator switch needed.
  say "advertising 4 fake nvidia.com/gpu per node (CPU variant)"
  for node in $(k get nodes -o name); do
    k patch "$node" --subresource=status --type=merge \
      -p '{"status":{"capacity":{"nvidia.com/gpu":"4"},"allocatable":{"nvidia.com/gpu":"4"}}}'
  done
fi

# --- E2E_MODE=cpu: the end-to-end tier's tests ------------------------------------------
if [[ "$mode" == cpu ]]; then
  kubeconfig=$(mktemp -t kubetune-e2e-kubeconfig-XXXXXX)
  trap 'rm -f "$kubeconfig"' EXIT
  if [[ "$cluster" == kind ]]; then
    kind get kubeconfig --name "$kind_name" > "$kubeconfig"
    # Pods reach this machine at the kind network's gateway: the Hub stand-in of the
    # initializer's test serves there.
    hub_host=$(docker network inspect kind -f '{{range .IPAM.Config}}{{.Gateway}} {{end}}' \
      | tr ' ' '\n' | grep -m1 -E '^[0-9]+\.' || true)
  else
    kubectl config view --minify --flatten --context "$ctx" > "$kubeconfig"
    hub_host=${KUBETUNE_E2E_HUB_HOST:-}
  fi
  say "running tests/e2e on $ctx (the tier make test runs on the local cluster's real node)"
  # shellcheck disable=SC2086  # E2E_PYTEST_ARGS is a list of words
  KUBECONFIG=$kubeconfig KUBETUNE_E2E_CLUSTER=current KUBETUNE_E2E_IMAGES="${images[*]}" \
    KUBETUNE_E2E_HUB_HOST=$hub_host KUBETUNE_HELM=$helm_bin \
    bash hack/run-in-venv.sh test python -m pytest tests/e2e -q -s --durations=0 ${E2E_PYTEST_ARGS:-}
  say "PASSED (the cluster is left up; e2e/down.sh deletes it)"
  exit 0
fi

# --- the chart -------------------------------------------------------------------------
say "installing the chart (namespaced RBAC, watching $ns)"
for namespace in "$release_ns" "$ns"; do
  k create namespace "$namespace" --dry-run=client -o yaml | k apply -f -
  # Pod Security "restricted" is enforced: the operator, the seed job and every trainer pod must meet it.
  k label --overwrite namespace "$namespace" pod-security.kubernetes.io/enforce=restricted
done
# The image references hack/images.sh built (KUBETUNE_REGISTRY included), as repository + tag.
image_values=()
for pair in "operator.image|${images[0]}" "trainer.automodel.image|${images[1]}" "trainer.unsloth.image|${images[2]}"; do
  key=${pair%%|*} ref=${pair#*|}
  image_values+=(--set "${key}.repository=${ref%:*}" --set "${key}.tag=${ref##*:}")
done
h upgrade --install kubetune helm/kubetune --namespace "$release_ns" \
  --set rbac.scope=namespace --set "watchNamespaces={$ns}" "${image_values[@]}" \
  --set operator.image.pullPolicy=IfNotPresent --set trainer.imagePullPolicy=IfNotPresent \
  --wait --timeout 5m

# --- storage, entities, data -----------------------------------------------------------
storage=examples/storage.yaml entities=examples/entities.yaml jobs=()
for example in $examples; do jobs+=("examples/$example"); done
say "applying $storage $entities"
k -n "$ns" apply -f "$storage" -f "$entities"

job_names=()
for file in "${jobs[@]}"; do
  while read -r name; do job_names+=("$name"); done < <(k -n "$ns" create --dry-run=client -f "$file" -o name | sed 's|.*/||')
done
say "seeding the claims (SmolLM2 from the Hub) with e2e/seed/seed.py"
k -n "$ns" delete job kubetune-e2e-seed --ignore-not-found --wait
k -n "$ns" create configmap kubetune-e2e-seed --from-file=seed.py=e2e/seed/seed.py --dry-run=client -o yaml | k apply -f -
seed_args=''
for name in "${job_names[@]}"; do seed_args+=', "--job", "'"$name"'"'; done
# Runs as the trainers' user (65532, kubetune_api.constants.TRAINER_UID), so the trainers can write what the seed created.
k -n "$ns" apply -f - <<EOF
apiVersion: batch/v1
kind: Job
metadata:
  name: kubetune-e2e-seed
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        fsGroup: 65532
        seccompProfile: {type: RuntimeDefault}
      containers:
        - name: seed
          image: ${automodel_image}
          imagePullPolicy: IfNotPresent
          command: ["python", "/seed/seed.py"${seed_args}]
          env:
            - {name: HOME, value: /tmp}
            # The trainer image is offline by design; the seed must download.
            - {name: HF_HUB_OFFLINE, value: "0"}
            - {name: TRANSFORMERS_OFFLINE, value: "0"}
          securityContext:
            allowPrivilegeEscalation: false
            capabilities: {drop: [ALL]}
          volumeMounts:
            - {name: seed, mountPath: /seed, readOnly: true}
            - {name: models, mountPath: /models}
            - {name: datasets, mountPath: /datasets}
            - {name: output, mountPath: /output}
            - {name: tmp, mountPath: /tmp}
      volumes:
        - {name: seed, configMap: {name: kubetune-e2e-seed}}
        - {name: models, persistentVolumeClaim: {claimName: models}}
        - {name: datasets, persistentVolumeClaim: {claimName: datasets}}
        - {name: output, persistentVolumeClaim: {claimName: kubetune-output}}
        - {name: tmp, emptyDir: {}}
EOF
if ! k -n "$ns" wait --for=condition=Complete job/kubetune-e2e-seed --timeout=20m; then
  k -n "$ns" describe job/kubetune-e2e-seed || true
  k -n "$ns" logs job/kubetune-e2e-seed --tail=100 || true
  die "the seed job did not complete"
fi
k -n "$ns" logs job/kubetune-e2e-seed --tail=5

# --- the jobs --------------------------------------------------------------------------
# Succeeded or Failed, whichever comes first (kubectl wait takes one condition only).
wait_finished() {
  local resource=$1 deadline=$((SECONDS + timeout)) phase
  while :; do
    phase=$(k -n "$ns" get "$resource" -o jsonpath='{.status.phase}')
    case "$phase" in
      Succeeded) k -n "$ns" wait --for=condition=Succeeded "$resource" --timeout=60s; return ;;
      Failed) return 1 ;;
    esac
    ((SECONDS < deadline)) || { echo "$resource: still ${phase:-without a phase} after ${timeout}s" >&2; return 1; }
    sleep 10
  done
}
diagnose() {
  local resource=$1
  echo "--- $resource did not succeed; what the cluster says:" >&2
  k -n "$ns" describe "$resource" >&2 || true
  k -n "$ns" get pods -l "kubetune.io/job-name=${resource#*/}" -o wide >&2 || true
  k -n "$ns" logs -l "kubetune.io/job-name=${resource#*/}" --tail=50 --all-containers >&2 || true
  k -n "$release_ns" logs deployment/kubetune --tail=50 >&2 || true
}
say "applying ${jobs[*]}"
failed=0
resources=()
for file in "${jobs[@]}"; do
  while read -r resource; do resources+=("$resource"); done < <(k -n "$ns" apply -f "$file" -o name)
done
for resource in "${resources[@]}"; do
  say "waiting up to ${timeout}s for $resource to finish"
  if wait_finished "$resource"; then
    output=$(k -n "$ns" get "$resource" -o jsonpath='{.spec.output.name}')
    output=${output:-${resource#*/}-output}
    k -n "$ns" get "models.kubetune.io/$output" >/dev/null || { echo "no output Model $output" >&2; failed=1; }
  else
    diagnose "$resource"
    failed=1
  fi
done
k -n "$ns" get automodeljobs,unslothjobs,models.kubetune.io
[[ $failed == 0 ]] || die "FAILED (the cluster is left up; e2e/down.sh deletes it)"
say "PASSED: ${resources[*]}"
