"""Offline validation of kubetune manifests: the checks the API server makes,
with messages that name the file, document, resource and full field path."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kubetune.api.resources import BY_KIND, JOB_RESOURCES, Resource, spec_backend
from kubetune.memory import memory_risk
from kubetune_api import constants as c
from kubetune_api.common import nested_model

NAME_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
TOP_LEVEL_KEYS = {"apiVersion", "kind", "metadata", "spec", "status"}


class ManifestLoader(yaml.SafeLoader):
    """YAML 1.1 reads `5e-6` as a string; Kubernetes (YAML 1.2 rules) reads a number.
    Resolve floats the 1.2 way so that the CLI and kubectl agree."""


ManifestLoader.add_implicit_resolver(  # type: ignore[no-untyped-call]
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


@dataclass(frozen=True)
class Document:
    source: str
    index: int
    body: Any


@dataclass(frozen=True)
class Problem:
    source: str
    index: int
    resource: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.index} {self.resource}: {self.path}: {self.message}"


@dataclass
class ParsedResource:
    """A kubetune object that passed validation, with its spec as the typed model."""

    kind: str
    name: str
    namespace: str | None
    spec: BaseModel
    body: dict[str, Any]
    source: str = ""
    index: int = 0
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def resource(self) -> Resource:
        return BY_KIND[self.kind]


def _manifest_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    return [path]


def load_documents(paths: Iterable[str]) -> tuple[list[Document], list[Problem]]:
    """Read files, folders (recursively, *.yaml / *.yml) or `-` (stdin)."""
    documents: list[Document] = []
    problems: list[Problem] = []
    for raw in paths:
        if raw == "-":
            sources: list[tuple[str, str | None]] = [("<stdin>", sys.stdin.read())]
        else:
            path = Path(raw)
            if not path.exists():
                problems.append(Problem(raw, 0, "-", "(file)", "no such file or folder"))
                continue
            sources = [(str(p), None) for p in _manifest_files(path)]
        for name, text in sources:
            try:
                if text is None:
                    text = Path(name).read_text()
                loaded = list(yaml.load_all(text, Loader=ManifestLoader))
            except (OSError, UnicodeDecodeError) as err:
                problems.append(Problem(name, 0, "-", "(file)", f"cannot read: {err}"))
                continue
            except yaml.YAMLError as err:
                problems.append(Problem(name, 0, "-", "(file)", f"not valid YAML: {err}".replace("\n", " ")))
                continue
            documents.extend(Document(name, i, body) for i, body in enumerate(loaded) if body is not None)
    return documents, problems


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    out = "spec"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _belongs_to_other_backend(kind: str, loc: tuple[int | str, ...]) -> str | None:
    for other in JOB_RESOURCES:
        if other.kind == kind:
            continue
        model: Any = other.spec_model
        for part in loc:
            if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
                model = None
                break
            annotation = model.model_fields[str(part)].annotation
            model = nested_model(annotation) or annotation
        if model is not None:
            return other.kind
    return None


def _pydantic_problems(doc: Document, resource: str, kind: str, err: ValidationError) -> list[Problem]:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        ctx = e.get("ctx") or {}
        if e["type"] == "cross_field":
            for path, message in ctx["problems"]:
                problems.append(Problem(doc.source, doc.index, resource, path, message))
            continue
        if e["type"] == "extra_forbidden":
            other = _belongs_to_other_backend(kind, loc)
            message = "unknown field" + (
                f": it belongs to {other}, not {kind}" if other else " (check its spelling with `kubetune schema`)"
            )
        elif e["type"] == "missing":
            message = "required field is missing"
        elif e["type"].endswith("_type") or e["type"] in ("literal_error", "enum"):
            got = e.get("input")
            message = f"{e['msg']} (got {type(got).__name__} {got!r})"
        else:
            message = e["msg"]
        problems.append(Problem(doc.source, doc.index, resource, _loc_to_path(loc), message))
    return problems


def parse_document(doc: Document) -> tuple[ParsedResource | None, list[Problem]]:
    """Validate one document. Non-kubetune documents (a PVC, say) return (None, [])."""
    body = doc.body
    if not isinstance(body, dict):
        return None, [Problem(doc.source, doc.index, "-", "(document)", "not a mapping (a Kubernetes object)")]
    api_version = body.get("apiVersion")
    kind = body.get("kind")
    metadata: dict[str, Any] = body["metadata"] if isinstance(body.get("metadata"), dict) else {}
    name = metadata.get("name") if isinstance(metadata.get("name"), str) else "<no name>"
    resource = f"{kind}/{name}"
    if not isinstance(api_version, str) or not api_version.startswith(f"{c.GROUP}/"):
        return None, []
    problems: list[Problem] = []

    def add(path: str, message: str) -> None:
        problems.append(Problem(doc.source, doc.index, resource, path, message))

    if api_version != c.API_VERSION:
        add("apiVersion", f"unsupported version {api_version!r}: use {c.API_VERSION}")
    if kind not in BY_KIND:
        add("kind", f"unknown kind {kind!r}: one of {', '.join(BY_KIND)}")
        return None, problems
    if not isinstance(metadata.get("name"), str) or not NAME_PATTERN.match(metadata["name"]):
        add("metadata.name", "required: a DNS-1123 label (lowercase letters, digits, '-')")
    for key in sorted(set(body) - TOP_LEVEL_KEYS):
        add(key, "unknown top-level field")
    if "spec" not in body:
        add("spec", "required field is missing")
        return None, problems
    model = BY_KIND[kind].spec_model
    try:
        spec = model.model_validate(body["spec"])
    except ValidationError as err:
        problems.extend(_pydantic_problems(doc, resource, kind, err))
        return None, problems
    if problems:
        return None, problems
    labels = metadata.get("labels") or {}
    return (
        ParsedResource(
            kind=kind,
            name=metadata["name"],
            namespace=metadata.get("namespace"),
            spec=spec,
            body=body,
            source=doc.source,
            index=doc.index,
            labels=dict(labels) if isinstance(labels, dict) else {},
        ),
        [],
    )


def validate_paths(paths: Iterable[str]) -> tuple[list[ParsedResource], list[Problem], int]:
    """Returns (valid kubetune resources, problems, number of non-kubetune documents skipped)."""
    documents, problems = load_documents(paths)
    parsed: list[ParsedResource] = []
    skipped = 0
    for doc in documents:
        resource, doc_problems = parse_document(doc)
        problems.extend(doc_problems)
        if resource is not None:
            parsed.append(resource)
        elif not doc_problems:
            skipped += 1
    return parsed, problems, skipped


def memory_warnings(parsed: Iterable[ParsedResource], gb_per_gpu: float | None) -> list[str]:
    """The memory pre-flight check for the jobs among `parsed` whose Model is among them
    too (the same name, in the same namespace or the reference's workspace): one line per
    job below the seed's GPU memory guideline, naming the file, the job and the row."""
    parsed = list(parsed)
    models = {(r.namespace, r.name): r for r in parsed if r.kind == c.KIND_MODEL}
    warnings = []
    for job in parsed:
        if job.kind not in {r.kind for r in JOB_RESOURCES}:
            continue
        backend = spec_backend(job.spec)
        ref = next((r for r in backend.references(job.spec) if r.role == "model"), None)
        if ref is None:
            continue
        workspace, _, name = ref.value.rpartition("/")
        model = models.get((workspace or job.namespace, name))
        parameters = getattr(model.spec, "parameters", None) if model is not None else None
        why = memory_risk(parameters, backend.memory_method(job.spec), backend.total_gpus(job.spec), gb_per_gpu)
        if why is not None:
            warnings.append(f"{job.source}:{job.index} {job.kind}/{job.name}: warning: MemoryRisk: {why}")
    return warnings


def iter_problem_lines(problems: Iterable[Problem]) -> Iterator[str]:
    for problem in problems:
        yield str(problem)
