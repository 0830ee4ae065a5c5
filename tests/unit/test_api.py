"""The API contract: seed defaults, enums, ranges, every cross-field rule, normalisation."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from seed_defaults import (
    AUTOMODEL_DEFAULTS,
    AUTOMODEL_ENUMS,
    REQUIRED,
    UNSLOTH_DEFAULTS,
    UNSLOTH_ENUMS,
)

from kubetune_api.automodel import AUTOMODEL_RULES, AutomodelJobSpec
from kubetune_api.entities import MODEL_RULES, FilesetSpec, ModelSpec
from kubetune_api.unsloth import UNSLOTH_RULES, UnslothJobSpec
from support.specs import AUTOMODEL_MIN, RULE_CASES, UNSLOTH_MIN, get_path, with_value, without

SEED = Path(__file__).resolve().parents[3] / "shared" / "seed" / "training-configuration.md"


def error_paths(model: Any, spec: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(spec)
    paths: list[str] = []
    for err in info.value.errors():
        if err["type"] == "cross_field":
            paths.extend(p for p, _ in err["ctx"]["problems"])
        else:
            paths.append("spec." + ".".join(str(p) for p in err["loc"]))
    return paths


# --- defaults -------------------------------------------------------------------------


@pytest.mark.parametrize("dotted,default", sorted(AUTOMODEL_DEFAULTS.items()))
def test_automodel_seed_default(dotted: str, default: Any) -> None:
    if default is REQUIRED:
        assert f"spec.{dotted}" in error_paths(AutomodelJobSpec, without(AUTOMODEL_MIN, dotted))
        return
    dumped = AutomodelJobSpec.model_validate(AUTOMODEL_MIN).model_dump()
    assert get_path(dumped, dotted) == default


@pytest.mark.parametrize("dotted,default", sorted(UNSLOTH_DEFAULTS.items()))
def test_unsloth_seed_default(dotted: str, default: Any) -> None:
    if default is REQUIRED:
        assert f"spec.{dotted}" in error_paths(UnslothJobSpec, without(UNSLOTH_MIN, dotted))
        return
    dumped = UnslothJobSpec.model_validate(UNSLOTH_MIN).model_dump()
    assert get_path(dumped, dotted) == default


@pytest.mark.skipif(not SEED.exists(), reason=f"the seed document is not beside this clone ({SEED})")
def test_every_seed_row_has_a_default_asserted() -> None:
    text = SEED.read_text()
    automodel, unsloth = text.split("## Unsloth", 1)
    unsloth = unsloth.split("## GPU memory", 1)[0]

    def fields(section: str) -> set[str]:
        rows = re.findall(r"^\| ([a-z_]+(?:\.[a-z_0-9]+)*) \|", section, flags=re.M)
        return {r for r in rows if r not in ("field", "model size") and r != "training.lora"}

    assert fields(automodel) - set(AUTOMODEL_DEFAULTS) == set()
    assert fields(unsloth) - set(UNSLOTH_DEFAULTS) == set()


# --- enums and ranges -------------------------------------------------------------------


def _enum_cases() -> list[tuple[Any, dict[str, Any], str, str]]:
    cases: list[tuple[Any, dict[str, Any], str, str]] = []
    for dotted, values in AUTOMODEL_ENUMS.items():
        cases += [(AutomodelJobSpec, AUTOMODEL_MIN, dotted, v) for v in values]
    for dotted, values in UNSLOTH_ENUMS.items():
        cases += [(UnslothJobSpec, UNSLOTH_MIN, dotted, v) for v in values]
    return cases


def _compatible(model: Any, base: dict[str, Any], dotted: str, value: str) -> dict[str, Any]:
    """Some enum values need a companion setting to satisfy a rule; add it."""
    spec = with_value(base, dotted, value)
    if dotted == "training.training_type" and value == "distillation":
        spec = with_value(spec, "training.teacher_model", "teacher")
    if model is UnslothJobSpec and dotted == "model.dtype" and value == "float16":
        spec = with_value(spec, "hardware.precision", "fp16")
    if model is UnslothJobSpec and dotted == "hardware.precision" and value == "fp16":
        spec = with_value(spec, "model.dtype", "auto")
    if model is UnslothJobSpec and dotted == "output.save_method" and value == "merged_4bit":
        spec = with_value(spec, "model.load_in_4bit", True)
    if model is UnslothJobSpec and dotted == "training.finetuning_type" and value == "all_weights":
        spec = with_value(spec, "model.load_in_4bit", False)
    return spec


@pytest.mark.parametrize("model,base,dotted,value", _enum_cases())
def test_enum_value_accepted(model: Any, base: dict[str, Any], dotted: str, value: str) -> None:
    dumped = model.model_validate(_compatible(model, base, dotted, value)).model_dump()
    expected = "lora_merged" if value == "lora_merged" else value
    assert get_path(dumped, dotted) == expected


@pytest.mark.parametrize(
    "model,base,dotted",
    [(AutomodelJobSpec, AUTOMODEL_MIN, d) for d in AUTOMODEL_ENUMS]
    + [(UnslothJobSpec, UNSLOTH_MIN, d) for d in UNSLOTH_ENUMS],
)
def test_enum_unknown_value_refused(model: Any, base: dict[str, Any], dotted: str) -> None:
    assert error_paths(model, with_value(base, dotted, "bogus")) == [f"spec.{dotted}"]


RANGE_CASES = [
    # (model, base, field, bad value, good value)
    (AutomodelJobSpec, AUTOMODEL_MIN, "training.max_seq_length", 1, 2),
    (AutomodelJobSpec, AUTOMODEL_MIN, "training.lora.rank", 0, 1),
    (AutomodelJobSpec, AUTOMODEL_MIN, "training.lora.alpha", 0, 1),
    (AutomodelJobSpec, AUTOMODEL_MIN, "training.distillation_ratio", 1.01, 1.0),
    (AutomodelJobSpec, AUTOMODEL_MIN, "training.distillation_ratio", -0.01, 0.0),
    (AutomodelJobSpec, AUTOMODEL_MIN, "training.distillation_temperature", 0.0, 0.01),
    (AutomodelJobSpec, AUTOMODEL_MIN, "schedule.epochs", 0, 1),
    (AutomodelJobSpec, AUTOMODEL_MIN, "schedule.max_steps", 0, 1),
    (AutomodelJobSpec, AUTOMODEL_MIN, "schedule.val_check_interval", 0.0, 0.25),
    (AutomodelJobSpec, AUTOMODEL_MIN, "batch.global_batch_size", 0, 1),
    (AutomodelJobSpec, AUTOMODEL_MIN, "batch.micro_batch_size", 0, 1),
    (AutomodelJobSpec, AUTOMODEL_MIN, "optimizer.learning_rate", 0.0, 1e-9),
    (AutomodelJobSpec, AUTOMODEL_MIN, "optimizer.weight_decay", -0.1, 0.0),
    (AutomodelJobSpec, AUTOMODEL_MIN, "optimizer.warmup_steps", -1, 0),
    (AutomodelJobSpec, AUTOMODEL_MIN, "parallelism.num_nodes", 0, 1),
    (AutomodelJobSpec, AUTOMODEL_MIN, "parallelism.num_gpus_per_node", 0, 1),
    (AutomodelJobSpec, AUTOMODEL_MIN, "parallelism.expert_parallel_size", 0, 1),
    (UnslothJobSpec, UNSLOTH_MIN, "model.max_seq_length", 1, 2),
    (UnslothJobSpec, UNSLOTH_MIN, "training.lora.rank", 0, 1),
    (UnslothJobSpec, UNSLOTH_MIN, "training.lora.alpha", 0, 1),
    (UnslothJobSpec, UNSLOTH_MIN, "training.lora.dropout", 1.5, 1.0),
    (UnslothJobSpec, UNSLOTH_MIN, "schedule.warmup_ratio", 1.0, 0.99),
    (UnslothJobSpec, UNSLOTH_MIN, "schedule.logging_steps", 0, 1),
    (UnslothJobSpec, UNSLOTH_MIN, "schedule.save_steps", 0, 1),
    (UnslothJobSpec, with_value(UNSLOTH_MIN, "dataset.validation_path", "val"), "schedule.eval_steps", 0, 1),
    (UnslothJobSpec, UNSLOTH_MIN, "batch.per_device_train_batch_size", 0, 1),
    (UnslothJobSpec, UNSLOTH_MIN, "batch.gradient_accumulation_steps", 0, 1),
    (UnslothJobSpec, UNSLOTH_MIN, "optimizer.learning_rate", 0.0, 1e-9),
    (UnslothJobSpec, UNSLOTH_MIN, "optimizer.weight_decay", -1.0, 0.0),
    (UnslothJobSpec, UNSLOTH_MIN, "hardware.gpus", "0,a", "0,1"),
    (UnslothJobSpec, UNSLOTH_MIN, "hardware.gpus", "-1", "3"),
    (UnslothJobSpec, UNSLOTH_MIN, "hardware.gpus", "", "0"),
    (AutomodelJobSpec, AUTOMODEL_MIN, "model", "Not_A_Name", "workspace/base-1"),
]


@pytest.mark.parametrize("model,base,dotted,bad,good", RANGE_CASES)
def test_range(model: Any, base: dict[str, Any], dotted: str, bad: Any, good: Any) -> None:
    assert error_paths(model, with_value(base, dotted, bad)) == [f"spec.{dotted}"]
    assert get_path(model.model_validate(with_value(base, dotted, good)).model_dump(), dotted) == good


# --- strict types and unknown keys --------------------------------------------------------


def test_string_is_not_an_integer() -> None:
    assert error_paths(AutomodelJobSpec, with_value(AUTOMODEL_MIN, "batch.global_batch_size", "8")) == [
        "spec.batch.global_batch_size"
    ]


def test_boolean_is_not_a_string_for_gradient_checkpointing() -> None:
    with pytest.raises(ValidationError, match='use_gradient_checkpointing: "true"'):
        UnslothJobSpec.model_validate(with_value(UNSLOTH_MIN, "training.use_gradient_checkpointing", True))


def test_unknown_keys_refused_everywhere() -> None:
    assert error_paths(AutomodelJobSpec, with_value(AUTOMODEL_MIN, "training.lora.ranks", 8)) == [
        "spec.training.lora.ranks"
    ]
    assert error_paths(UnslothJobSpec, with_value(UNSLOTH_MIN, "parallelism", {"num_nodes": 2})) == ["spec.parallelism"]
    assert error_paths(AutomodelJobSpec, with_value(AUTOMODEL_MIN, "hardware", {"gpus": "0"})) == ["spec.hardware"]


# --- cross-field rules ----------------------------------------------------------------------


def test_every_rule_has_cases() -> None:
    names = {r.name for r in (*AUTOMODEL_RULES, *UNSLOTH_RULES, *MODEL_RULES)}
    assert names == set(RULE_CASES)


@pytest.mark.parametrize("name", sorted(RULE_CASES))
def test_rule(name: str) -> None:
    model, good, bad = RULE_CASES[name]
    rule = next(r for r in (*AUTOMODEL_RULES, *UNSLOTH_RULES, *MODEL_RULES) if r.name == name)
    model.model_validate(good)
    assert error_paths(model, bad) == [rule.spec_path]


def test_val_check_interval_is_read_by_value_not_by_json_type() -> None:
    """kubectl turns YAML `1.0` into `1` and the API server stores JSON `1.0` as `1`: what the
    trainer gets must be the same either way (1 means one epoch; docs in the field description)."""
    import json

    def parsed(text: str) -> Any:
        schedule = json.loads(text)
        spec = AutomodelJobSpec.model_validate(with_value(AUTOMODEL_MIN, "schedule", schedule))
        return spec.model_dump(mode="json")["schedule"]["val_check_interval"]

    assert parsed('{"val_check_interval": 1}') == parsed('{"val_check_interval": 1.0}') == 1.0
    assert parsed('{"val_check_interval": 4}') == parsed('{"val_check_interval": 4.0}') == 4.0
    description = AutomodelJobSpec.model_json_schema()["$defs"]["AutomodelSchedule"]["properties"][
        "val_check_interval"
    ]["description"]
    assert "1 and 1.0 both mean one epoch" in description
    with pytest.raises(ValidationError, match=r"spec\.schedule\.val_check_interval: .*1 \(once per epoch\)"):
        AutomodelJobSpec.model_validate(with_value(AUTOMODEL_MIN, "schedule.val_check_interval", 1.5))


# --- entity sources (issue 17) ---------------------------------------------------------------

MODEL_STORAGE: dict[str, Any] = {"pvc": {"claimName": "models", "path": "smol"}}


def test_source_defaults_differ_by_entity_only_in_repo_type() -> None:
    """A Fileset's repository is a dataset repository unless it says otherwise; a Model's a model one."""
    source = {"huggingface": {"repo": "org/x", "tokenSecret": {"name": "hf"}}}
    model = ModelSpec.model_validate({"storage": MODEL_STORAGE, "source": source}).model_dump()["source"]
    fileset = FilesetSpec.model_validate({"storage": MODEL_STORAGE, "source": source}).model_dump()["source"]
    assert model["huggingface"] == {
        "repo": "org/x",
        "repoType": "model",
        "revision": "main",
        "allowPatterns": None,
        "tokenSecret": {"name": "hf", "key": "token"},
    }
    assert fileset["huggingface"] == {**model["huggingface"], "repoType": "dataset"}
    s3 = ModelSpec.model_validate({"storage": MODEL_STORAGE, "source": {"s3": {"bucket": "b"}}}).model_dump()
    assert s3["source"]["s3"] == {
        "bucket": "b",
        "prefix": "",
        "endpoint": None,
        "region": None,
        "credentialsSecret": None,
    }


@pytest.mark.parametrize(
    "dotted,bad",
    [
        ("source.huggingface.repo", "org/two words"),
        ("source.huggingface.repo", "a/b/c"),
        ("source.huggingface.revision", "main branch"),
        ("source.huggingface.repoType", "space"),
        ("source.huggingface.allowPatterns", []),
        ("source.huggingface.branch", "main"),
        ("source.huggingface.tokenSecret.name", ""),
    ],
)
def test_bad_huggingface_source_names_the_field(dotted: str, bad: Any) -> None:
    spec = {"storage": MODEL_STORAGE, "source": {"huggingface": {"repo": "org/x"}}}
    assert error_paths(ModelSpec, with_value(spec, dotted, bad)) == [f"spec.{dotted}"]


@pytest.mark.parametrize(
    "dotted,bad",
    [
        ("source.s3.bucket", "no spaces"),
        ("source.s3.endpoint", "minio.storage:9000"),
        ("source.s3.region", "EU West"),
        ("source.s3.credentialsSecret", {"name": "keys", "key": "x"}),
    ],
)
def test_bad_s3_source_names_the_field(dotted: str, bad: Any) -> None:
    spec = {"storage": MODEL_STORAGE, "source": {"s3": {"bucket": "data", "endpoint": "http://minio:9000"}}}
    expected = "spec.source.s3.credentialsSecret.key" if dotted.endswith("credentialsSecret") else f"spec.{dotted}"
    assert error_paths(FilesetSpec, with_value(spec, dotted, bad)) == [expected]


# --- normalisation ---------------------------------------------------------------------------


def test_lora_merge_normalises_to_lora_merged() -> None:
    spec = AutomodelJobSpec.model_validate(with_value(AUTOMODEL_MIN, "training.lora", {"merge": True}))
    assert spec.training.finetuning_type == "lora_merged"
    assert spec.training.lora is not None and spec.training.lora.merge is True


def test_lora_merged_sets_merge() -> None:
    spec = AutomodelJobSpec.model_validate(with_value(AUTOMODEL_MIN, "training.finetuning_type", "lora_merged"))
    assert spec.training.lora is not None and spec.training.lora.merge is True


def test_all_weights_has_no_lora_block() -> None:
    spec = AutomodelJobSpec.model_validate(with_value(AUTOMODEL_MIN, "training.finetuning_type", "all_weights"))
    assert spec.training.lora is None
    spec_u = UnslothJobSpec.model_validate(
        with_value(with_value(UNSLOTH_MIN, "training.finetuning_type", "all_weights"), "model.load_in_4bit", False)
    )
    assert spec_u.training.lora is None


def test_derived_sizes() -> None:
    spec = AutomodelJobSpec.model_validate(
        with_value(
            with_value(
                AUTOMODEL_MIN,
                "parallelism",
                {"num_nodes": 2, "num_gpus_per_node": 8, "tensor_parallel_size": 2, "pipeline_parallel_size": 2},
            ),
            "batch.global_batch_size",
            64,
        )
    )
    assert spec.parallelism.total_gpus == 16
    assert spec.parallelism.data_parallel_size == 4


def test_every_free_text_field_has_a_maximum_length() -> None:
    """The operator keeps every job in memory and the API server stores it: no string of
    the API is unbounded (a prompt_template of megabytes is refused, naming the field)."""
    from kubetune.api.resources import RESOURCES
    from kubetune.crdgen import spec_schema, status_schema

    unbounded = []

    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("type") == "string" and not ({"maxLength", "enum"} & node.keys()):
            unbounded.append(path)
        for name, sub in (node.get("properties") or {}).items():
            walk(sub, f"{path}.{name}")
        if "items" in node:
            walk(node["items"], f"{path}[]")

    for resource in RESOURCES:
        walk(spec_schema(resource), f"{resource.kind}.spec")
        walk(status_schema(resource), f"{resource.kind}.status")
    assert not unbounded, unbounded
    huge = with_value(AUTOMODEL_MIN, "dataset.prompt_template", "{prompt}" + "x" * 16384)
    assert "spec.dataset.prompt_template" in error_paths(AutomodelJobSpec, huge)
