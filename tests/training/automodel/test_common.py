"""Config loading, metrics, progress patches (against a real local HTTP server), the termination log and MLflow."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from automodel_helpers import Job, StatusServer, run_entrypoint, run_in_process, tiny_spec

from kubetune_api.status import MAX_CHECKPOINTS, Checkpoint
from kubetune_trainer.common import AutomodelTrainerConfig, ConfigError, MetricsWriter, ProgressReporter, load_config
from kubetune_trainer.common.progress import human_duration, status_checkpoint

pytestmark = pytest.mark.training


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(path)
    path.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(path)
    path.write_text(json.dumps({"kind": "AutomodelJob", "spec": {}, "paths": {"model": "/m", "output": "/o"}}))
    with pytest.raises(ConfigError, match=r"paths\.training_data: Field required"):
        load_config(path)
    path.write_text(json.dumps({"kind": "Other", "spec": {}, "paths": {}}))
    with pytest.raises(ConfigError, match="kind must be one of AutomodelJob, UnslothJob"):
        load_config(path)


def test_config_round_trip(config_writer: Callable[..., Path], tmp_path: Path) -> None:
    path = config_writer(spec=tiny_spec(), model=tmp_path / "m", training_data=tmp_path / "d", output=tmp_path / "o")
    cfg = load_config(path)
    assert isinstance(cfg, AutomodelTrainerConfig)
    assert cfg.paths.model == tmp_path / "m" and cfg.paths.validation_data is None
    assert cfg.spec.training.lora is not None and cfg.spec.training.lora.rank == 8
    assert cfg.spec.training.teacher_model is None
    assert cfg.progress.type == "none"


def test_a_misspelt_or_mistyped_field_fails_parsing_with_its_path(
    config_writer: Callable[..., Path], tmp_path: Path
) -> None:
    """What `cfg.get("training.lora.rnak", 16)` used to turn into a silent default."""
    for spec, message in [
        (tiny_spec(training={"lora": {"rnak": 8}}), r"spec\.training\.lora\.rnak: Extra inputs are not permitted"),
        (tiny_spec(batch={"micro_batch_size": "2"}), r"spec\.batch\.micro_batch_size: Input should be a valid integer"),
        (
            tiny_spec(batch={"global_batch_size": 3, "micro_batch_size": 2}),
            r"spec\.batch\.global_batch_size: must be divisible by batch\.micro_batch_size",
        ),
    ]:
        path = config_writer(spec=spec, model=tmp_path, training_data=tmp_path, output=tmp_path)
        with pytest.raises(ConfigError, match=message):
            load_config(path)


def test_metrics_writer_drops_records_after_the_resume_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as writer:
        for step in range(1, 6):
            writer.write({"step": step, "loss": float(step)})
        writer.write({"step": 6, "loss": float("nan")})
    with MetricsWriter(path, resume_step=3) as writer:
        writer.write({"step": 4, "loss": 40.0})
    assert MetricsWriter.read(path) == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 2.0},
        {"step": 3, "loss": 3.0},
        {"step": 4, "loss": 40.0},
    ]


def _reporting_config(config_writer: Callable[..., Path], tmp_path: Path) -> AutomodelTrainerConfig:
    """A config whose progress goes to AutomodelJob team-a/job-1's status."""
    progress = {
        "type": "kubernetes",
        "group": "kubetune.io",
        "version": "v1alpha1",
        "plural": "automodeljobs",
        "namespace": "team-a",
        "name": "job-1",
    }
    config = config_writer(spec=tiny_spec(), model=tmp_path, training_data=tmp_path, output=tmp_path, progress=progress)
    loaded = load_config(config)
    assert isinstance(loaded, AutomodelTrainerConfig)
    return loaded


def test_progress_patches_the_status_subresource(
    status_server: StatusServer, tmp_path: Path, config_writer: Callable[..., Path]
) -> None:
    cfg = _reporting_config(config_writer, tmp_path)
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("secret-token\n")
    now = [0.0]
    host, port = status_server.server_address[:2]
    reporter = ProgressReporter.from_config(cfg, rank=0, service_account_dir=sa, api_server=f"http://{host}:{port}")
    reporter._clock = lambda: now[0]  # a controlled clock instead of sleeping through the 10 s interval
    reporter.report(step=1, max_steps=10, epoch=0.1, train_loss=2.0)
    reporter.report(step=2, max_steps=10, epoch=0.2, train_loss=1.5)  # within 10 s: held back
    now[0] = 11.0
    reporter.report(step=3, max_steps=10, epoch=0.3, train_loss=1.2, validation_loss=1.4)
    reporter.report(step=4, max_steps=10, epoch=0.4, train_loss=1.1)
    reporter.close()  # the final point is always sent
    paths = {p for p, _, _ in status_server.patches}
    assert paths == {"/apis/kubetune.io/v1alpha1/namespaces/team-a/automodeljobs/job-1/status"}
    assert [b["status"]["progress"]["step"] for _, _, b in status_server.patches] == [1, 3, 4]
    _, headers, last = status_server.patches[-1]
    assert headers["Authorization"] == "Bearer secret-token"
    assert headers["Content-Type"] == "application/merge-patch+json"
    final = last["status"]["progress"]
    assert final["maxSteps"] == 10 and final["trainLoss"] == 1.1 and final["validationLoss"] == 1.4
    assert final["summary"] == "40% · ETA 22s", "11 s over steps 1 to 4: 3.67 s a step, 6 steps left"
    assert final["history"][-2:] == [
        {"step": 3, "trainLoss": 1.2, "validationLoss": 1.4},
        {"step": 4, "trainLoss": 1.1},
    ]
    assert final["updatedAt"].endswith("Z")
    assert ProgressReporter.from_config(cfg, rank=1, api_server="http://x").enabled is False


def test_progress_carries_step_time_tokens_per_second_and_eta(
    status_server: StatusServer, tmp_path: Path, config_writer: Callable[..., Path]
) -> None:
    """The trainer's own timings over its last 20 steps: a slow first step weighs on the
    step time until the window slides past it, then 2 s a step and 500 tokens a step give
    250 tokens/s and, 61 steps before the end, an ETA of 122 s, which the column shows."""
    cfg = _reporting_config(config_writer, tmp_path)
    host, port = status_server.server_address[:2]
    reporter = ProgressReporter.from_config(
        cfg, rank=0, service_account_dir=tmp_path, api_server=f"http://{host}:{port}"
    )
    now = [100.0]
    reporter._clock = lambda: now[0]
    reporter.report(step=0, max_steps=100, validation_loss=3.0)  # before training: no tokens counted
    first = status_server.patches[-1][2]["status"]["progress"]
    assert first["summary"] == "0/100 (0%)" and "etaSeconds" not in first, "no step time measured yet"
    for step in range(1, 13):
        now[0] += 2.0 if step > 1 else 30.0  # a slow first step (warm-up), then 2 s a step
        reporter.report(step=step, max_steps=100, train_loss=1.0, tokens_seen=500.0 * step)
    reporter.close()
    last = status_server.patches[-1][2]["status"]["progress"]
    assert last["step"] == 12 and last["percent"] == 12
    # Window: from step 0 (t=100) to step 12 (t=152): 52 s over 12 steps.
    assert last["secondsPerStep"] == round(52 / 12, 4)
    assert last["etaSeconds"] == round(52 / 12 * 88)
    assert last["tokensPerSecond"] == round(500 * 11 / 22, 1), "tokens from step 1 on: 5500 in 22 s"
    assert last["summary"] == f"12% · ETA {round(52 / 12 * 88) // 60}m"
    for step in range(13, 40):  # the window slides past the warm-up
        now[0] += 2.0
        reporter.report(step=step, max_steps=100, train_loss=1.0, tokens_seen=500.0 * step)
    reporter.close()
    last = status_server.patches[-1][2]["status"]["progress"]
    assert last["secondsPerStep"] == 2.0 and last["tokensPerSecond"] == 250.0
    assert last["etaSeconds"] == 2 * 61 and last["summary"] == "39% · ETA 2m"


def test_checkpoints_reach_the_status_by_their_path_on_the_output_claim(
    status_server: StatusServer, tmp_path: Path, config_writer: Callable[..., Path]
) -> None:
    """The list waits for a step (a patch means "a step finished" to the Stalled check), goes
    with the next patch or the last, keeps the newest MAX_CHECKPOINTS and empties when the
    trainer removed them: a merge patch replaces a list, so `[]` must be sent, not left out."""
    cfg = _reporting_config(config_writer, tmp_path)
    reporter = ProgressReporter.from_config(cfg, rank=0, service_account_dir=tmp_path, api_server=status_server.url)
    now = [0.0]
    reporter._clock = lambda: now[0]
    directory = tmp_path / "checkpoints" / "step-0000002"  # paths.output is tmp_path
    committed = status_checkpoint(
        cfg, directory, step=2, epoch=0.25, committed_at=1_700_000_000.0, validation_loss=float("nan")
    )
    reporter.checkpoints_changed([committed])
    assert status_server.patches == [], "no patch before this process made a step"
    reporter.report(step=3, max_steps=10, train_loss=1.0)
    first = status_server.progress()[-1]["checkpoints"]
    assert first == [
        {
            "step": 2,
            "epoch": 0.25,
            "time": "2023-11-14T22:13:20Z",
            "path": "test-job/00000000-0000-0000-0000-000000000000/checkpoints/step-0000002",
        }
    ], "a path on the claim (<name>/<uid>/...), not the pod's; a NaN loss is left out"

    def at(step: int) -> Checkpoint:
        return committed.model_copy(update={"step": step, "validation_loss": 1.0 / step})

    reporter.checkpoints_changed([at(s) for s in range(4, 4 + MAX_CHECKPOINTS + 2)][::-1])  # any order
    assert len(status_server.patches) == 1, "within the interval: held back"
    reporter.close()
    listed = status_server.progress()[-1]["checkpoints"]
    assert [c["step"] for c in listed] == list(range(6, 6 + MAX_CHECKPOINTS)), "the newest, oldest first"
    assert listed[0]["validationLoss"] == 1.0 / 6
    reporter.close()
    assert len(status_server.patches) == 2, "nothing new: nothing sent"
    now[0] = 20.0
    reporter.checkpoints_changed([])
    assert status_server.progress()[-1]["checkpoints"] == []
    assert status_server.progress()[-1]["step"] == 3


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0, "0s"), (59, "59s"), (60, "1m"), (3599, "59m"), (3660, "1h01m"), (90061, "1d01h")]
)
def test_eta_fits_a_column(seconds: int, shown: str) -> None:
    assert human_duration(seconds) == shown


def test_a_failing_progress_endpoint_never_fails_training(tmp_path: Path, config_writer: Callable[..., Path]) -> None:
    progress = {"type": "kubernetes", "group": "g", "version": "v", "plural": "p", "namespace": "n", "name": "x"}
    cfg = load_config(
        config_writer(spec=tiny_spec(), model=tmp_path, training_data=tmp_path, output=tmp_path, progress=progress)
    )
    reporter = ProgressReporter.from_config(cfg, rank=0, service_account_dir=tmp_path, api_server="http://127.0.0.1:9")
    reporter.report(step=1, train_loss=1.0)
    reporter.close()
    assert reporter.patches_failed >= 1 and reporter.patches_sent == 0


def test_failure_writes_a_one_line_reason_and_exits_nonzero(make_job: Callable[..., Job], tmp_path: Path) -> None:
    job = make_job(tiny_spec(batch={"global_batch_size": 1000}), name="too-big")
    log = tmp_path / "termination-log"
    result = run_entrypoint(job, extra_env={"KUBETUNE_TERMINATION_LOG": str(log)})
    assert result.returncode == 1
    reason = log.read_text()
    assert reason.count("\n") == 1
    assert "fewer than batch.global_batch_size 1000" in reason


def test_mlflow_file_store_receives_params_and_metrics(
    make_job: Callable[..., Job], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    # MLflow 3 keeps the file store only behind this opt-in (a database backend is its default).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    store = tmp_path / "mlruns"
    job = make_job(
        tiny_spec(
            schedule={"max_steps": 2},
            integrations={
                "mlflow": {"tracking_uri": store.as_uri(), "experiment_name": "kubetune-test", "token_secret": None},
                "wandb": None,
            },
        ),
        name="mlflow-job",
    )
    assert run_in_process(job) == 0
    client = mlflow.MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("kubetune-test")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "test-job"  # metadata.name
    assert run.data.params["training.lora.rank"] == "8"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2]
    assert "val_loss" in run.data.metrics


def test_wandb_offline_run_receives_params_and_metrics(
    make_job: Callable[..., Job], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Offline mode is W&B's own local store (no server here); the client is the real one.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    integrations = {"mlflow": None, "wandb": {"project": "kubetune-test", "entity": None, "api_key_secret": None}}
    job = make_job(tiny_spec(schedule={"max_steps": 2}, integrations=integrations), name="wandb-job")
    assert run_in_process(job) == 0
    (log,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    # The run log is W&B's protobuf record stream; keys are stored as plain strings.
    content = log.read_bytes()
    assert b"val_loss" in content and b"tokens_per_second" in content and b"training.lora.rank" in content


def test_flush_denormals_reaches_the_worker_threads() -> None:
    """After flush_denormals, a subnormal multiplies to zero on the main thread and in a
    parallel kernel (the OpenMP workers copy the flag when they start); without it, not."""
    import subprocess
    import sys

    probe = (
        "import sys, torch\n"
        "from kubetune_trainer.common.numerics import flush_denormals\n"
        "if sys.argv[1] == 'flush':\n"
        "    assert flush_denormals(), 'this CPU cannot flush subnormals'\n"
        "torch.set_num_threads(2)\n"
        "one = (torch.tensor([1e-39]) * 1.0).item()\n"
        "many = (torch.full((1 << 20,), 1e-39) * 1.0).count_nonzero().item()\n"
        "print(one, many)\n"
    )
    outputs = {}
    for mode in ("flush", "keep"):
        done = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True)
        outputs[mode] = done.stdout.split()
    assert outputs["flush"] == ["0.0", "0"], outputs
    assert outputs["keep"][1] == str(1 << 20), outputs
