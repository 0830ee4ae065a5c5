"""The `kubetune` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from kubetune import __version__
from kubetune.api.resources import AUTOMODEL, UNSLOTH
from kubetune.crdgen import dumps_json, json_schema, write_crds
from kubetune.validation import validate_paths

BACKENDS = {"automodel": AUTOMODEL, "unsloth": UNSLOTH}


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
    for path in write_crds(Path(args.root)):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune", description="LLM fine-tuning jobs as Kubernetes resources (AutomodelJob, UnslothJob)."
    )
    parser.add_argument("--version", action="version", version=f"kubetune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate manifests offline, as the API server would")
    p.add_argument("-f", "--file", action="append", required=True, metavar="PATH", help="file, folder or - (stdin)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the live JSON schema of a backend's spec, defaults included")
    p.add_argument("backend", choices=sorted(BACKENDS))
    p.add_argument("--output", "-o", choices=("json", "yaml"), default="yaml")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("crds", help="write crds/*.yaml and helm/kubetune/crds/*.yaml from the models")
    p.add_argument("--root", default=".", help="repository root (default: .)")
    p.set_defaults(func=cmd_crds)

    _add_late_commands(sub)
    return parser


def _add_late_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Commands whose modules pull in heavier imports register here, imported only when run."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
