#!/usr/bin/env bash
# Build every control-plane binary pinned in versions.env into
#   $KUBETUNE_CACHE/bin/<component>-<version>/<component>
# from Go modules (no downloads besides the Go module proxy). A binary that already
# exists for its version is not rebuilt, so warm runs cost seconds.
# Usage: bash hack/cluster/build.sh [component...]   (default: all)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "${here}/versions.env"
cache="${KUBETUNE_CACHE:-${HOME}/.cache/kubetune}"
bindir="${cache}/bin"
wrapdir="${cache}/gowrap"
# Use the installed Go; the pinned modules need only go 1.26.0 and a toolchain
# download would be an unpinned input.
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
export CGO_ENABLED=0
# Two cores: more parallel compiles only add linker memory pressure.
export GOMAXPROCS="${GOMAXPROCS:-2}"

k8s_minor="${KUBERNETES_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"
k8s_ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  k8s_ldflags+=" -X ${pkg}.gitVersion=${KUBERNETES_VERSION} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${k8s_minor}"
  k8s_ldflags+=" -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=1970-01-01T00:00:00Z"
done
# helm reports the Kubernetes version it was built against (client-go's minor) as
# the default for `helm template`/`lint`; upstream's Makefile reads it from go.mod.
helm_ldflags() {
  local gomod minor
  gomod="$(go mod download -json "helm.sh/helm/v3@${HELM_VERSION}" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  minor="$(sed -n 's/^\tk8s.io\/client-go v0\.\([0-9]*\)\..*/\1/p' "${gomod}" | head -1)"
  local f="-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
  local pkg
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    f+=" -X ${pkg}.k8sVersionMajor=1 -X ${pkg}.k8sVersionMinor=${minor}"
  done
  echo "${f}"
}

# component|version|module|main package|tags|ldflags|staging-major-zero
components=(
  "etcd|${ETCD_VERSION}|go.etcd.io/etcd/server/v3|go.etcd.io/etcd/server/v3||-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=${ETCD_VERSION}|"
  "kube-apiserver|${KUBERNETES_VERSION}|k8s.io/kubernetes|k8s.io/kubernetes/cmd/kube-apiserver|selinux,notest,grpcnotrace|${k8s_ldflags}|staging"
  "kube-controller-manager|${KUBERNETES_VERSION}|k8s.io/kubernetes|k8s.io/kubernetes/cmd/kube-controller-manager|selinux,notest,grpcnotrace|${k8s_ldflags}|staging"
  "kube-scheduler|${KUBERNETES_VERSION}|k8s.io/kubernetes|k8s.io/kubernetes/cmd/kube-scheduler|selinux,notest,grpcnotrace|${k8s_ldflags}|staging"
  # The real node (NODES=real / LocalCluster(real_node=True)): same module and version
  # as the control plane, so the node and the API server never skew.
  "kubelet|${KUBERNETES_VERSION}|k8s.io/kubernetes|k8s.io/kubernetes/cmd/kubelet|selinux,notest,grpcnotrace|${k8s_ldflags}|staging"
  "kube-proxy|${KUBERNETES_VERSION}|k8s.io/kubernetes|k8s.io/kubernetes/cmd/kube-proxy|selinux,notest,grpcnotrace|${k8s_ldflags}|staging"
  "kwok|${KWOK_VERSION}|sigs.k8s.io/kwok|sigs.k8s.io/kwok/cmd/kwok||-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION}|"
  "training-operator|${TRAINING_OPERATOR_VERSION}|github.com/kubeflow/training-operator|github.com/kubeflow/training-operator/cmd/training-operator.v1||-s -w|"
  # Cluster DNS for the real node's pods. Its module has no replace lines; the
  # wrapper still keeps its dependency pins apart from Kubernetes'.
  "coredns|${COREDNS_VERSION}|github.com/coredns/coredns|github.com/coredns/coredns||-s -w -X github.com/coredns/coredns/coremain.GitCommit=${COREDNS_VERSION}|"
  "helm|${HELM_VERSION}|helm.sh/helm/v3|helm.sh/helm/v3/cmd/helm||@helm@|"
)

wanted=("$@")
is_wanted() {
  [[ ${#wanted[@]} -eq 0 ]] && return 0
  local w
  for w in "${wanted[@]}"; do [[ "$w" == "$1" ]] && return 0; done
  return 1
}

build_one() {
  local name="$1" version="$2" module="$3" pkg="$4" tags="$5" ldflags="$6" staging="$7"
  local out="${bindir}/${name}-${version}/${name}"
  if [[ -x "${out}" ]]; then
    echo "build.sh: ${name} ${version}: cached at ${out}"
    return 0
  fi
  [[ "${ldflags}" == "@helm@" ]] && ldflags="$(helm_ldflags)"
  local wrap="${wrapdir}/${module//\//_}-${version}"
  local start=$SECONDS
  echo "build.sh: ${name} ${version}: building ${pkg} (wrapper module ${wrap})"
  mkdir -p "${wrap}"
  local -a wrapargs=(--module "${module}" --version "${version}" --tool "${pkg}" --out "${wrap}")
  [[ -n "${staging}" ]] && wrapargs+=(--staging-major-zero)
  # Several binaries share one wrapper (the Kubernetes ones): list all of its tools.
  local c n v m p
  for c in "${components[@]}"; do
    IFS='|' read -r n v m p _ <<<"${c}"
    [[ "$m" == "${module}" && "$v" == "${version}" && "$p" != "${pkg}" ]] && wrapargs+=(--tool "$p")
  done
  python3 "${here}/wrapmod.py" "${wrapargs[@]}"
  (cd "${wrap}" && go mod tidy)
  local tmp="${bindir}/.tmp-${name}-${version}-$$"
  mkdir -p "${tmp}"
  (cd "${wrap}" && go build -trimpath -tags "${tags}" -ldflags "${ldflags}" -o "${tmp}/${name}" "${pkg}")
  mkdir -p "${bindir}/${name}-${version}"
  mv "${tmp}/${name}" "${out}"
  rmdir "${tmp}"
  echo "build.sh: ${name} ${version}: built in $((SECONDS - start))s -> ${out}"
}

total_start=$SECONDS
for c in "${components[@]}"; do
  IFS='|' read -r name version module pkg tags ldflags staging <<<"${c}"
  is_wanted "${name}" || continue
  build_one "${name}" "${version}" "${module}" "${pkg}" "${tags}" "${ldflags}" "${staging}"
done
# The PyTorchJob CRD ships in the training-operator module; keep it next to the
# binary so cluster-up needs neither the module cache nor network.
if is_wanted training-operator; then
  crd_dir="${bindir}/training-operator-${TRAINING_OPERATOR_VERSION}/crds"
  if [[ ! -f "${crd_dir}/kubeflow.org_pytorchjobs.yaml" ]]; then
    mod_dir="$(go mod download -json "github.com/kubeflow/training-operator@${TRAINING_OPERATOR_VERSION}" \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
    mkdir -p "${crd_dir}"
    cp "${mod_dir}/manifests/base/crds/kubeflow.org_pytorchjobs.yaml" "${crd_dir}/.tmp-$$"
    chmod u+w "${crd_dir}/.tmp-$$"
    mv "${crd_dir}/.tmp-$$" "${crd_dir}/kubeflow.org_pytorchjobs.yaml"
  fi
fi
echo "build.sh: done in $((SECONDS - total_start))s"
