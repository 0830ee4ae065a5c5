#!/usr/bin/env bash
# Build the three kubetune images, all tagged with the version in ./VERSION (the chart's
# version and appVersion too):
#   ghcr.io/kubetune/kubetune-operator:<VERSION>   operator/Dockerfile, context: repository root
#   ghcr.io/kubetune/trainer-automodel:<VERSION>   trainer-images/automodel/Dockerfile, context: repository root
#   ghcr.io/kubetune/trainer-unsloth:<VERSION>     trainer-images/unsloth/Dockerfile, context: repository root
#
# Usage: hack/images.sh [--list|--plan] [--push] [--standin-base] [NAME...]
#   NAME     kubetune-operator, trainer-automodel and/or trainer-unsloth (default: all three)
#   --list   print the image references and exit (needs no Docker)
#   --plan   print "reference dockerfile context" per image and exit (needs no Docker)
#   --push   push each image after building it
#   --standin-base  build on hack/standin-base.sh's Debian image instead of python:3.11-slim
#            and the PyTorch runtime image (for a machine that cannot pull them; buildah only)
# Builders: Docker where its engine answers, else buildah (daemonless, from Debian:
# `bash hack/cluster/node-deps.sh --images`). Both cache by content (buildah with
# --layers), so a warm build of unchanged sources takes seconds.
# Environment: KUBETUNE_REGISTRY (default ghcr.io/kubetune), DOCKER (default docker; podman works),
#   KUBETUNE_IMAGE_BUILDER (docker or buildah; default: docker if its engine answers, else buildah),
#   KUBETUNE_IMAGE_PLATFORM (for example linux/amd64; default: the builder's platform).
# A registry on 127.0.0.1/localhost is spoken to over plain HTTP and sent uncompressed layers
# (same machine: compression would only cost time), as Docker does for loopback registries.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(tr -d '[:space:]' < VERSION)
if [[ ! "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.-]+)?$ ]]; then
  echo "hack/images.sh: VERSION holds '$version', not a semantic version like 0.1.0" >&2
  exit 2
fi
registry=${KUBETUNE_REGISTRY:-ghcr.io/kubetune}
docker=${DOCKER:-docker}

# name|dockerfile|context
images=(
  "kubetune-operator|operator/Dockerfile|."
  "trainer-automodel|trainer-images/automodel/Dockerfile|."
  "trainer-unsloth|trainer-images/unsloth/Dockerfile|."
)

list=0 plan=0 push=0 standin=0 wanted=()
for arg in "$@"; do
  case "$arg" in
    --list) list=1 ;;
    --plan) plan=1 ;;
    --push) push=1 ;;
    --standin-base) standin=1 ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "hack/images.sh: unknown option '$arg' (--list, --plan, --push, --standin-base)" >&2; exit 2 ;;
    *) wanted+=("$arg") ;;
  esac
done

selected=()
for w in "${wanted[@]}"; do
  found=0
  for entry in "${images[@]}"; do [[ "${entry%%|*}" == "$w" ]] && found=1; done
  if [[ $found == 0 ]]; then
    echo "hack/images.sh: unknown image '$w' (kubetune-operator, trainer-automodel, trainer-unsloth)" >&2
    exit 2
  fi
done
for entry in "${images[@]}"; do
  name=${entry%%|*}
  if [[ ${#wanted[@]} -eq 0 ]] || [[ " ${wanted[*]} " == *" $name "* ]]; then selected+=("$entry"); fi
done

if [[ $list == 1 || $plan == 1 ]]; then
  for entry in "${selected[@]}"; do
    IFS='|' read -r name dockerfile context <<<"$entry"
    if [[ $plan == 1 ]]; then echo "${registry}/${name}:${version} ${dockerfile} ${context}"; else echo "${registry}/${name}:${version}"; fi
  done
  exit 0
fi

builder=${KUBETUNE_IMAGE_BUILDER:-}
if [[ -z "$builder" ]]; then
  if command -v "$docker" >/dev/null 2>&1 && "$docker" info >/dev/null 2>&1; then
    builder=docker
  elif command -v buildah >/dev/null 2>&1; then
    builder=buildah
  else
    echo "hack/images.sh: no image builder: '$docker' is missing or cannot reach its engine, and buildah is not" \
      "installed (Debian: bash hack/cluster/node-deps.sh --images)" >&2
    exit 1
  fi
fi
case "$builder" in
  docker)
    if ! command -v "$docker" >/dev/null 2>&1 || ! "$docker" info >/dev/null 2>&1; then
      echo "hack/images.sh: KUBETUNE_IMAGE_BUILDER=docker but '$docker info' fails: start Docker, or use buildah" >&2
      exit 1
    fi
    ;;
  buildah)
    if ! command -v buildah >/dev/null 2>&1; then
      echo "hack/images.sh: buildah is not installed (Debian: bash hack/cluster/node-deps.sh --images)" >&2
      exit 1
    fi
    ;;
  *) echo "hack/images.sh: KUBETUNE_IMAGE_BUILDER is '$builder'; use docker or buildah" >&2; exit 2 ;;
esac

base_args=()
if [[ $standin == 1 ]]; then
  if [[ $builder != buildah ]]; then
    echo "hack/images.sh: --standin-base needs buildah (the stand-in lives in buildah's storage)" >&2
    exit 2
  fi
  base=$(bash hack/standin-base.sh)
  base_args=(--build-arg "PYTHON_IMAGE=$base" --build-arg "BASE_IMAGE=$base")
fi

platform_args=()
[[ -n "${KUBETUNE_IMAGE_PLATFORM:-}" ]] && platform_args=(--platform "$KUBETUNE_IMAGE_PLATFORM")

# buildah's RUN steps get this machine's pip settings (its CA bundle, index and find-links
# as pip sees them here), mounted for the build only: nothing of this machine lands in a
# layer, and a machine that needs no such settings builds the same images.
buildah_mounts=()
if [[ $builder == buildah ]]; then
  build_dir=$(mktemp -d)
  trap 'rm -rf "$build_dir"' EXIT
  {
    echo "[global]"
    ca=${PIP_CERT:-${SSL_CERT_FILE:-${REQUESTS_CA_BUNDLE:-}}}
    if [[ -n "$ca" && -f "$ca" ]]; then
      cp "$ca" "$build_dir/ca.crt"
      echo "cert = /etc/kubetune-build/ca.crt"
    fi
    [[ -n "${PIP_INDEX_URL:-}" ]] && echo "index-url = $PIP_INDEX_URL"
    [[ -n "${PIP_EXTRA_INDEX_URL:-}" ]] && echo "extra-index-url = $PIP_EXTRA_INDEX_URL"
    [[ -n "${PIP_DEFAULT_TIMEOUT:-}" ]] && echo "timeout = $PIP_DEFAULT_TIMEOUT"
  } >"$build_dir/pip.conf"
  buildah_mounts=(--volume "$build_dir:/etc/kubetune-build:ro" --volume "$build_dir/pip.conf:/etc/pip.conf:ro")
fi

loopback_registry() { [[ "$1" =~ ^(localhost|127\.[0-9.]+)(:[0-9]+)?/ ]]; }

for entry in "${selected[@]}"; do
  IFS='|' read -r name dockerfile context <<<"$entry"
  ref="${registry}/${name}:${version}"
  if [[ ! -f "$dockerfile" ]]; then
    echo "hack/images.sh: $dockerfile is missing; cannot build $ref" >&2
    exit 1
  fi
  echo "hack/images.sh: building $ref from $dockerfile (context $context, $builder)"
  start=$SECONDS
  if [[ $builder == docker ]]; then
    # BuildKit: needed for operator/Dockerfile.dockerignore (a per-Dockerfile ignore file).
    DOCKER_BUILDKIT=1 "$docker" build "${platform_args[@]}" \
      --build-arg "VERSION=${version}" \
      --label "org.opencontainers.image.version=${version}" \
      -f "$dockerfile" -t "$ref" "$context"
  else
    ignore_args=()
    [[ -f "$dockerfile.dockerignore" ]] && ignore_args=(--ignorefile "$dockerfile.dockerignore")
    # --network host: this machine reaches its package mirrors only through its own
    # network settings. --layers: the content cache.
    buildah build --quiet --layers --network host "${platform_args[@]}" "${base_args[@]}" \
      "${buildah_mounts[@]}" "${ignore_args[@]}" \
      --build-arg "VERSION=${version}" \
      --label "org.opencontainers.image.version=${version}" \
      -f "$dockerfile" -t "$ref" "$context" >/dev/null
  fi
  echo "hack/images.sh: built $ref in $((SECONDS - start))s"
  if [[ $push == 1 ]]; then
    start=$SECONDS
    if [[ $builder == docker ]]; then
      "$docker" push "$ref"
    elif loopback_registry "$ref"; then
      buildah push --quiet --tls-verify=false --disable-compression "$ref" "docker://$ref"
    else
      buildah push --quiet "$ref" "docker://$ref"
    fi
    echo "hack/images.sh: pushed $ref in $((SECONDS - start))s"
  fi
done
# A changed step leaves the old chain of cached layers behind (gigabytes per trainer image).
if [[ $builder == buildah ]]; then
  python3 hack/prune-image-cache.py
fi
