"""The three images, tested without a Docker engine (there is none here): their Dockerfiles
(pinned bases, a numeric non-root user, pinned pip installs, files that exist), exact pins in
every requirements file, the operator's pins resolving on PyPI, and the entrypoints printing
their help."""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _build_plan() -> dict[str, tuple[Path, Path]]:
    """name -> (Dockerfile, build context), exactly as `make images` (hack/images.sh) builds them."""
    plan = subprocess.run(["bash", "hack/images.sh", "--plan"], cwd=ROOT, capture_output=True, text=True, check=True)
    out = {}
    for line in plan.stdout.splitlines():
        ref, dockerfile, context = line.split()
        out[ref.rsplit("/", 1)[1].split(":")[0]] = (ROOT / dockerfile, (ROOT / context).resolve())
    return out


IMAGES = _build_plan()
REQUIREMENTS = [
    ROOT / "requirements" / "operator.txt",
    ROOT / "requirements" / "dev.txt",
    ROOT / "trainer-images" / "automodel" / "requirements.txt",
    ROOT / "trainer-images" / "unsloth" / "requirements.txt",
]
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(\[[\w,.-]+\])?==(?P<version>[\w.+!-]+)(\s*;.+)?$")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(path: Path) -> list[Stage]:
    """Instructions per stage, continuation lines joined, comments dropped, FROM's ARGs expanded."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, f"{path}: file ends inside a continued line"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "ARG" and not stages:
            arg, _, default = rest.partition("=")
            global_args[arg] = default.strip('"')
        elif keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--platform")]
            base = re.sub(
                r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args.get(m.group(1) or m.group(2), m.group(0)), words[0]
            )
            stage_name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=stage_name))
        else:
            assert stages, f"{path}: {keyword} before the first FROM"
            stages[-1].instructions.append((keyword, rest))
    assert stages, f"{path}: no FROM"
    return stages


def _dockerfile(image: str) -> Path:
    path = IMAGES[image][0]
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing; `make images` builds {image} from it"
    return path


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_dockerfile_bases_are_pinned_by_tag(image: str) -> None:
    path = _dockerfile(image)
    stages = parse_dockerfile(path)
    names: set[str] = set()
    for stage in stages:
        if stage.base in names:
            continue
        assert "$" not in stage.base, f"{path}: FROM {stage.base} has an ARG without a default"
        repo, _, digest = stage.base.partition("@")
        last = repo.rsplit("/", 1)[-1]
        tag = last.partition(":")[2]
        assert tag or digest, f"{path}: FROM {stage.base} is not pinned (add a version tag)"
        assert tag != "latest", f"{path}: FROM {stage.base} uses the moving `latest` tag"
        assert re.search(r"\d", tag or digest), f"{path}: FROM {stage.base}: tag {tag!r} names no version"
        if stage.name:
            names.add(stage.name)
    assert ":latest" not in path.read_text(), f"{path}: mentions a `latest` tag"


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_dockerfile_runs_as_numeric_non_root_user(image: str) -> None:
    path = _dockerfile(image)
    final = parse_dockerfile(path)[-1]
    users = [rest for keyword, rest in final.instructions if keyword == "USER"]
    assert users, f"{path}: the final stage sets no USER (it would run as root)"
    # Numeric, so the kubelet can enforce runAsNonRoot without reading /etc/passwd.
    match = re.fullmatch(r"(\d+)(:\d+)?", users[-1])
    assert match, f"{path}: USER {users[-1]} is not numeric (uid[:gid])"
    assert int(match.group(1)) != 0, f"{path}: USER is root"


@pytest.mark.parametrize("image", ["trainer-automodel", "trainer-unsloth"])
def test_trainer_image_user_is_the_uid_the_operator_runs_pods_as(image: str) -> None:
    """One trainer uid: the image's USER, its useradd and the pods' securityContext agree, so
    files an image prepared and files a pod writes have one owner."""
    from kubetune_api.constants import TRAINER_UID

    path = _dockerfile(image)
    final = parse_dockerfile(path)[-1]
    users = [rest for keyword, rest in final.instructions if keyword == "USER"]
    assert users[-1] == f"{TRAINER_UID}:{TRAINER_UID}", f"{path}: USER {users[-1]}, the operator runs {TRAINER_UID}"
    useradds = [rest for keyword, rest in final.instructions if keyword == "RUN" and "useradd" in rest]
    assert all(f"--uid {TRAINER_UID}" in rest for rest in useradds), f"{path}: useradd with another uid"


def _pip_install_args(command: str) -> list[list[str]]:
    """The arguments of each `pip install` in a RUN command (shell operators split commands)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in {"&&", "||", ";", "|", "&", ">", ">>", "<"}:
            commands.append([])
        else:
            commands[-1].append(token)
    out = []
    for words in commands:
        for i, word in enumerate(words):
            if (
                word == "pip"
                or word.endswith("/pip")
                or (word.startswith("python") and words[i + 1 : i + 3] == ["-m", "pip"])
            ):
                rest = words[i + 1 :] if "pip" in word else words[i + 3 :]
                if rest[:1] == ["install"]:
                    out.append(rest[1:])
                break
    return out


_OPTION_WITH_VALUE = {
    "-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-f", "--find-links",
    "-t", "--target", "--root", "--prefix", "--platform", "--python-version", "--only-binary", "--no-binary",
}  # fmt: skip


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_dockerfile_pip_installs_are_pinned(image: str) -> None:
    path = _dockerfile(image)
    for stage in parse_dockerfile(path):
        for keyword, rest in stage.instructions:
            if keyword != "RUN":
                continue
            for args in _pip_install_args(rest):
                skip = False
                for word in args:
                    if skip:
                        skip = False
                        continue
                    if word.startswith("-"):
                        skip = word in _OPTION_WITH_VALUE
                        continue
                    if "/" in word or word.startswith(".") or word.endswith(".whl"):
                        continue  # a local path: the project itself or a built wheel
                    assert PIN.match(word), f"{path}: `pip install {word}` is not pinned with =="


def test_operator_image_entrypoint_and_files() -> None:
    path = _dockerfile("kubetune-operator")
    final = parse_dockerfile(path)[-1]
    instructions = dict(final.instructions)
    assert json.loads(instructions["ENTRYPOINT"]) == ["kubetune"]
    assert json.loads(instructions["CMD"]) == ["operator"]
    assert "python:3.11" in final.base and "slim" in final.base
    # Every COPY from the build context names a file that exists and is not ignored.
    ignore = (path.parent / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for stage in parse_dockerfile(path):
        for keyword, rest in stage.instructions:
            if keyword != "COPY" or "--from=" in rest:
                continue
            *sources, _dest = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{path}: COPY {source}: no such file in the build context"
                assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), (
                    f"{path}: COPY {source} is excluded by operator/Dockerfile.dockerignore"
                )
    # The console script the ENTRYPOINT runs is the one pyproject.toml installs.
    assert re.search(r'^kubetune = "kubetune\.cli:main"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert callable(importlib.import_module("kubetune.cli").main)


@pytest.mark.parametrize("image", ["trainer-automodel", "trainer-unsloth"])
def test_trainer_dockerfile_copies_files_that_exist(image: str) -> None:
    path = _dockerfile(image)
    context = IMAGES[image][1]
    for stage in parse_dockerfile(path):
        for keyword, rest in stage.instructions:
            if keyword not in {"COPY", "ADD"} or "--from=" in rest:
                continue
            words = [w for w in rest.split() if not w.startswith("--")]
            if words[0].startswith("["):
                words = json.loads(rest[rest.index("[") :])
            for source in words[:-1]:
                assert list(context.glob(source)), f"{path}: COPY {source}: not in the build context {context}"


@pytest.mark.parametrize("requirements", REQUIREMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_requirements_are_exact_pins(requirements: Path) -> None:
    seen: set[str] = set()
    for number, raw in enumerate(requirements.read_text().splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"{requirements.relative_to(ROOT)}:{number}: `{line}` is not an exact pin (name==version)"
        name = re.sub(r"[-_.]+", "-", match.group("name")).lower()
        assert name not in seen, f"{requirements.relative_to(ROOT)}:{number}: {name} is pinned twice"
        seen.add(name)


def _pip_dry_run(*args: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        cwd=ROOT,
    )
    assert result.returncode == 0, f"pip could not resolve {' '.join(args)}:\n{result.stderr[-4000:]}"
    report: dict[str, object] = json.loads(result.stdout)
    return report


def _pins(requirements: Path) -> dict[str, str]:
    pins = {}
    for raw in requirements.read_text().splitlines():
        match = PIN.match(raw.split(" #", 1)[0].strip())
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group("name")).lower()] = match.group("version")
    return pins


def test_operator_requirements_resolve_on_pypi() -> None:
    """What the operator image installs (its own pins and the initializer's, requirements/fetch.txt),
    resolved together with dependencies, for this Python (3.11, the image's): every pin exists
    and they agree with each other."""
    files = [ROOT / "requirements" / "operator.txt", ROOT / "requirements" / "fetch.txt"]
    report = _pip_dry_run(*(arg for path in files for arg in ("-r", str(path))))
    installs = report["install"]
    assert isinstance(installs, list)
    resolved = {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(): i["metadata"]["version"] for i in installs}
    for requirements in files:
        for name, version in _pins(requirements).items():
            assert resolved.get(name) == version, f"{name}=={version} resolved as {resolved.get(name)}"
    assert "torch" not in resolved, "the operator image must stay free of torch"


@pytest.mark.parametrize(
    "requirements",
    [
        ROOT / "trainer-images" / "automodel" / "requirements.txt",
        ROOT / "trainer-images" / "unsloth" / "requirements.txt",
    ],
    ids=["automodel", "unsloth"],
)
def test_trainer_requirements_exist_on_pypi(requirements: Path) -> None:
    """Each pin exists for this Python and platform (3.11 on Linux x86_64, as in the images),
    checked one by one without resolving: the unsloth file is already a full resolved set."""
    report = _pip_dry_run("--no-deps", "-r", str(requirements))
    installs = report["install"]
    assert isinstance(installs, list)
    assert len(installs) == len(_pins(requirements))


def kubetune(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "operator")}
    return subprocess.run([sys.executable, "-m", "kubetune", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_operator_entrypoint_prints_help() -> None:
    """The image runs `kubetune operator`; its help names every flag the chart passes."""
    result = kubetune("operator", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: kubetune operator" in result.stdout
    for flag in (
        "--namespace", "--all-namespaces", "--automodel-image", "--unsloth-image",
        "--image-pull-policy", "--output-claim", "--health-port",
    ):  # fmt: skip
        assert flag in result.stdout, f"`kubetune operator --help` does not mention {flag}"
    version = kubetune("--version")
    assert version.stdout.strip() == f"kubetune {(ROOT / 'VERSION').read_text().strip()}"


TRAINER_VENVS = {
    "trainer-automodel": ("test", "kubetune_trainer.automodel"),
    "trainer-unsloth": ("unsloth", "kubetune_trainer.unsloth"),
}


@pytest.mark.parametrize("image", sorted(TRAINER_VENVS))
def test_trainer_image_runs_the_operators_command(image: str) -> None:
    """The operator runs `python -m kubetune_trainer.<backend> --config ...` in the trainer image
    (its own command, not the image's ENTRYPOINT): the package must be importable from any
    working directory, and the module must start (its help, in the image's pinned environment)."""
    venv, module = TRAINER_VENVS[image]
    path = _dockerfile(image)
    final = parse_dockerfile(path)[-1]
    env_text = " ".join(rest for keyword, rest in final.instructions if keyword == "ENV")
    pythonpath = re.search(r"PYTHONPATH=(\S+)", env_text)
    copies = [rest.split() for keyword, rest in final.instructions if keyword == "COPY" and "kubetune_trainer" in rest]
    installed = any(
        "pip" in rest and "install" in rest and "kubetune_trainer" in rest for k, rest in final.instructions
    )
    assert pythonpath or installed, f"{path}: sets no PYTHONPATH and installs no kubetune_trainer"
    if pythonpath and not installed:
        roots = pythonpath.group(1).split(":")
        assert any(words[-1].rstrip("/") in {f"{r.rstrip('/')}/kubetune_trainer" for r in roots} for words in copies), (
            f"{path}: kubetune_trainer is not copied into a PYTHONPATH directory ({roots})"
        )
    entrypoint = dict(final.instructions).get("ENTRYPOINT")
    if entrypoint:
        assert json.loads(entrypoint)[:3] == ["python", "-m", module], f"{path}: ENTRYPOINT is not python -m {module}"
    result = subprocess.run(
        ["bash", "hack/run-in-venv.sh", venv, "python", "-m", module, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--config" in result.stdout


def _first_party_imports(package: Path) -> set[str]:
    """Top-level kubetune* packages that the modules under `package` import."""
    found: set[str] = set()
    for source in package.rglob("*.py"):
        tree = ast.parse(source.read_text(), str(source))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
    return {name for name in found if name.startswith("kubetune")}


@pytest.mark.parametrize("image", sorted(TRAINER_VENVS))
def test_trainer_image_carries_every_package_the_trainer_imports(image: str) -> None:
    """The trainer parses its config with kubetune_api (pydantic only); the image must copy it onto
    its PYTHONPATH, and the trainer must not import the operator's package (kopf, aiohttp)."""
    imported = _first_party_imports(ROOT / "trainer-images" / "kubetune_trainer")
    assert "kubetune_api" in imported, "the trainer no longer parses its config with kubetune_api?"
    assert "kubetune" not in imported, "kubetune_trainer imports the operator package; use kubetune_api"
    path = _dockerfile(image)
    final = parse_dockerfile(path)[-1]
    env_text = " ".join(rest for keyword, rest in final.instructions if keyword == "ENV")
    pythonpath = re.search(r"PYTHONPATH=(\S+)", env_text)
    assert pythonpath, f"{path}: sets no PYTHONPATH"
    roots = [r.rstrip("/") for r in pythonpath.group(1).split(":")]
    copies = [rest for stage in parse_dockerfile(path) for keyword, rest in stage.instructions if keyword == "COPY"]
    copied = {rest.split()[-1].rstrip("/") for rest in copies}
    for package in sorted(imported):
        assert any(f"{root}/{package}" in copied for root in roots), (
            f"{path}: kubetune_trainer imports {package}, which is not copied into a PYTHONPATH directory {roots}"
        )


_CACHE_ENV = re.compile(r"\b([A-Z_]*(?:HOME|CACHE|CACHE_DIR|COMPILE_LOCATION|TMPDIR)[A-Z_]*)=(/\S*)")


@pytest.mark.parametrize("image", sorted(TRAINER_VENVS))
def test_trainer_image_writes_only_where_the_pod_is_writable(image: str) -> None:
    """The operator runs trainers with a read-only root filesystem (Pod Security "restricted" plus
    readOnlyRootFilesystem). Cache and home directories the image points at must therefore lie
    under a volume the operator mounts writable, or be overridden by the pod's env."""
    from kubetune.api.resources import AUTOMODEL, UNSLOTH
    from kubetune.controller.builders import JobInputs, build_pod_template
    from kubetune_api.automodel import AutomodelJobSpec
    from kubetune_api.unsloth import UnslothJobSpec

    automodel = image == "trainer-automodel"
    resource = AUTOMODEL if automodel else UNSLOTH
    spec_model = AutomodelJobSpec if automodel else UnslothJobSpec
    example = "automodel-lora.yaml" if automodel else "unsloth-qlora.yaml"
    job = yaml.safe_load((ROOT / "examples" / example).read_text())
    inputs = JobInputs(
        resource=resource,
        name=job["metadata"]["name"],
        namespace="default",
        uid="uid",
        spec=spec_model.model_validate(job["spec"]),
        entities={},
    )
    pod = build_pod_template(inputs, "trainer", "Never")["spec"]
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    writable = [m["mountPath"].rstrip("/") for m in container["volumeMounts"] if not m.get("readOnly")]
    pod_env = {e["name"] for e in container["env"]}

    path = _dockerfile(image)
    final = parse_dockerfile(path)[-1]
    env_text = " ".join(rest for keyword, rest in final.instructions if keyword == "ENV")
    bad = [
        f"{name}={value}"
        for name, value in _CACHE_ENV.findall(env_text)
        if name not in pod_env and not any(value == w or value.startswith(w + "/") for w in writable)
    ]
    assert not bad, (
        f"{path}: {bad} point into the read-only root filesystem of the trainer pod; the pod's writable "
        f"mounts are {writable} (point them under /tmp, or have the operator mount an emptyDir there)"
    )


def test_operator_default_images_are_the_built_ones() -> None:
    """`kubetune operator` without image flags uses the images `make images` builds (same tag)."""
    from kubetune.controller.builders import OperatorSettings

    listed = subprocess.run(["bash", "hack/images.sh", "--list"], cwd=ROOT, capture_output=True, text=True, check=True)
    _, automodel, unsloth = listed.stdout.split()
    images = OperatorSettings().trainer_images
    assert (images["automodel"], images["unsloth"]) == (automodel, unsloth)


@pytest.mark.slow
def test_operator_image_steps_install_a_working_kubetune(tmp_path: Path) -> None:
    """The operator Dockerfile's steps, run here without Docker: build the wheel with the build
    stage's pinned backend from exactly the files it copies, install requirements/operator.txt and
    the wheel into a clean environment, and run the console script the ENTRYPOINT names. Catches
    an import the pinned runtime requirements do not provide. About 30 s (pip, from its cache)."""
    path = _dockerfile("kubetune-operator")
    build, final = parse_dockerfile(path)[0], parse_dockerfile(path)[-1]
    src = tmp_path / "src"
    src.mkdir()
    for keyword, rest in build.instructions:
        if keyword == "COPY":
            *sources, dest = rest.split()
            # Docker semantics for the forms the Dockerfile uses: files into a directory,
            # a directory's contents into a directory (relative to WORKDIR).
            assert dest.endswith("/"), f"{path}: COPY to {dest}: this test handles directory targets only"
            for source in sources:
                if (ROOT / source).is_dir():
                    shutil.copytree(
                        ROOT / source, src / dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    (src / dest).mkdir(parents=True, exist_ok=True)
                    shutil.copy(ROOT / source, src / dest / Path(source).name)
    backend = next(args for keyword, rest in build.instructions if keyword == "RUN" for args in _pip_install_args(rest))
    pins = [word for word in backend if PIN.match(word)]
    assert pins, f"{path}: the build stage installs no pinned build backend"

    clean_env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}

    def run(*cmd: str | Path, cwd: Path = tmp_path) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=clean_env)
        assert result.returncode == 0, f"{' '.join(map(str, cmd))}:\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
        return result

    base = Path(sys.base_prefix) / "bin" / "python3"
    run(base, "-m", "venv", tmp_path / "build-venv")
    run(tmp_path / "build-venv/bin/pip", "install", "--quiet", "--disable-pip-version-check", *pins)
    run(
        tmp_path / "build-venv/bin/pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
        "--no-build-isolation", "--wheel-dir", tmp_path / "wheels", ".", cwd=src,
    )  # fmt: skip
    (wheel,) = (tmp_path / "wheels").glob("kubetune-*.whl")

    run(base, "-m", "venv", tmp_path / "image-venv")
    pip = tmp_path / "image-venv/bin/pip"
    run(
        pip, "install", "--quiet", "--disable-pip-version-check",
        "-r", ROOT / "requirements/operator.txt", "-r", ROOT / "requirements/fetch.txt",
    )  # fmt: skip
    run(pip, "install", "--quiet", "--disable-pip-version-check", "--no-deps", wheel)
    entrypoint = json.loads(dict(final.instructions)["ENTRYPOINT"])
    command = json.loads(dict(final.instructions)["CMD"])
    kubetune_bin = tmp_path / "image-venv" / "bin" / entrypoint[0]
    helped = run(kubetune_bin, *command, "--help")
    assert "--all-namespaces" in helped.stdout
    # What `kubetune operator` imports when it starts (kopf, the handlers), from the pins alone.
    run(tmp_path / "image-venv/bin/python", "-c", "import kubetune.controller.handlers, kubetune.cli")
    # The same image is the initializer's: its entry point and both kinds of source import.
    run(
        tmp_path / "image-venv/bin/python", "-c",
        "import kubetune_fetch.__main__, kubetune_fetch.huggingface, kubetune_fetch.s3",
    )  # fmt: skip
    assert "--source" in run(tmp_path / "image-venv/bin/python", "-m", "kubetune_fetch", "--help").stdout


def test_product_and_images_import_nothing_from_tests() -> None:
    """The operator, the trainers and the scripts shipped beside the images (the GPU checks)
    run where tests/ is not: none of them may put tests/ on sys.path or import a module
    that lives there (support, tiny_llama, unsloth_helpers, ...)."""
    test_modules = {"tests", "support", "conftest"} | {p.stem for p in (ROOT / "tests").rglob("*.py")}
    found = []
    for path in sorted([*(ROOT / "operator").rglob("*.py"), *(ROOT / "trainer-images").rglob("*.py")]):
        relative = path.relative_to(ROOT)
        tree = ast.parse(path.read_text(), str(relative))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                if isinstance(node, ast.Attribute) and node.attr == "path" and ast.unparse(node) == "sys.path":
                    found.append(f"{relative}:{node.lineno}: edits or reads sys.path")
                continue
            found += [f"{relative}:{node.lineno}: imports {n}" for n in names if n.split(".")[0] in test_modules]
    assert not found, "\n".join(found)
