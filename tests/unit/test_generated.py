"""Drift: every file `make generate` writes equals what is committed, so a change to the
models, the table of kinds or the operator's rules cannot ship without its CRDs and chart
files. The golden files (test_builders.py) and the chart README's values table
(test_helm.py) are checked by their own tests, which `make generate` runs to rewrite them."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.crdgen import CRD_DIRS, generated_files, write_generated

ROOT = Path(__file__).resolve().parents[2]
FIX = "run `make generate` and commit the result"
GENERATED = generated_files()


def drift(root: Path, relative: Path) -> str | None:
    """Why the file under `root` is not what `make generate` writes, or None."""
    path = root / relative
    if not path.exists():
        return f"{relative} is missing: {FIX}"
    if path.read_text() != GENERATED[relative]:
        return f"{relative} differs from what `make generate` writes: {FIX}"
    return None


@pytest.mark.parametrize("relative", sorted(GENERATED), ids=str)
def test_committed_file_equals_generated(relative: Path) -> None:
    problem = drift(ROOT, relative)
    assert problem is None, problem


@pytest.mark.parametrize("directory", CRD_DIRS, ids=str)
def test_no_stale_crd_is_left(directory: Path) -> None:
    """A CRD whose kind left the table would still be applied by `kubectl apply -f crds/`."""
    stale = sorted(str(p.relative_to(ROOT)) for p in (ROOT / directory).glob("*.yaml"))
    stale = [p for p in stale if Path(p) not in GENERATED]
    assert not stale, f"{', '.join(stale)}: no longer generated; delete them, then {FIX}"


def test_drift_names_the_file_and_the_fix(tmp_path: Path) -> None:
    written = write_generated(tmp_path)
    assert sorted(p.relative_to(tmp_path) for p in written) == sorted(GENERATED)
    assert all(drift(tmp_path, relative) is None for relative in GENERATED)
    edited, removed = sorted(GENERATED)[:2]
    (tmp_path / edited).write_text(GENERATED[edited] + "# edited by hand\n")
    (tmp_path / removed).unlink()
    assert drift(tmp_path, edited) == f"{edited} differs from what `make generate` writes: {FIX}"
    assert drift(tmp_path, removed) == f"{removed} is missing: {FIX}"
