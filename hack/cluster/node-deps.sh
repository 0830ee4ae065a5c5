#!/usr/bin/env bash
# Host packages the local cluster's real node needs (make cluster-up NODES=real):
#   containerd + runc   the CRI runtime the kubelet talks to
#   containernetworking-plugins   bridge, host-local, loopback, portmap (pod network)
#   busybox-static      the one binary in the node's local images (no registry here)
#   iptables, conntrack kube-proxy's Service rules and its stale-UDP-flow cleanup
#   kmod                modprobe, so a missing overlay module is loaded, not guessed at
#   docker-registry     the node's image registry (distribution 2.8): images built here are
#                       pushed to it and the node pulls them, as from any registry
# With --images, also what hack/images.sh needs to build images without a Docker engine:
#   buildah             daemonless builds of the Dockerfiles as written
#   debootstrap         the stand-in base image (hack/standin-base.sh)
# Debian's packages, not binaries built here: containerd 1.6.20 / runc 1.1.5 are what
# Debian 12 ships and were checked by hand to run kubelet 1.36 pods; building
# containerd v2 from its Go module would add minutes to a cold build for no test it
# enables. The versions are pinned by the Debian release (bookworm point releases
# only take security fixes); localcluster checks the containerd minor at start.
# Idempotent: installs only what is missing (apt-get update only then).
# Usage: bash hack/cluster/node-deps.sh [--check] [--images]
set -euo pipefail

packages=(containerd runc containernetworking-plugins busybox-static iptables conntrack kmod docker-registry)
check=0
for arg in "$@"; do
  case "$arg" in
    --check) check=1 ;;
    --images) packages+=(buildah debootstrap) ;;
    *) echo "node-deps.sh: unknown option '$arg' (--check, --images)" >&2; exit 2 ;;
  esac
done
missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "node-deps.sh: ${packages[*]}: installed" >&2
  exit 0
fi
if [[ $check == 1 ]]; then
  echo "node-deps.sh: missing Debian packages: ${missing[*]}; run: bash hack/cluster/node-deps.sh" >&2
  exit 1
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "node-deps.sh: installing ${missing[*]} needs root (apt-get); the real node runs as root anyway" >&2
  exit 1
fi
start=$SECONDS
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >&2
apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
# The package's postinst may start a system containerd on machines with an init
# system; the real node runs its own containerd with its own socket and state, so a
# system one is harmless but not used.
echo "node-deps.sh: installed ${missing[*]} in $((SECONDS - start))s" >&2
