#!/usr/bin/env bash
# Build the stand-in base image for a machine without Docker Hub: Debian bookworm
# (debootstrap, minbase) with Debian's Python 3.11 and pip, committed into buildah's
# local storage. It stands in for both bases the Dockerfiles name as build arguments:
#   python:3.11.14-slim-bookworm               (operator/Dockerfile, PYTHON_IMAGE)
#   pytorch/pytorch:<torch>-cuda13.0-...-runtime (trainer Dockerfiles, BASE_IMAGE)
# Neither carries torch: the trainer Dockerfiles install their pinned torch (the CUDA
# wheels from PyPI, which run on CPU too) exactly as they do on a base that lacks it.
#
# Two changes from a plain debootstrap, both so that the Dockerfiles build unchanged:
#   - `python` exists (python-is-python3), as in both real bases;
#   - Debian's PEP 668 marker (EXTERNALLY-MANAGED) is removed, or `pip install` into the
#     system Python refuses (the real bases have no marker: their Python is not Debian's).
# No CA bundle or index is baked in: hack/images.sh mounts this machine's pip settings
# into the build's RUN steps only.
#
# Cached by content: the tag is a hash of this script, so a rebuild happens only when
# it changes; `--force` rebuilds. Prints the image reference on stdout.
# Usage: hack/standin-base.sh [--force]   (root; debootstrap and buildah from Debian)
set -euo pipefail
cd "$(dirname "$0")/.."

suite=bookworm
mirror=${KUBETUNE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=python3,python3-pip,python-is-python3,ca-certificates
key=$( (cat "$0"; echo "$suite $mirror $packages") | sha256sum | cut -c1-12)
ref="localhost/kubetune-standin/debian-python:${suite}-${key}"

if [[ "${1:-}" != "--force" ]] && buildah inspect --type image "$ref" >/dev/null 2>&1; then
  echo "$ref"
  exit 0
fi
for tool in debootstrap buildah; do
  if ! command -v "$tool" >/dev/null; then
    echo "hack/standin-base.sh: '$tool' is missing; run: bash hack/images-deps.sh" >&2
    exit 1
  fi
done
if [[ $(id -u) -ne 0 ]]; then
  echo "hack/standin-base.sh: debootstrap needs root (it makes device nodes and chroots)" >&2
  exit 1
fi

start=$SECONDS
rootfs=$(mktemp -d /var/tmp/kubetune-standin.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "hack/standin-base.sh: debootstrap $suite ($packages) from $mirror" >&2
debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
  tail -20 "$rootfs.log" >&2
  echo "hack/standin-base.sh: debootstrap failed; the full log is $rootfs.log" >&2
  exit 1
}
rm -f "$rootfs.log"
rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
# What a slim base drops: package lists and caches, docs, the debootstrap log.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/var/log/*.log "$rootfs"/debootstrap

ctr=$(buildah from scratch)
trap 'rm -rf "$rootfs"; buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
mnt=$(buildah mount "$ctr")
cp -a "$rootfs"/. "$mnt"/
buildah umount "$ctr" >/dev/null
buildah config \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 \
  --cmd python3 \
  --label org.opencontainers.image.title=kubetune-standin-debian-python \
  --label "org.opencontainers.image.description=Debian $suite with Python 3 and pip; a local stand-in for python:3.11-slim and the PyTorch runtime base" \
  "$ctr"
buildah commit --quiet --rm "$ctr" "$ref" >/dev/null
trap 'rm -rf "$rootfs"' EXIT
echo "hack/standin-base.sh: built $ref in $((SECONDS - start))s" >&2
echo "$ref"
