"""The `kubetune` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from kubetune import __version__
from kubetune.api.resources import BACKENDS as JOB_BACKENDS
from kubetune.api.resources import JOB_RESOURCES, job_backend
from kubetune.crdgen import dumps_json, json_schema, write_generated
from kubetune.validation import memory_warnings, validate_paths

BACKENDS = {job_backend(r).name: r for r in JOB_RESOURCES}
JOB_KINDS = ", ".join(r.kind for r in JOB_RESOURCES)


def cmd_validate(args: argparse.Namespace) -> int:
    parsed, problems, skipped = validate_paths(args.file)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s); {len(parsed)} valid kubetune resource(s)", file=sys.stderr)
        return 1
    if not parsed:
        print("no kubetune resources found (apiVersion kubetune.io/v1alpha1)", file=sys.stderr)
        return 1
    # Warnings, not problems: the exit status stays 0 (the guideline is conservative).
    for warning in memory_warnings(parsed, args.gpu_memory_gb or None):
        print(warning, file=sys.stderr)
    note = f", {skipped} other document(s) skipped" if skipped else ""
    print(f"{len(parsed)} kubetune resource(s) valid{note}", file=sys.stderr)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    schema = json_schema(BACKENDS[args.backend])
    if args.output == "json":
        print(dumps_json(schema))
    else:
        print(yaml.safe_dump(schema, sort_keys=False, width=120, allow_unicode=True), end="")
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    for path in write_generated(Path(args.root)):
        print(path)
    return 0


# kopf workers (objects handled at once) per watched kind: see --worker-limit and bench/README.md.
DEFAULT_WORKER_LIMIT = 0
# Job starts creating their objects at once: see --start-limit. Measured at 1,000 jobs over 100
# namespaces (bench/README.md, "Start limit"): 8 starved the client, 32 matched no limit's throughput
# with 38 % less peak memory and a lower median latency than no limit.
DEFAULT_START_LIMIT = 32


def _limit(text: str) -> int:
    """--worker-limit's and --start-limit's value: a whole number, 0 (no limit) or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number, 0 (no limit) or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune", description=f"LLM fine-tuning jobs as Kubernetes resources ({JOB_KINDS})."
    )
    parser.add_argument("--version", action="version", version=f"kubetune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate manifests offline, as the API server would")
    p.add_argument("-f", "--file", action="append", required=True, metavar="PATH", help="file, folder or - (stdin)")
    p.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=0.0,
        help="GB per GPU where the jobs will run (80 for an 80 GB H100), for the memory pre-flight check of jobs "
        "whose Model (with spec.parameters) is among the files; 0: only the GPU count is checked",
    )
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the live JSON schema of a backend's spec, defaults included")
    p.add_argument("backend", choices=sorted(BACKENDS))
    p.add_argument("--output", "-o", choices=("json", "yaml"), default="yaml")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser(
        "crds", help="write crds/*.yaml, helm/kubetune/crds/*.yaml and the chart's generated files/ from the models"
    )
    p.add_argument("--root", default=".", help="repository root (default: .)")
    p.set_defaults(func=cmd_crds)

    _add_late_commands(sub)
    return parser


def ensure_identity() -> None:
    """kopf names the operator's identity with getpass.getuser() unless POD_ID is set, and
    getuser() falls back to the passwd database: in an image run as a uid with no passwd
    entry (ours, 65532, like any distroless or `python:3.11-slim` image run non-root) and
    without USER/LOGNAME, that raised KeyError and the operator pod crashed at start."""
    import getpass

    try:
        getpass.getuser()
    except (KeyError, OSError):
        os.environ["USER"] = f"uid-{os.getuid()}"


def cmd_operator(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    # kopf and aiohttp load only for this command: validate/schema stay quick.
    from kubetune.controller.builders import InitializerSettings, OperatorSettings
    from kubetune.controller.handlers import Leadership, run_operator

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # kopf logs every handled event at INFO: at a thousand jobs that is most of the CPU.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # Flags replace the environment's list rather than add to it.
    given = args.namespace if args.namespace is not None else [os.environ.get("KUBETUNE_WATCH_NAMESPACES", "")]
    namespaces = [] if args.all_namespaces else [ns for item in given for ns in item.split(",") if ns]
    if not namespaces and not args.all_namespaces:
        print("kubetune operator: give --namespace NS (repeatable) or --all-namespaces", file=sys.stderr)
        return 2
    settings = OperatorSettings(
        trainer_images={b.name: getattr(args, f"{b.name}_image") for b in JOB_BACKENDS},
        image_pull_policy=args.image_pull_policy,
        output_claim=args.output_claim,
        gpu_memory_gb=args.gpu_memory_gb or None,
        initializer=InitializerSettings(
            image=args.initializer_image,
            image_pull_policy=args.image_pull_policy,
            hf_endpoint=args.hf_endpoint or None,
        ),
    )
    ensure_identity()
    leadership = (
        Leadership(
            args.leader_election_namespace or os.environ.get("POD_NAMESPACE") or "kubetune-system", args.lease_seconds
        )
        if args.leader_elect
        else None
    )
    asyncio.run(
        run_operator(
            settings,
            namespaces,
            args.health_port,
            resync_seconds=args.resync_seconds,
            worker_limit=args.worker_limit,
            start_limit=args.start_limit,
            leadership=leadership,
            metrics_port=args.metrics_port,
        )
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from kubetune.localrun import RunError, describe, execute, plan_local_run

    try:
        plan = plan_local_run(
            args.file,
            job_name=args.job,
            output=args.output,
            python=args.python,
            cpu_processes=args.cpu_processes,
            check_environment=not args.dry_run,
        )
    except RunError as err:
        print(f"kubetune run: {err}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(describe(plan), end="")
        return 0
    return execute(plan)


def _env_default(name: str, fallback: str) -> str:
    return os.environ.get(name) or fallback


def _add_late_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Commands whose modules pull in heavier imports register here and import them only when run."""
    from kubetune.controller.builders import OperatorSettings

    defaults = OperatorSettings()
    p = sub.add_parser("operator", help="run the operator (kopf, standalone, one replica)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        action="append",
        help="watch this namespace (repeatable, or comma-separated); needs only a namespaced Role "
        "(env KUBETUNE_WATCH_NAMESPACES when no flag is given)",
    )
    scope.add_argument("--all-namespaces", action="store_true", help="watch every namespace (needs a ClusterRole)")
    for resource in JOB_RESOURCES:
        backend = job_backend(resource)
        env = f"KUBETUNE_{backend.name.upper()}_IMAGE"
        p.add_argument(
            f"--{backend.name}-image",
            default=_env_default(env, backend.default_image),
            help=f"trainer image for {resource.kind}s (env {env})",
        )
    p.add_argument(
        "--initializer-image",
        default=_env_default("KUBETUNE_INITIALIZER_IMAGE", defaults.initializer.image),
        help="image of the Jobs that download an entity's spec.source into its claim (python -m kubetune_fetch; "
        "the operator's image carries it) (env KUBETUNE_INITIALIZER_IMAGE)",
    )
    p.add_argument(
        "--hf-endpoint",
        default=os.environ.get("HF_ENDPOINT", ""),
        help="Hugging Face Hub endpoint the initializer Jobs use, for a private hub or a mirror "
        "(env HF_ENDPOINT; default: huggingface.co)",
    )
    p.add_argument(
        "--image-pull-policy",
        default=_env_default("KUBETUNE_IMAGE_PULL_POLICY", "IfNotPresent"),
        choices=("Always", "IfNotPresent", "Never"),
    )
    p.add_argument(
        "--output-claim",
        default=_env_default("KUBETUNE_OUTPUT_CLAIM", defaults.output_claim),
        help="PersistentVolumeClaim (in each job's namespace) that receives outputs (env KUBETUNE_OUTPUT_CLAIM)",
    )
    p.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=_env_default("KUBETUNE_GPU_MEMORY_GB", "0"),  # a string: argparse converts it only if used
        help="GB per GPU on the cluster's nodes, as the card is sold (80 for an 80 GB H100), for the memory "
        "pre-flight check against the seed's guidelines (env KUBETUNE_GPU_MEMORY_GB; 0: unknown, only the GPU "
        "count is checked)",
    )
    # The port defaults come from the environment as strings, converted by argparse only
    # when the flag is absent: Kubernetes puts KUBETUNE_METRICS_PORT=tcp://10.96.0.5:8081 in
    # every pod of a namespace with a Service named kubetune-metrics (the chart's, for the
    # release "kubetune"), and int() of that at parser build crashed the operator pod even
    # with --metrics-port given. Now a bad value is an error only when it is the one used.
    p.add_argument(
        "--health-port",
        type=int,
        default=_env_default("KUBETUNE_HEALTH_PORT", "8080"),  # a string: argparse converts it only if used
        help="serve GET /healthz on this port; 0 turns it off",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=_env_default("KUBETUNE_METRICS_PORT", "8081"),  # a string: argparse converts it only if used
        help="serve Prometheus metrics at GET /metrics on this port (env KUBETUNE_METRICS_PORT); 0 turns it off",
    )
    p.add_argument("--verbose", action="store_true", help="log every handled event (kopf.objects at INFO)")
    p.add_argument(
        "--worker-limit",
        type=_limit,
        default=_env_default("KUBETUNE_WORKER_LIMIT", str(DEFAULT_WORKER_LIMIT)),  # a string: argparse converts it
        help="at most this many objects handled at once per watched kind (env KUBETUNE_WORKER_LIMIT; default 0: "
        "no limit). Without a limit a burst of 10,000 jobs put 10,000 passes in flight, whose requests timed "
        "out in the queue for connections and were retried; 128 let it complete. Not re-measured since a "
        "1,000-job burst in one namespace stopped being slow (bench/README.md, 'One namespace')",
    )
    p.add_argument(
        "--start-limit",
        type=_limit,
        default=_env_default("KUBETUNE_START_LIMIT", str(DEFAULT_START_LIMIT)),  # a string: argparse converts it
        help=f"at most this many new jobs creating their objects at once (env KUBETUNE_START_LIMIT; default "
        f"{DEFAULT_START_LIMIT}; 0: no limit). The others wait their turn, counted in "
        "kubetune_job_starts_waiting; running jobs' status passes never wait. Without it a burst of 10,000 "
        "jobs timed out in the queue for the client's 32 connections (bench/README.md, 'Scale curve')",
    )
    p.add_argument(
        "--resync-seconds",
        type=float,
        default=300.0,
        help="pass over every job this often with its child listed afresh, so a missed watch event "
        "never leaves a job behind (0: never; default 300)",
    )
    p.add_argument(
        "--leader-elect",
        action="store_true",
        help="work only while holding a Lease, so that several replicas are safe (one leads, the others wait)",
    )
    p.add_argument(
        "--leader-election-namespace",
        help="namespace of the Lease kubetune-operator (default: $POD_NAMESPACE, else kubetune-system)",
    )
    p.add_argument(
        "--lease-seconds",
        type=float,
        default=15.0,
        help="how long a silent leader keeps the Lease before another replica takes over (default 15)",
    )
    p.set_defaults(func=cmd_operator)

    p = sub.add_parser("run", help="train a job manifest on this machine, as its pod would")
    p.add_argument(
        "-f",
        "--file",
        action="append",
        required=True,
        metavar="PATH",
        help="the job and its Model/Fileset entities (files, folders or -)",
    )
    p.add_argument("--job", help="which job, when the files hold several")
    p.add_argument("--output", help="output directory (default: runs/<job name>)")
    p.add_argument("--dry-run", action="store_true", help="print the rendered config and the command; run nothing")
    p.add_argument(
        "--python",
        help="interpreter with the trainer's dependencies "
        f"(default: {' / '.join('$' + b.local_python_env for b in JOB_BACKENDS)}, else this one)",
    )
    p.add_argument(
        "--cpu-processes",
        type=int,
        metavar="N",
        help="train with N CPU processes under torchrun (gloo) instead of the job's GPUs",
    )
    p.set_defaults(func=cmd_run)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
