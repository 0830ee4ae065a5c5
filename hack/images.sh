#!/usr/bin/env bash
# Build the three kubetune images, all tagged with the version in ./VERSION (the chart's
# version and appVersion too):
#   ghcr.io/kubetune/kubetune-operator:<VERSION>   operator/Dockerfile, context: repository root
#   ghcr.io/kubetune/trainer-automodel:<VERSION>   trainer-images/automodel/Dockerfile, context: repository root
#   ghcr.io/kubetune/trainer-unsloth:<VERSION>     trainer-images/unsloth/Dockerfile, context: repository root
#
# Usage: hack/images.sh [--list|--plan] [--push] [NAME...]
#   NAME     kubetune-operator, trainer-automodel and/or trainer-unsloth (default: all three)
#   --list   print the image references and exit (needs no Docker)
#   --plan   print "reference dockerfile context" per image and exit (needs no Docker)
#   --push   push each image after building it
# Environment: KUBETUNE_REGISTRY (default ghcr.io/kubetune), DOCKER (default docker; podman works),
#   KUBETUNE_IMAGE_PLATFORM (for example linux/amd64; default: the builder's platform).
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

list=0 plan=0 push=0 wanted=()
for arg in "$@"; do
  case "$arg" in
    --list) list=1 ;;
    --plan) plan=1 ;;
    --push) push=1 ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "hack/images.sh: unknown option '$arg' (--list, --plan, --push)" >&2; exit 2 ;;
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

if ! command -v "$docker" >/dev/null 2>&1; then
  echo "hack/images.sh: '$docker' not found: building images needs a Docker engine (or set DOCKER=podman)" >&2
  exit 1
fi
if ! "$docker" info >/dev/null 2>&1; then
  echo "hack/images.sh: '$docker' cannot reach its engine ('$docker info' fails): start Docker, or use a machine that has one" >&2
  exit 1
fi

platform_args=()
[[ -n "${KUBETUNE_IMAGE_PLATFORM:-}" ]] && platform_args=(--platform "$KUBETUNE_IMAGE_PLATFORM")

for entry in "${selected[@]}"; do
  IFS='|' read -r name dockerfile context <<<"$entry"
  ref="${registry}/${name}:${version}"
  if [[ ! -f "$dockerfile" ]]; then
    echo "hack/images.sh: $dockerfile is missing; cannot build $ref" >&2
    exit 1
  fi
  echo "hack/images.sh: building $ref from $dockerfile (context $context)"
  start=$SECONDS
  # BuildKit: needed for operator/Dockerfile.dockerignore (a per-Dockerfile ignore file).
  DOCKER_BUILDKIT=1 "$docker" build "${platform_args[@]}" \
    --build-arg "VERSION=${version}" \
    --label "org.opencontainers.image.version=${version}" \
    -f "$dockerfile" -t "$ref" "$context"
  echo "hack/images.sh: built $ref in $((SECONDS - start))s"
  if [[ $push == 1 ]]; then "$docker" push "$ref"; fi
done
