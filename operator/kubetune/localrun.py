"""`kubetune run`: the same manifest `kubectl apply` takes, trained on this machine.

Validate → resolve entities to local directories (an entity with `spec.source` and no
`localPath` is fetched into a local cache, once) → render the config the operator would
mount (same function) → run the trainer entrypoint the image runs, as one process or
under torchrun → show progress from the trainer's metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

from kubetune.api.backends import Backend
from kubetune.api.resources import JOB_RESOURCES, job_backend
from kubetune.controller.builders import total_gpus
from kubetune.controller.references import EntityRecord, JobSpec, resolve_references
from kubetune.render import NO_PROGRESS, TrainerPaths, dumps_config, render_trainer_config
from kubetune.validation import ParsedResource, validate_paths
from kubetune_api import constants as c
from kubetune_api.common import ResumeFrom
from kubetune_api.entities import FilesetSource, ModelSource

REPO_TRAINERS = Path(__file__).resolve().parents[2] / "trainer-images"
# The folder holding kubetune_api, the models the trainer parses its config with.
REPO_API = Path(__file__).resolve().parents[1]
LOCAL_NAMESPACE = "default"


class RunError(Exception):
    """Something that keeps the job from running here; the message says the fix."""


@dataclass(frozen=True)
class SourceFetch:
    """An entity whose files `kubetune run` downloads from its spec.source before training."""

    entity: str  # Kind/namespace/name, for messages
    source: ModelSource | FilesetSource
    root: Path  # the source's folder in the cache; the files land in root/version_name(source)

    @property
    def path(self) -> Path:
        from kubetune_fetch.layout import version_name

        return self.root / version_name(self.source)

    @property
    def origin(self) -> str:
        if self.source.huggingface is not None:
            hf = self.source.huggingface
            return f"Hugging Face {hf.repoType} {hf.repo}@{hf.revision}"
        assert self.source.s3 is not None
        return f"s3://{self.source.s3.bucket}/{self.source.s3.prefix}"


@dataclass(frozen=True)
class LocalPlan:
    job: ParsedResource
    config: dict[str, Any]
    output: Path
    command: list[str]
    env: dict[str, str]
    fetches: tuple[SourceFetch, ...] = ()


def sources_cache() -> Path:
    """Where `kubetune run` keeps fetched sources: shared by every run and every manifest,
    so a model named by ten jobs is downloaded once."""
    base = os.environ.get("KUBETUNE_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubetune"
    )
    return Path(base) / "sources"


def _local_lookup(resources: Sequence[ParsedResource], fetches: dict[str, SourceFetch]) -> Any:
    entities: dict[tuple[str, str, str], ParsedResource] = {}
    for res in resources:
        if not res.resource.is_job:
            entities[(res.kind, res.namespace or LOCAL_NAMESPACE, res.name)] = res

    def lookup(kind: str, namespace: str, name: str) -> EntityRecord | None:
        res = entities.get((kind, namespace, name))
        if res is None:
            return None
        spec = res.spec.model_dump(mode="json", exclude_none=True)
        local = (spec.get("storage") or {}).get("localPath")
        # Local runs share everything: consent is a cluster matter.
        spec["sharedWith"] = ["*"]
        problem: tuple[str, str] | None = None
        source = getattr(res.spec, "source", None)
        if not local and source is not None:
            # No files on this machine, but a place to fetch them from: the cache directory is
            # known without the network (the dry run shows it); execute() fetches it.
            # Imported here: a manifest whose files are all local runs without kubetune_fetch.
            from kubetune_fetch.layout import cache_root

            fetch = SourceFetch(f"{kind}/{namespace}/{name}", source, cache_root(sources_cache(), source))
            fetches[fetch.entity] = fetch
            spec["storage"]["localPath"] = str(fetch.path)
        elif not local:
            problem = (
                "NoLocalPath",
                f"it has no spec.storage.localPath and no spec.source (set one of them in {res.source})",
            )
        else:
            path = Path(local) if Path(local).is_absolute() else (Path(res.source).parent / local).resolve()
            spec["storage"]["localPath"] = str(path)
            if not path.exists():
                problem = ("LocalPathMissing", f"spec.storage.localPath {path} does not exist (from {res.source})")
        return EntityRecord.judged(kind, namespace, name, spec, problem)

    return lookup


def _pick_job(resources: Sequence[ParsedResource], name: str | None) -> ParsedResource:
    jobs = [r for r in resources if r.resource.is_job]
    if name:
        jobs = [r for r in jobs if r.name == name]
    if len(jobs) != 1:
        found = ", ".join(f"{r.kind}/{r.name}" for r in jobs) or "none"
        kinds = " or ".join(r.kind for r in JOB_RESOURCES)
        raise RunError(f"expected exactly one {kinds}, found {found}: pass --job NAME")
    return jobs[0]


def _trainer_python(kind: str, backend: Backend[Any], explicit: str | None) -> str:
    env_name = backend.local_python_env
    python = explicit or os.environ.get(env_name) or sys.executable
    needed = list(backend.local_imports)
    probe = "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in sys.argv[1:]) else 3)"
    if subprocess.run([python, "-c", probe, *needed], capture_output=True).returncode != 0:
        raise RunError(
            f"{python} cannot import {', '.join(needed)}, which the {kind} trainer needs. Point {env_name} (or "
            f"--python) at an environment that has them, e.g. `bash hack/run-in-venv.sh {backend.local_venv} kubetune "
            f"run ...` from the repository, or pip install -r {backend.requirements}"
        )
    return python


def _visible_gpus(python: str) -> int:
    probe = "import torch; print(torch.cuda.device_count())"
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    return int(result.stdout.strip() or 0) if result.returncode == 0 else 0


def local_resume_point(checkpoints: Path, wanted: ResumeFrom, backend: Backend[Any]) -> Path:
    """spec.resume_from under `kubetune run`: the other job's run directory beside this
    one's (`runs/<job>` by default), its step or newest complete checkpoint there."""
    complete = {
        step: path
        for path in (sorted(checkpoints.iterdir()) if checkpoints.is_dir() else [])
        if (step := backend.checkpoint_step(path.name)) is not None and (path / c.CHECKPOINT_STATE_FILE).exists()
    }
    step = wanted.step if wanted.step is not None else max(complete, default=None)
    if step is None or step not in complete:
        have = ", ".join(map(str, sorted(complete))) or "none"
        raise RunError(
            f"spec.resume_from: no complete checkpoint at {f'step {step}' if step is not None else 'any step'} in "
            f"{checkpoints} (steps there: {have}); run {wanted.job} with the same --output parent first, or name a "
            "step it kept"
        )
    return complete[step]


def plan_local_run(
    files: Sequence[str],
    *,
    job_name: str | None = None,
    output: str | None = None,
    python: str | None = None,
    cpu_processes: int | None = None,
    check_environment: bool = True,
) -> LocalPlan:
    resources, problems, _ = validate_paths(files)
    if problems:
        raise RunError("\n".join(str(p) for p in problems))
    job = _pick_job(resources, job_name)
    spec = cast(JobSpec, job.spec)
    fetches: dict[str, SourceFetch] = {}
    resolution = resolve_references(spec, job.namespace or LOCAL_NAMESPACE, _local_lookup(resources, fetches))
    if resolution.problems:
        hint = (
            "\n  give the manifests of the Model and Fileset entities with -f, each with spec.storage.localPath "
            "or spec.source"
        )
        raise RunError(
            "\n".join(f"{job.source}: {job.kind}/{job.name}: {p.message}" for p in resolution.problems) + hint
        )

    out = Path(output or Path("runs") / job.name).resolve()

    def local(role: str) -> str | None:
        record = resolution.entities.get(role)
        return str(record.spec["storage"]["localPath"]) if record else None

    backend = job_backend(job.resource)
    resume = None
    if spec.resume_from is not None:
        resume = str(local_resume_point(out.parent / spec.resume_from.job / "checkpoints", spec.resume_from, backend))
    paths = TrainerPaths(
        model=cast(str, local("model")),
        training_data=cast(str, local("training_data")),
        output=str(out),
        teacher_model=local("teacher_model"),
        validation_data=local("validation_data"),
        resume_from=resume,
    )
    config = render_trainer_config(
        job.resource,
        name=job.name,
        namespace=job.namespace or LOCAL_NAMESPACE,
        uid="local",
        spec=spec,
        paths=paths,
        progress=NO_PROGRESS,
    )
    module = backend.trainer_module
    interpreter = _trainer_python(job.kind, backend, python) if check_environment else (python or sys.executable)
    config_path = out / "config.json"
    gpus = total_gpus(spec)
    processes = cpu_processes or 1
    # Several GPUs on one machine mean torchrun, as in the PyTorchJob; a backend that is
    # never distributed sees its GPUs from one process.
    if cpu_processes is None and backend.distributed and gpus > 1:
        visible = _visible_gpus(interpreter) if check_environment else 0
        if visible < gpus:
            raise RunError(
                f"{job.kind}/{job.name} asks for {gpus} GPUs (spec.parallelism) and this machine has {visible}: "
                f"run it with --cpu-processes {gpus} to train with {gpus} CPU processes (gloo) instead, or submit "
                "it to a cluster"
            )
        processes = gpus
    if processes > 1:
        command = [
            interpreter,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            "-m",
            module,
            "--config",
            str(config_path),
        ]
    else:
        command = [interpreter, "-m", module, "--config", str(config_path)]
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        c.ENV_TERMINATION_LOG: str(out / "termination-log"),
        "PYTHONUNBUFFERED": "1",
    }
    if (REPO_TRAINERS / "kubetune_trainer").is_dir():
        # A checkout: the trainer package and kubetune_api come from it, as the images copy them.
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO_TRAINERS), str(REPO_API), os.environ.get("PYTHONPATH")])
        )
    # Only the entities this job names (a manifest may hold others).
    used = {f"{r.kind}/{r.namespace}/{r.name}" for r in resolution.entities.values()}
    return LocalPlan(job, config, out, command, env, tuple(f for k, f in sorted(fetches.items()) if k in used))


def fetch_sources(plan: LocalPlan, stream: TextIO = sys.stdout) -> None:
    """Download what the plan's entities name in spec.source into the cache (a no-op for
    what is there already). Credentials come from the environment: HF_TOKEN or the token of
    `hf auth login`, the AWS_* variables or ~/.aws (Secrets are a cluster matter)."""
    if not plan.fetches:
        return
    try:
        from kubetune_fetch import FetchError, Progress, fetch_source
    except ImportError as err:  # pragma: no cover - the dev environment has them
        raise RunError(
            f"fetching spec.source needs huggingface_hub and boto3 ({err}): pip install 'kubetune[fetch]' "
            "(or -r requirements/fetch.txt), or set spec.storage.localPath to files already here"
        ) from err
    for fetch in plan.fetches:
        line = ProgressLine(stream)
        last = [0.0]

        def report(p: Progress, line: ProgressLine = line, last: list[float] = last) -> None:
            now = time.monotonic()
            if now - last[0] > 1 or p.files_done == p.files_total:
                last[0] = now
                line._print(f"  {p.summary}", newline=not line.tty)

        print(f"kubetune run: {fetch.entity}: {fetch.origin} → {fetch.path}", file=stream)
        try:
            result = fetch_source(fetch.source, fetch.root, progress=report)
        except FetchError as err:
            raise RunError(f"{fetch.entity}: cannot fetch spec.source: {err}") from err
        line.finish()
        if not result.downloaded:
            print(f"  already here (fetched {result.marker.completed_at})", file=stream)


def _read_new_metrics(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    if not path.exists():
        return [], offset
    with path.open() as f:
        f.seek(offset)
        chunk = f.read()
    complete, _, _ = chunk.rpartition("\n")
    rows = []
    for line in complete.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows, offset + len(complete) + (1 if complete else 0)


class ProgressLine:
    """A bar and the live loss on one terminal line (plain lines when not a terminal)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last_printed = 0.0

    def update(self, row: Mapping[str, Any]) -> None:
        step, total = row.get("step"), row.get("max_steps")
        if "val_loss" in row:
            self._print(f"step {step}: validation loss {row['val_loss']:.4f}", newline=True)
            return
        if "loss" not in row:
            return
        bar = ""
        if isinstance(total, int) and total > 0 and isinstance(step, int):
            done = int(30 * min(step, total) / total)
            bar = f"[{'#' * done}{'.' * (30 - done)}] {step}/{total} "
        else:
            bar = f"step {step} "
        speed = f" {row['tokens_per_second']:.0f} tok/s" if row.get("tokens_per_second") else ""
        text = f"{bar}loss {row['loss']:.4f} lr {row.get('lr', 0):.2e}{speed}"
        now = time.monotonic()
        if self.tty or now - self.last_printed > 5 or step == total:
            self._print(text, newline=not self.tty)
            self.last_printed = now

    def _print(self, text: str, newline: bool) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if newline else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")


def plot_loss(metrics: Path, png: Path) -> bool:
    """loss.png beside the output; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train: list[tuple[float, float]] = []
    val: list[tuple[float, float]] = []
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            train.append((row["step"], row["loss"]))
        if "val_loss" in row:
            val.append((row["step"], row["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


def execute(plan: LocalPlan, stream: TextIO = sys.stdout) -> int:
    try:
        fetch_sources(plan, stream)
    except RunError as err:
        print(f"kubetune run: {err}", file=stream)
        return 1
    plan.output.mkdir(parents=True, exist_ok=True)
    (plan.output / "config.json").write_text(dumps_config(plan.config))
    termination = plan.output / "termination-log"
    termination.unlink(missing_ok=True)
    metrics = plan.output / "metrics.jsonl"
    offset = metrics.stat().st_size if metrics.exists() else 0
    log_path = plan.output / "trainer.log"
    print(f"kubetune run: {plan.job.kind}/{plan.job.name} → {plan.output} (trainer log: {log_path})", file=stream)
    started = time.monotonic()
    progress = ProgressLine(stream)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(plan.command, env={**os.environ, **plan.env}, stdout=log, stderr=subprocess.STDOUT)
        # Stopping `kubetune run` stops the trainer too (which checkpoints on SIGTERM), never orphans it.
        previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        try:
            while proc.poll() is None:
                rows, offset = _read_new_metrics(metrics, offset)
                for row in rows:
                    progress.update(row)
                time.sleep(0.5)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
    rows, offset = _read_new_metrics(metrics, offset)
    for row in rows:
        progress.update(row)
    progress.finish()
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        reason = termination.read_text().strip() if termination.exists() else "no reason given"
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        print(f"kubetune run: the trainer failed (exit {proc.returncode}): {reason}", file=stream)
        print("  last lines of " + str(log_path) + ":\n    " + "\n    ".join(tail), file=stream)
        return proc.returncode or 1
    if metrics.exists() and plot_loss(metrics, plan.output / "loss.png"):
        print(f"loss curve: {plan.output / 'loss.png'}", file=stream)
    result = plan.output / "result.json"
    where = json.loads(result.read_text()).get("output_dir") if result.exists() else str(plan.output)
    print(f"done in {elapsed:.0f}s; output: {where}; metrics: {metrics}", file=stream)
    return 0


def describe(plan: LocalPlan) -> str:
    fetches = "".join(f"fetch: {f.entity}: {f.origin} → {f.path}\n" for f in plan.fetches)
    return dumps_config(plan.config) + "command: " + shlex.join(plan.command) + "\n" + fetches
