"""The pinned helm (built from its Go module by hack/cluster/build.sh) and `helm template`
of the chart, for the chart's unit tests and the cluster tests that apply what it renders."""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kubetune"
RELEASE = "kubetune"
NAMESPACE = "kubetune-system"
BUILD_HELM = "bash hack/cluster/build.sh helm"


def versions_env() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (ROOT / "hack" / "cluster" / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


def _helm_path() -> Path:
    if os.environ.get("KUBETUNE_HELM"):
        return Path(os.environ["KUBETUNE_HELM"])
    cache = Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))
    version = versions_env()["HELM_VERSION"]
    return cache / "bin" / f"helm-{version}" / "helm"


@functools.cache
def helm_binary() -> Path:
    """The pinned helm; built here when the cache lacks it, because a skipped chart test in CI
    would hide a broken chart."""
    path = _helm_path()
    if not path.is_file() and "KUBETUNE_HELM" not in os.environ:
        build = subprocess.run(["bash", "hack/cluster/build.sh", "helm"], cwd=ROOT, capture_output=True, text=True)
        if build.returncode != 0:
            pytest.fail(
                f"helm is missing at {path} and `{BUILD_HELM}` failed:\n{build.stdout[-3000:]}{build.stderr[-3000:]}"
            )
    if not path.is_file():
        pytest.fail(f"helm not found at {path}: run `{BUILD_HELM}` (or point KUBETUNE_HELM at a helm v3 binary)")
    return path


@functools.cache
def _helm_home() -> str:
    # helm writes caches and repository config under its home dirs; keep the user's untouched.
    return tempfile.mkdtemp(prefix="kubetune-helm-home-")


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    home = _helm_home()
    env = {
        **os.environ,
        "HELM_CACHE_HOME": f"{home}/cache",
        "HELM_CONFIG_HOME": f"{home}/config",
        "HELM_DATA_HOME": f"{home}/data",
    }
    return subprocess.run([str(helm_binary()), *args], cwd=ROOT, capture_output=True, text=True, env=env)


@functools.cache
def _template(args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds", *args)


def render(*args: str) -> list[dict[str, Any]]:
    result = _template(tuple(args))
    assert result.returncode == 0, f"helm template {' '.join(args)} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_error(*args: str) -> str:
    result = _template(tuple(args))
    assert result.returncode != 0, f"helm template {' '.join(args)} should have failed but rendered"
    return result.stderr
