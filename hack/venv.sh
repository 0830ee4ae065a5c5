#!/usr/bin/env bash
# Create (or reuse) a virtual environment outside the clone, keyed by the hash of
# the requirement files that define it, and print its path.
# Why outside the clone: torch and unsloth are gigabytes; CI runs in a fresh clone
# on the same machine and must not reinstall them every time.
# Usage: hack/venv.sh NAME REQUIREMENTS_FILE [REQUIREMENTS_FILE ...]
set -euo pipefail
name=$1; shift
cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
key=$( (echo "python=$(python3 -c 'import sys; print(sys.version)')"; cat "$@") | sha256sum | cut -c1-16)
venv="$cache/venvs/$name-$key"
mkdir -p "$cache/venvs"
# One builder at a time per environment: parallel test runs must not race.
exec 9>"$venv.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  echo "hack/venv.sh: building $venv from $* (first run only; cached afterwards)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  args=()
  for f in "$@"; do args+=(-r "$f"); done
  "$venv/bin/python" -m pip install --quiet "${args[@]}" >&2
  touch "$venv/.complete"
fi
echo "$venv"
