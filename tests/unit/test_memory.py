"""The memory pre-flight check: the seed's GPU memory guidelines, the method each job
is checked as, the condition the operator writes and the CLI's warning."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.resources import spec_backend
from kubetune.controller import status as st
from kubetune.memory import BILLION, GUIDELINES, guideline_for, memory_risk
from kubetune_api.automodel import AutomodelJobSpec
from kubetune_api.unsloth import UnslothJobSpec

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("parameters", "row"),
    [
        (135_000_000, None),  # SmolLM2-135M: under the smallest row
        (1_240_000_000, "1B"),  # Llama 3.2 1B
        (1_540_000_000, "1B"),  # Qwen2.5 1.5B
        (4_020_000_000, "3B"),  # Qwen3 4B
        (3_210_000_000, "3B"),  # Llama 3.2 3B
        (7_240_000_000, "7-8B"),  # Mistral 7B
        (8_030_000_000, "7-8B"),  # Llama 3.1 8B
        (13_000_000_000, "13B"),
        (14_800_000_000, "13B"),  # Qwen2.5 14B
        (32_800_000_000, "70B"),  # Qwen2.5 32B: the 13B row would ask far too little
        (70_600_000_000, "70B"),
        (405_000_000_000, "70B"),  # beyond the table: its largest row, the least it needs
    ],
)
def test_a_parameter_count_takes_its_row(parameters: int, row: str | None) -> None:
    found = guideline_for(parameters)
    assert (found.size if found else None) == row


def test_the_rows_cover_every_count_from_half_a_billion_without_gaps() -> None:
    for below, above in itertools.pairwise(GUIDELINES):
        assert below.high == above.low
    assert GUIDELINES[0].low == 0.5 * BILLION and GUIDELINES[-1].high == float("inf")


@pytest.mark.parametrize(
    ("parameters", "method", "gpus", "gb", "risk"),
    [
        (8 * BILLION, "full", 1, None, "2-4 × 80 GB"),  # too few, whatever their size
        (8 * BILLION, "full", 2, 80, None),
        (8 * BILLION, "full", 2, 40, "2-4 × 80 GB"),  # enough of them, too small
        (8 * BILLION, "lora", 1, 40, None),
        (8 * BILLION, "lora", 1, 24, "40 GB"),
        (8 * BILLION, "lora", 1, None, None),  # size unknown: only the count is held against it
        (70 * BILLION, "lora", 1, None, "2 × 80 GB"),
        (70 * BILLION, "full", 8, 80, None),
        (1 * BILLION, "full", 1, 24, None),
        (3 * BILLION, "full", 1, 80, "2 × 24 GB"),
        (8 * BILLION, None, 1, 16, None),  # quantized loading: not checked
        (None, "full", 1, 16, None),  # no parameter count: not checked
        (8 * BILLION, "full", 0, None, None),  # no GPU (kubetune run on CPU): not checked
    ],
)
def test_memory_risk_against_the_seed_table(
    parameters: int | None, method: str | None, gpus: int, gb: float | None, risk: str | None
) -> None:
    why = memory_risk(parameters, method, gpus, gb)  # type: ignore[arg-type]
    if risk is None:
        assert why is None
    else:
        assert why is not None and risk in why and "a warning only" in why


def _automodel(finetuning_type: str, gpus: int = 1) -> AutomodelJobSpec:
    return AutomodelJobSpec.model_validate(
        {
            "model": "m",
            "dataset": {"training": "d"},
            "training": {"finetuning_type": finetuning_type},
            "parallelism": {"num_gpus_per_node": gpus},
        }
    )


def _unsloth(finetuning_type: str, load_in_4bit: bool, load_in_8bit: bool = False) -> UnslothJobSpec:
    return UnslothJobSpec.model_validate(
        {
            "model": {"name": "m", "load_in_4bit": load_in_4bit, "load_in_8bit": load_in_8bit},
            "dataset": {"path": "d"},
            "training": {"finetuning_type": finetuning_type},
        }
    )


@pytest.mark.parametrize(
    ("spec", "method"),
    [
        (_automodel("lora"), "lora"),
        (_automodel("lora_merged"), "lora"),
        (_automodel("all_weights"), "full"),
        (_unsloth("lora", load_in_4bit=True), None),
        (_unsloth("lora", load_in_4bit=False, load_in_8bit=True), None),
        (_unsloth("lora", load_in_4bit=False), "lora"),
        (_unsloth("all_weights", load_in_4bit=False), "full"),
    ],
)
def test_each_job_is_checked_as_its_method(spec: AutomodelJobSpec | UnslothJobSpec, method: str | None) -> None:
    assert spec_backend(spec).memory_method(spec) == method


def test_the_condition_is_written_only_while_the_risk_holds() -> None:
    state = st.ChildState(st.RUNNING, "Running", "the trainer pod is running", None)
    risky = st.status_from_child({}, state, 1, "2026-12-02T00:00:00Z", memory_risk="below the guideline")
    cond = st.find_condition([c.model_dump(by_alias=True) for c in risky.conditions or []], st.COND_MEMORY_RISK)
    assert cond is not None and cond["status"] == "True" and cond["reason"] == "BelowMemoryGuideline"
    assert cond["message"] == "below the guideline"
    fine = st.status_from_child({}, state, 1, "2026-12-02T00:00:00Z")
    assert st.find_condition([c.model_dump(by_alias=True) for c in fine.conditions or []], st.COND_MEMORY_RISK) is None


def _validate(path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "operator")}
    return subprocess.run(
        [sys.executable, "-m", "kubetune", "validate", "-f", str(path), *flags],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _manifests(parameters: int | None, gpus: int) -> list[dict[str, object]]:
    model_spec: dict[str, object] = {"storage": {"pvc": {"claimName": "models"}}}
    if parameters is not None:
        model_spec["parameters"] = parameters
    return [
        {"apiVersion": "kubetune.io/v1alpha1", "kind": "Model", "metadata": {"name": "llama-8b"}, "spec": model_spec},
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "AutomodelJob",
            "metadata": {"name": "full-8b"},
            "spec": {
                "model": "llama-8b",
                "dataset": {"training": "chat"},
                "training": {"finetuning_type": "all_weights"},
                "parallelism": {"num_gpus_per_node": gpus},
            },
        },
    ]


def test_validate_warns_below_the_guideline_and_still_passes(tmp_path: Path) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump_all(_manifests(8_030_261_248, gpus=1)))
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{path}:1 AutomodelJob/full-8b: warning: MemoryRisk:" in result.stderr
    assert "full-weight fine-tuning of 7-8B models is 2-4 × 80 GB" in result.stderr
    # Two GPUs meet the count; told they have 40 GB each, the size is what falls short.
    path.write_text(yaml.safe_dump_all(_manifests(8_030_261_248, gpus=2)))
    assert "MemoryRisk" not in _validate(path).stderr
    smaller = _validate(path, "--gpu-memory-gb", "40")
    assert smaller.returncode == 0 and "asks for 2 GPU(s) of 40 GB" in smaller.stderr


def test_validate_says_nothing_without_a_parameter_count(tmp_path: Path) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump_all(_manifests(None, gpus=1)))
    result = _validate(path)
    assert result.returncode == 0 and "MemoryRisk" not in result.stderr, result.stderr


def test_the_gpu_size_is_the_smallest_that_feature_discovery_labelled() -> None:
    from kubetune.memory import smallest_labelled_gpu_gb, sold_as_gb

    def node(mib: str | None) -> dict[str, Any]:
        return {"metadata": {"name": "n", "labels": {"nvidia.com/gpu.memory": mib} if mib is not None else {}}}

    # What the driver reports for cards sold as 80, 24, 40 and 141 GB.
    assert [sold_as_gb(m) for m in (81559, 23028, 40960, 143771)] == [80, 24, 40, 141]
    assert sold_as_gb(65536) == 64  # no card size near: a whole GB
    assert smallest_labelled_gpu_gb([node("81559"), node("23028"), node(None), node("lots")]) == 24
    assert smallest_labelled_gpu_gb([node(None), node("0")]) is None
