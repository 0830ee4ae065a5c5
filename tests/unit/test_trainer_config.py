"""The trainer config envelope (kubetune_api.trainer_config): what the operator renders is what
the trainers parse, typed; a field renamed in the models breaks the trainers loudly (mypy and the
parser), not silently (a dotted-string read falling back to its default)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from pydantic import ValidationError

from kubetune.api.resources import AUTOMODEL, BY_KIND
from kubetune.render import NO_PROGRESS, cluster_paths, kubernetes_progress, render_trainer_config
from kubetune_api.automodel import AutomodelJobSpec
from kubetune_api.trainer_config import (
    AutomodelTrainerConfig,
    KubernetesProgress,
    UnslothTrainerConfig,
    parse_trainer_config,
)
from kubetune_api.unsloth import UnslothJobSpec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*-*.yaml"))


def _jobs() -> list[tuple[str, dict[str, Any]]]:
    jobs = []
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in ("AutomodelJob", "UnslothJob"):
                jobs.append((f"{path.stem}/{doc['metadata']['name']}", doc))
    return jobs


JOBS = _jobs()


def _render(doc: dict[str, Any]) -> dict[str, Any]:
    resource = BY_KIND[doc["kind"]]
    spec = cast(AutomodelJobSpec | UnslothJobSpec, resource.spec_model.model_validate(doc["spec"]))
    if isinstance(spec, AutomodelJobSpec):
        has_teacher, has_validation = spec.training.teacher_model is not None, spec.dataset.validation is not None
    else:
        has_teacher, has_validation = False, spec.dataset.validation_path is not None
    return render_trainer_config(
        resource,
        name=doc["metadata"]["name"],
        namespace="team-a",
        uid="0000-uid",
        spec=spec,
        paths=cluster_paths(has_teacher=has_teacher, has_validation=has_validation),
        progress=kubernetes_progress(resource, "team-a", doc["metadata"]["name"]),
    )


def test_there_are_example_jobs() -> None:
    assert len(JOBS) >= 6, "examples/ lost its jobs; these tests would check nothing"


@pytest.mark.parametrize(("name", "doc"), JOBS, ids=[name for name, _ in JOBS])
def test_every_rendered_example_parses_back_into_its_kind(name: str, doc: dict[str, Any]) -> None:
    rendered = json.loads(json.dumps(_render(doc)))  # through JSON, as the ConfigMap carries it
    config = parse_trainer_config(rendered)
    expected = AutomodelTrainerConfig if doc["kind"] == "AutomodelJob" else UnslothTrainerConfig
    assert type(config) is expected
    assert config.spec == BY_KIND[doc["kind"]].spec_model.model_validate(doc["spec"])
    assert isinstance(config.progress, KubernetesProgress)
    assert config.progress.status_path == (
        f"/apis/kubetune.io/v1alpha1/namespaces/team-a/{BY_KIND[doc['kind']].plural}/{doc['metadata']['name']}/status"
    )
    assert config.model_dump(mode="json", by_alias=True) == rendered  # the document round-trips exactly


def test_the_kind_picks_the_spec_model() -> None:
    (_, unsloth_doc) = next(job for job in JOBS if job[1]["kind"] == "UnslothJob")
    rendered = _render(unsloth_doc)
    with pytest.raises(ValidationError, match=r"AutomodelJob\.spec\.model\s+Input should be a valid string"):
        parse_trainer_config({**rendered, "kind": "AutomodelJob"})
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        parse_trainer_config({**rendered, "kind": "ThirdJob"})


def test_the_paths_must_hold_what_the_spec_references() -> None:
    spec = AutomodelJobSpec.model_validate(
        {
            "model": "student",
            "dataset": {"training": "data"},
            "training": {"training_type": "distillation", "teacher_model": "teacher"},
        }
    )
    paths = cluster_paths(has_teacher=False, has_validation=False)
    with pytest.raises(ValidationError, match=r"paths\.teacher_model is required"):
        render_trainer_config(AUTOMODEL, name="j", namespace="n", uid="u", spec=spec, paths=paths, progress=NO_PROGRESS)


def _renamed_copy(tmp_path: Path) -> Path:
    """kubetune_api copied, with AutomodelJob's `training.lora.rank` renamed to `lora_rank`."""
    copy = tmp_path / "api"
    shutil.copytree(ROOT / "operator" / "kubetune_api", copy / "kubetune_api")
    models = copy / "kubetune_api" / "automodel.py"
    text = models.read_text()
    field = "\n    rank: int = Field(\n"
    assert text.count(field) == 1, "AutomodelLora.rank moved; point this test at another field the trainer reads"
    models.write_text(text.replace(field, "\n    lora_rank: int = Field(\n"))
    return copy


def _mypy_trainer(api: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nstrict = True\nplugins = pydantic.mypy\nignore_missing_imports = True\n")
    command = [sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(tmp_path / "mypy-cache")]
    return subprocess.run(
        [*command, "--no-warn-unused-ignores", "-m", "kubetune_trainer.automodel.settings"],
        env={**os.environ, "MYPYPATH": os.pathsep.join([str(api), str(ROOT / "trainer-images")])},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )


def test_renaming_a_model_field_breaks_the_trainer_under_mypy_and_the_parser(tmp_path: Path) -> None:
    """Issue 14's check: the trainer reads typed attributes, so a renamed field is an error in
    both places, where `cfg.get("training.lora.rank", 16)` would have trained with rank 16."""
    pristine = tmp_path / "pristine"
    shutil.copytree(ROOT / "operator" / "kubetune_api", pristine / "kubetune_api")
    clean = _mypy_trainer(pristine, tmp_path)
    assert clean.returncode == 0, f"the trainer does not type-check against the real models:\n{clean.stdout}"

    renamed = _renamed_copy(tmp_path)
    broken = _mypy_trainer(renamed, tmp_path)
    assert broken.returncode == 1, broken.stdout
    assert '"AutomodelLora" has no attribute "rank"' in broken.stdout, broken.stdout

    (_, job) = next(job for job in JOBS if job[1]["kind"] == "AutomodelJob" and "lora" in job[0])
    config = tmp_path / "config.json"
    config.write_text(json.dumps(_render(job)))
    probe = (
        "import json, sys; from kubetune_api.trainer_config import parse_trainer_config as parse; "
        "parse(json.load(open(sys.argv[1])))"
    )
    parsed = subprocess.run(
        [sys.executable, "-c", probe, str(config)],
        env={**os.environ, "PYTHONPATH": str(renamed)},
        capture_output=True,
        text=True,
    )
    assert parsed.returncode != 0
    assert "spec.training.lora.rank" in parsed.stderr and "Extra inputs are not permitted" in parsed.stderr, (
        parsed.stderr[-2000:]
    )
