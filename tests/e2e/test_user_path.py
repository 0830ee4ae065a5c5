"""The user's path, for real: the images built here, the chart's operator running as a pod,
jobs applied with kubectl and trained in pods, in namespaces that enforce Pod Security
"restricted". On the local cluster's real node (`make test`) the README's blocks
(`<!-- e2e:... -->`) are what runs; e2e/run.sh runs this same file on kind
(KUBETUNE_E2E_CLUSTER=current, see e2ecluster.py). Nothing in between is faked. No GPU: the
nodes advertise fake `nvidia.com/gpu` and the trainers train on the CPU, as under
`kubetune run`. The claims' files are read and written only through the claims pod."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2ecluster import HUB_HOST_ENV, LOCAL_REGISTRY, NAMESPACE, SYSTEM_NAMESPACE, ClaimFiles, E2ECluster, ReadmeRunner

REPO = Path(__file__).resolve().parents[2]
OUTPUT_CLAIM = "kubetune-output"


def get(cluster: E2ECluster, *args: str) -> dict[str, Any]:
    return cluster.get_json(*args)


def trainer_pods(cluster: E2ECluster, job: str) -> list[dict[str, Any]]:
    pods = get(cluster, "pods", "-n", NAMESPACE, "-l", f"kubetune.io/job-name={job}")
    return list(pods["items"])


def describe_failure(cluster: E2ECluster, kind: str, job: str) -> str:
    parts = [cluster.kubectl("describe", "-n", NAMESPACE, kind, job, check=False).stdout[-4000:]]
    for pod in trainer_pods(cluster, job):
        name = pod["metadata"]["name"]
        log = cluster.kubectl("logs", "-n", NAMESPACE, name, "--tail=60", check=False).stdout
        parts.append(f"--- pod {name}\n{log}")
    parts.append(
        "--- operator\n"
        + cluster.kubectl("logs", "-n", SYSTEM_NAMESPACE, "deploy/kubetune", "--tail=60", check=False).stdout
    )
    return "\n".join(parts)


def test_operator_runs_from_its_image_under_restricted(cluster: E2ECluster, installed: None) -> None:
    """The chart's operator pod: from the image built here, on a node that runs it, Ready,
    never restarted, in a namespace that enforces "restricted"."""
    ns = get(cluster, "namespace", SYSTEM_NAMESPACE)
    assert ns["metadata"]["labels"].get("pod-security.kubernetes.io/enforce") == "restricted"
    pods = get(cluster, "pods", "-n", SYSTEM_NAMESPACE, "-l", "app.kubernetes.io/name=kubetune")["items"]
    assert pods, "the chart made no operator pod"
    repository = cluster.repository("kubetune-operator")
    for pod in pods:
        assert pod["spec"]["nodeName"] in cluster.node_names()
        image = pod["spec"]["containers"][0]["image"]
        assert image.startswith(f"{repository}:"), image
        statuses = pod["status"]["containerStatuses"]
        assert all(s["ready"] for s in statuses), statuses
        assert all(s["restartCount"] == 0 for s in statuses), statuses
        if repository.startswith(LOCAL_REGISTRY):
            # The image the node pulled is the one in the registry (no stale tag).
            assert statuses[0]["imageID"].startswith(f"{repository}@sha256:"), statuses


def test_automodel_lora_trains_in_a_pod(
    cluster: E2ECluster, claims: ClaimFiles, readme: ReadmeRunner, tmp_path: Path
) -> None:
    """README block e2e:watch: an AutomodelJob (LoRA on SmolLM2-135M) trains in a real pod;
    `kubectl get` shows its progress moving; it ends Succeeded with its output Model; the
    adapter on the output claim is trained (non-zero LoRA B) and generates."""
    job = "smollm2-lora-e2e"
    seen: list[str] = []
    done = threading.Event()

    def watch_progress() -> None:
        while not done.is_set():
            out = cluster.kubectl(
                "get", "-n", NAMESPACE, "automodeljob", job, "--no-headers", "-o",
                "custom-columns=PHASE:.status.phase,PROGRESS:.status.progress.summary",
                check=False,
            ).stdout.strip()  # fmt: skip
            if out and (not seen or seen[-1] != out):
                seen.append(out)
            time.sleep(1)

    watcher = threading.Thread(target=watch_progress, daemon=True)
    watcher.start()
    try:
        readme("watch")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{describe_failure(cluster, 'automodeljob', job)}") from None
    finally:
        done.set()
        watcher.join(timeout=10)
    running = [s for s in seen if s.startswith("Running")]
    progress = {s.split(None, 1)[1] for s in running if len(s.split(None, 1)) == 2 and "<none>" not in s}
    assert len(progress) >= 2, f"the progress column never moved while Running: {seen}"

    pods = trainer_pods(cluster, job)
    nodes = cluster.node_names()
    assert pods and all(p["spec"]["nodeName"] in nodes for p in pods), f"the trainer did not run on {nodes}"
    model = get(cluster, "models.kubetune.io", "-n", NAMESPACE, "smollm2-lora-e2e-adapter")
    assert model["spec"]["format"] == "adapter"
    assert model["spec"]["storage"]["pvc"]["claimName"] == OUTPUT_CLAIM, model["spec"]
    adapter_path = model["spec"]["storage"]["pvc"]["path"]
    config = f"{adapter_path}/adapter_config.json"
    assert claims.is_file(OUTPUT_CLAIM, config), f"no {config}: {claims.listing(OUTPUT_CLAIM)}"
    # Written as the pod's uid, not as root or as a uid baked into the image.
    uid = pods[0]["spec"]["securityContext"]["runAsUser"]
    assert claims.owner_uid(OUTPUT_CLAIM, config) == uid

    # The base is the one the seed put on the models claim (hack/smollm2.py's, either way).
    base = subprocess.run(
        [sys.executable, "hack/smollm2.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    adapter = claims.download_dir(OUTPUT_CLAIM, adapter_path, tmp_path / "adapter")
    check = subprocess.run(
        [sys.executable, "-c", LOAD_AND_GENERATE, base, str(adapter)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert check.returncode == 0, check.stderr[-3000:]
    report = json.loads(check.stdout.strip().splitlines()[-1])
    assert report["lora_b_abs_sum"] > 0, f"the adapter's LoRA B matrices are all zero: it was never trained: {report}"
    assert report["new_tokens"] > 0, report


# Runs in the test environment (torch, transformers, peft): the adapter loads onto the base
# model and generates.
LOAD_AND_GENERATE = """
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base, adapter = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(base)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32), adapter)
b = sum(float(p.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
text = tok.apply_chat_template([{"role": "user", "content": "Convert to JSON: name=Ana age=30 city=Lima"}],
                               tokenize=False, add_generation_prompt=True)
ids = tok(text, return_tensors="pt")
out = model.generate(**ids, max_new_tokens=12, do_sample=False)
print(json.dumps({"lora_b_abs_sum": b, "new_tokens": int(out.shape[1] - ids["input_ids"].shape[1]),
                  "text": tok.decode(out[0, ids["input_ids"].shape[1]:])}))
"""


# ---------------------------------------------------------------- the tier's other jobs

TIER_JOBS = REPO / "e2e" / "manifests" / "smollm2-tier-jobs.yaml"


def apply_tier_document(cluster: E2ECluster, kind: str, name: str) -> None:
    docs = [d for d in yaml.safe_load_all(TIER_JOBS.read_text()) if d]
    doc = next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)
    assert doc is not None, f"{TIER_JOBS} has no {kind} {name}"
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(doc))


def wait_finished(cluster: E2ECluster, kind: str, job: str, timeout: float = 1500) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        obj = get(cluster, kind, "-n", NAMESPACE, job)
        if obj.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            return obj
        time.sleep(3)
    raise AssertionError(f"{kind} {job} did not finish in {timeout:.0f}s\n{describe_failure(cluster, kind, job)}")


def metric_rows(claims: ClaimFiles, obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The job's metrics.jsonl, in its directory on the output claim (`<name>/<uid>`,
    builders.output_subpath)."""
    path = f"{obj['metadata']['name']}/{obj['metadata']['uid']}/metrics.jsonl"
    assert claims.is_file(OUTPUT_CLAIM, path), f"no {path}: {claims.listing(OUTPUT_CLAIM)}"
    return [json.loads(line) for line in claims.read_text(OUTPUT_CLAIM, path).splitlines() if line.strip()]


def loss_curve(rows: list[dict[str, Any]]) -> list[float]:
    """Train losses, validation losses and gradient norms, as tests/training's parity checks compare."""
    train = [float(r["loss"]) for r in rows if "loss" in r]
    val = [float(r["val_loss"]) for r in rows if "val_loss" in r]
    return train + val + [float(r["grad_norm"]) for r in rows if "grad_norm" in r]


# The same global batch over 2 ranks changes only the order of float32 sums; the trainer's
# own parity tests (tests/training/automodel/test_distributed.py) use the same bound.
DISTRIBUTED_RTOL = 1e-5


def test_two_pods_train_one_model_over_the_pod_network(cluster: E2ECluster, claims: ClaimFiles) -> None:
    """2 nodes x 1 GPU: a PyTorchJob with two Worker pods (no init container, so "restricted"
    admits them) that rendezvous through worker 0's Service name (CoreDNS, kube-proxy) and
    train one model over gloo: the losses equal the one-pod job's (smollm2-lora-e2e)."""
    single = get(cluster, "automodeljob", "-n", NAMESPACE, "smollm2-lora-e2e")
    assert single.get("status", {}).get("phase") == "Succeeded", "needs smollm2-lora-e2e (the README's job) first"
    expected = loss_curve(metric_rows(claims, single))

    job = "smollm2-lora-2pods"
    apply_tier_document(cluster, "AutomodelJob", job)
    obj = wait_finished(cluster, "automodeljob", job)
    assert obj["status"]["phase"] == "Succeeded", describe_failure(cluster, "automodeljob", job)
    children = get(cluster, "pytorchjobs", "-n", NAMESPACE, "-l", f"kubetune.io/job-name={job}")["items"]
    assert len(children) == 1
    pods = trainer_pods(cluster, job)
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]
    nodes = cluster.node_names()
    for pod in pods:
        assert pod["spec"]["nodeName"] in nodes
        assert not pod["spec"].get("initContainers"), "an init container: the training-operator's init-pytorch?"
        assert pod["status"]["phase"] == "Succeeded"
    got = loss_curve(metric_rows(claims, obj))
    assert len(got) == len(expected), (got, expected)
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, expected, strict=True))
    print(f"2 pods vs 1 pod: max relative difference {worst:.2e} over {len(got)} values")
    assert worst <= DISTRIBUTED_RTOL, f"2 pods {got} vs 1 pod {expected}"


def test_unsloth_lora_trains_in_a_pod(cluster: E2ECluster, claims: ClaimFiles) -> None:
    """An UnslothJob from the Unsloth image: Succeeded, its adapter on the output claim."""
    job = "smollm2-unsloth-lora"
    apply_tier_document(cluster, "UnslothJob", job)
    obj = wait_finished(cluster, "unslothjob", job)
    assert obj["status"]["phase"] == "Succeeded", describe_failure(cluster, "unslothjob", job)
    pods = trainer_pods(cluster, job)
    assert pods and all(p["spec"]["nodeName"] in cluster.node_names() for p in pods)
    image = pods[0]["spec"]["containers"][0]["image"]
    assert image.startswith(f"{cluster.repository('trainer-unsloth')}:"), image
    model = get(cluster, "models.kubetune.io", "-n", NAMESPACE, "smollm2-unsloth-adapter")
    config = f"{model['spec']['storage']['pvc']['path']}/adapter_config.json"
    assert claims.is_file(OUTPUT_CLAIM, config), f"no {config}: {claims.listing(OUTPUT_CLAIM)}"
    assert [r["step"] for r in metric_rows(claims, obj) if "loss" in r][-1] == 3


def test_deleted_trainer_pod_is_replaced_and_resumes(cluster: E2ECluster, claims: ClaimFiles) -> None:
    """Deleting the running trainer pod: the trainer checkpoints on SIGTERM, the Job makes a
    new pod, which resumes there: every step is trained exactly once, the job succeeds, and
    status.restarts shows the preemption."""
    job = "smollm2-lora-resume"
    # The trainer patches status.progress at most every 10 s (progress.MIN_INTERVAL_S), about
    # 10 steps apart on a quiet 2-core machine (1 s a step), so the step the loop can act on
    # must leave room for more than one interval: 48 steps, deleted at a reported step from 2
    # to 39 (16 steps with a window of 2-7 finished unseen between two reports on 2026-12-03).
    # A pod deleted after its last step exits 0 and finishes the job itself.
    max_steps = 48
    apply_tier_document(cluster, "AutomodelJob", job)
    deadline = time.monotonic() + 900
    first: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        obj = get(cluster, "automodeljob", "-n", NAMESPACE, job)
        step = (obj.get("status", {}).get("progress") or {}).get("step") or 0
        running = [p for p in trainer_pods(cluster, job) if p["status"].get("phase") == "Running"]
        if 2 <= step < max_steps - 8 and running:
            first = running[0]
            break
        assert obj.get("status", {}).get("phase") not in ("Succeeded", "Failed"), "finished before the deletion"
        time.sleep(2)
    assert first is not None, f"{job} never reached step 2\n{describe_failure(cluster, 'automodeljob', job)}"
    cluster.kubectl("delete", "pod", "-n", NAMESPACE, first["metadata"]["name"], "--wait=false")
    obj = wait_finished(cluster, "automodeljob", job)
    assert obj["status"]["phase"] == "Succeeded", describe_failure(cluster, "automodeljob", job)
    pods = trainer_pods(cluster, job)
    assert first["metadata"]["uid"] not in {p["metadata"]["uid"] for p in pods}, "the deleted pod is back?"
    assert any(p["status"]["phase"] == "Succeeded" for p in pods), "no replacement pod finished the job"
    steps = [r["step"] for r in metric_rows(claims, obj) if "loss" in r]
    assert steps == list(range(1, max_steps + 1)), f"trained steps {steps}: a step twice or missing"
    # The operator lists the stop as a preemption (the trainer's SIGTERM exit), with the step
    # the trainer had reached: the one its checkpoint, and the new pod, started from.
    (restart,) = obj["status"]["restarts"]
    assert restart["failureClass"] == "Preempted" and restart["pod"] == first["metadata"]["name"], restart
    assert "exit code 143" in restart["message"] and restart["step"] >= 2, restart


def test_malformed_row_fails_with_the_trainers_reason(cluster: E2ECluster, claims: ClaimFiles) -> None:
    """A dataset with a line that is not JSON: the job ends Failed at once (no retries of a
    permanent error) and `kubectl describe` shows the trainer's one-line reason."""
    rows = (REPO / "examples" / "demo" / "data" / "train" / "rows.jsonl").read_text().splitlines()[:8]
    # At the claim's top: the seed's chat/ is not the trainers' to write.
    malformed = "\n".join([*rows[:5], '{"messages": [', *rows[5:]]) + "\n"
    claims.write_bytes("datasets", "chat-malformed/rows.jsonl", malformed.encode())
    apply_tier_document(cluster, "Fileset", "chat-malformed")
    job = "smollm2-lora-malformed"
    apply_tier_document(cluster, "AutomodelJob", job)
    obj = wait_finished(cluster, "automodeljob", job, timeout=600)
    assert obj["status"]["phase"] == "Failed", obj["status"]
    failed = next(c for c in obj["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "TrainerError", failed
    described = cluster.kubectl("describe", "-n", NAMESPACE, "automodeljob", job).stdout
    assert "rows.jsonl line 6: not valid JSON" in described, described[-3000:]
    assert len(trainer_pods(cluster, job)) == 1, "a bad row is permanent: it must not be retried"


def test_a_model_from_a_hub_downloads_itself_in_a_pod(
    cluster: E2ECluster, claims: ClaimFiles, shell_env: dict[str, str]
) -> None:
    """spec.source in a real pod: the operator's initializer Job runs as a pod (from the
    operator's image, in the "restricted" namespace, as the entity's own ServiceAccount),
    downloads a tiny model from a Hub-compatible server on this machine's address that pods
    reach (the real node's bridge; on kind, its network's gateway) into the entity's claim,
    reports its progress and makes the Model Ready. Last in the file: it points the installed
    chart at that server (helm upgrade)."""
    from support.hfhub import HubServer, tiny_model_files

    if cluster.hub_host is None:
        pytest.skip(f"no address of this machine that the cluster's pods reach: set {HUB_HOST_ENV}")
    with HubServer(host=cluster.hub_host) as hub:
        files = tiny_model_files(seed=5)
        sha = hub.commit("org/tiny-hub", files)
        upgrade = subprocess.run(
            ["helm", "upgrade", "kubetune", "helm/kubetune", "--namespace", SYSTEM_NAMESPACE, "--reuse-values",
             "--set", f"initializer.hfEndpoint={hub.url}", "--wait", "--timeout", "5m"],
            cwd=REPO, env=shell_env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert upgrade.returncode == 0, upgrade.stderr[-3000:]
        model = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "Model",
            "metadata": {"name": "tiny-from-hub", "namespace": NAMESPACE},
            "spec": {
                "source": {"huggingface": {"repo": "org/tiny-hub"}},
                "storage": {"pvc": {"claimName": "models", "path": "tiny-from-hub"}},
            },
        }
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(model))
        deadline = time.monotonic() + 600
        while True:
            status = get(cluster, "models.kubetune.io", "-n", NAMESPACE, "tiny-from-hub").get("status") or {}
            if status.get("ready"):
                break
            pods = get(cluster, "pods", "-n", NAMESPACE, "-l", "kubetune.io/entity-name=tiny-from-hub")["items"]
            assert time.monotonic() < deadline, (status, [p["status"] for p in pods])
            time.sleep(2)
        download = status["download"]
        assert download["phase"] == "Complete" and download["resolved"] == f"commit {sha}", download
        assert download["filesDone"] == download["filesTotal"] == len(files), download
        # The pod reports Complete, then exits: it may still be running for a moment.
        deadline = time.monotonic() + 120
        while True:
            pods = get(cluster, "pods", "-n", NAMESPACE, "-l", "kubetune.io/entity-name=tiny-from-hub")["items"]
            if any(p["status"].get("phase") == "Succeeded" for p in pods):
                break
            assert time.monotonic() < deadline, [p["status"] for p in pods]
            time.sleep(1)
        assert all(p["spec"]["nodeName"] in cluster.node_names() for p in pods), pods
        image = pods[0]["spec"]["containers"][0]["image"]
        assert image.startswith(f"{cluster.repository('kubetune-operator')}:"), image
        assert hub.downloads("model.safetensors"), "the pod fetched nothing from the hub"
    for name, data in files.items():
        assert claims.read_bytes("models", f"tiny-from-hub/{download['version']}/{name}") == data, name
