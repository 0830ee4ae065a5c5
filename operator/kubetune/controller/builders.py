"""Pure builders: a validated job and its resolved entities in, plain dicts out.
No Kubernetes client here; the reconciler applies what these return.

Choices made on purpose (documented in docs/OPERATOR.md):
- One GPU → batch/v1 Job: restartPolicy Never (a failed pod stays for its logs),
  backoffLimit spec.retries.failures + disruptions (each retry resuming from the
  checkpoint on the output volume; the operator holds each class to its own budget),
  and a podFailurePolicy that fails the Job at once on the trainer's own
  error exit code 1 (a bad config will not get better) and does not count pod
  disruptions (preemption, node drain) against the backoff limit.
- More GPUs or nodes → PyTorchJob: restartPolicy ExitCode (the training-operator
  restarts replicas killed by a signal — exit codes 128+ — and fails on 1-127),
  runPolicy.backoffLimit as for the batch Job.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from kubetune.api.backends import Backend, JobSpec, OutputFormat
from kubetune.api.resources import BACKENDS, Resource, job_backend, spec_backend
from kubetune.controller.references import EntityRecord
from kubetune.controller.resume import ResumePoint
from kubetune.render import TrainerPaths, cluster_paths, dumps_config, kubernetes_progress, render_trainer_config
from kubetune_api import constants as c
from kubetune_api.trainer_config import job_output_subpath

MAX_JOB_NAME = 40  # leaves room for "-automodel-trainer" and the pod suffixes within 63


def default_trainer_images() -> dict[str, str]:
    return {b.name: b.default_image for b in BACKENDS}


# The operator's image: it carries kubetune_fetch (kubetune.controller.initializer says why).
DEFAULT_INITIALIZER_IMAGE = "ghcr.io/kubetune/kubetune-operator:0.1.0"


@dataclass(frozen=True)
class InitializerSettings:
    """The operator's settings for the entities' initializer Jobs (the chart's `initializer` values)."""

    image: str = DEFAULT_INITIALIZER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    # The Hub endpoint the initializers use (a private hub or a mirror); None: huggingface.co.
    hf_endpoint: str | None = None


@dataclass(frozen=True)
class OperatorSettings:
    """The operator's configuration (the chart's values)."""

    # By backend name (`--<name>-image`); a backend missing here uses its default image.
    trainer_images: Mapping[str, str] = field(default_factory=default_trainer_images)
    image_pull_policy: str = "IfNotPresent"
    output_claim: str = "kubetune-output"
    # GB per GPU on this cluster's nodes, as the card is sold (80 for an 80 GB H100), for the
    # memory pre-flight check; None: only the GPU count is checked (kubetune.memory).
    gpu_memory_gb: float | None = None
    initializer: InitializerSettings = field(default_factory=InitializerSettings)

    def trainer_image(self, backend: Backend[Any]) -> str:
        return self.trainer_images.get(backend.name) or backend.default_image


# Keyword-only: eleven fields, four of them strings and two optional mappings, are too
# easy to pass in the wrong order by position (a name where the namespace belongs).
@dataclass(frozen=True, kw_only=True)
class JobInputs:
    """Everything the builders need: the job, validated, and its entities, resolved."""

    resource: Resource
    name: str
    namespace: str
    uid: str
    spec: JobSpec
    entities: Mapping[str, EntityRecord]  # by role: model, teacher_model, training_data, validation_data
    settings: OperatorSettings = field(default_factory=OperatorSettings)
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    generation: int | None = None  # metadata.generation, recorded on the child
    output_model: str | None = None  # the output Model's name when not the default (see output_model_name)
    resume: ResumePoint | None = None  # spec.resume_from, resolved


# Annotations that describe the job object itself, not its pods.
_OWN_ANNOTATION_PREFIXES = ("kubectl.kubernetes.io/", "kopf.zalando.org/")


def pod_annotations(job_annotations: Mapping[str, str]) -> dict[str, str]:
    """A job's annotations go on to its pods (sidecar injection, monitoring, test hooks)."""
    return {k: v for k, v in job_annotations.items() if not k.startswith(_OWN_ANNOTATION_PREFIXES)}


@dataclass(frozen=True)
class ChildNames:
    base: str
    config_map: str
    service_account: str
    role: str
    child: str


def backend(resource: Resource) -> str:
    """The backend's name, as the children's names carry it; an error for a non-job kind."""
    return job_backend(resource).name


_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def child_base_name(resource: Resource, name: str) -> str:
    """`<name>-<backend>`, or for a job name that is no DNS-1035 label (it starts with a
    digit or holds dots, e.g. `7b-lora`, `llama3.1-lora`) a stable stand-in that is
    one: the training-operator refuses such PyTorchJob names, and the Services and pod
    hostnames made from them must be labels too. The hash keeps `a.b` and `a-b` apart;
    the length stays within MAX_JOB_NAME, so the pods' suffixes still fit in 63."""
    base = f"{name}-{backend(resource)}"
    if _DNS_1035_LABEL.match(base):
        return base
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    safe = re.sub(r"[^a-z0-9-]", "-", name)
    return f"{f'k{digest}-{safe}'[:MAX_JOB_NAME]}-{backend(resource)}"


def child_names(resource: Resource, name: str) -> ChildNames:
    """Fixed names: the same job always maps to the same children (create-or-get)."""
    base = child_base_name(resource, name)
    return ChildNames(
        base=base,
        config_map=f"{base}-config",
        service_account=f"{base}-trainer",
        role=f"{base}-trainer",
        child=base,
    )


def total_gpus(spec: JobSpec) -> int:
    return spec_backend(spec).total_gpus(spec)


def uses_pytorchjob(spec: JobSpec) -> bool:
    return spec_backend(spec).uses_pytorchjob(spec)


def owner_reference(inputs: JobInputs) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": inputs.resource.kind,
        "name": inputs.name,
        "uid": inputs.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def common_labels(inputs: JobInputs) -> dict[str, str]:
    return {
        c.LABEL_JOB_NAME: inputs.name,
        c.LABEL_JOB_KIND: inputs.resource.kind,
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
    }


def _metadata(inputs: JobInputs, name: str, extra_labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": inputs.namespace,
        "labels": {**common_labels(inputs), **(extra_labels or {})},
        "ownerReferences": [owner_reference(inputs)],
    }


def trainer_config(inputs: JobInputs) -> dict[str, Any]:
    paths: TrainerPaths = cluster_paths(
        has_teacher="teacher_model" in inputs.entities,
        has_validation="validation_data" in inputs.entities,
        resumes=inputs.resume is not None,
    )
    return render_trainer_config(
        inputs.resource,
        name=inputs.name,
        namespace=inputs.namespace,
        uid=inputs.uid,
        spec=inputs.spec,
        paths=paths,
        progress=kubernetes_progress(inputs.resource, inputs.namespace, inputs.name),
    )


def build_config_map(inputs: JobInputs) -> dict[str, Any]:
    names = child_names(inputs.resource, inputs.name)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(inputs, names.config_map),
        "data": {c.CONFIG_FILE_NAME: dumps_config(trainer_config(inputs))},
    }


def status_writer_identity(
    metadata: Callable[[str], dict[str, Any]],
    namespace: str,
    service_account: str,
    role: str,
    status_of: tuple[str, str],
) -> list[dict[str, Any]]:
    """A ServiceAccount whose Role may only get and patch the status of one kubetune object
    (`status_of`: its plural and name), and the RoleBinding: what a trainer (its job's
    progress) and an initializer (its entity's download) write with. `metadata(name)` gives
    each object's metadata (labels, owner)."""
    plural, name = status_of
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(service_account)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata(role),
            "rules": [
                {
                    "apiGroups": [c.GROUP],
                    "resources": [f"{plural}/status"],
                    "resourceNames": [name],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata(role),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
        },
    ]


def build_trainer_identity(inputs: JobInputs) -> list[dict[str, Any]]:
    """A per-job ServiceAccount that may only patch this job's status (progress)."""
    names = child_names(inputs.resource, inputs.name)
    return status_writer_identity(
        partial(_metadata, inputs),
        inputs.namespace,
        names.service_account,
        names.role,
        (inputs.resource.plural, inputs.name),
    )


_MOUNTS = (
    ("model", c.MODEL_MOUNT),
    ("teacher_model", c.TEACHER_MOUNT),
    ("training_data", c.TRAINING_DATA_MOUNT),
    ("validation_data", c.VALIDATION_DATA_MOUNT),
)


def _volumes_and_mounts(inputs: JobInputs) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    names = child_names(inputs.resource, inputs.name)
    # A pod mounts claims of its own namespace only: an entity shared from another
    # namespace is mounted through the claim of the same name here (see docs/OPERATOR.md).
    claims: dict[str, str] = {}

    def volume_for(claim: str) -> str:
        if claim not in claims:
            claims[claim] = f"claim-{len(claims)}"
        return claims[claim]

    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": c.CONFIG_MOUNT_DIR, "readOnly": True},
        {"name": "shm", "mountPath": c.SHM_MOUNT},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    for role, mount_path in _MOUNTS:
        record = inputs.entities.get(role)
        if record is None:
            continue
        pvc = record.spec["storage"]["pvc"]
        mount: dict[str, Any] = {"name": volume_for(pvc["claimName"]), "mountPath": mount_path, "readOnly": True}
        # Pinned here, when the child is made: a later revision of a downloaded source lands
        # in another directory, and this job keeps the one it started on.
        if record.claim_path:
            mount["subPath"] = record.claim_path
        mounts.append(mount)
    mounts.append(
        {
            "name": volume_for(inputs.settings.output_claim),
            "mountPath": c.OUTPUT_MOUNT,
            "subPath": output_subpath(inputs),
        }
    )
    if inputs.resume is not None:
        # The other job's checkpoint, read only: this job writes its own under OUTPUT_MOUNT.
        mounts.append(
            {
                "name": volume_for(inputs.settings.output_claim),
                "mountPath": c.RESUME_MOUNT,
                "subPath": inputs.resume.subpath,
                "readOnly": True,
            }
        )

    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": names.config_map}},
        # NCCL and the DataLoader workers exchange tensors through /dev/shm; the
        # container default (64 MiB) is too small for them.
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    volumes += [{"name": vol, "persistentVolumeClaim": {"claimName": claim}} for claim, vol in claims.items()]
    return volumes, mounts


def _env(inputs: JobInputs) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "TRANSFORMERS_OFFLINE", "value": "1"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    env += job_backend(inputs.resource).pod_env(inputs.spec)
    integrations = inputs.spec.integrations
    if integrations and integrations.mlflow and integrations.mlflow.token_secret:
        ref = integrations.mlflow.token_secret
        env.append({"name": c.ENV_MLFLOW_TOKEN, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if integrations and integrations.wandb and integrations.wandb.api_key_secret:
        ref = integrations.wandb.api_key_secret
        env.append({"name": c.ENV_WANDB_API_KEY, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env


def _image(inputs: JobInputs) -> str:
    return inputs.spec.image or inputs.settings.trainer_image(job_backend(inputs.resource))


def _command(inputs: JobInputs) -> list[str]:
    module = job_backend(inputs.resource).trainer_module
    if uses_pytorchjob(inputs.spec):
        # torchrun reads its whole launch from the PET_* variables the training-operator
        # sets for an elastic PyTorchJob: --nnodes (min:max), --nproc-per-node, and a c10d
        # rendezvous on worker 0's headless-service name (build_pytorchjob).
        return ["torchrun", "-m", module, "--config", c.CONFIG_PATH]
    return ["python", "-m", module, "--config", c.CONFIG_PATH]


# Pod Security "restricted" at the pod level, for every pod the operator makes (trainers,
# initializers): one uid, so the files an initializer writes are the trainers' to read.
RESTRICTED_POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": c.TRAINER_UID,
    "runAsGroup": c.TRAINER_UID,
    "fsGroup": c.TRAINER_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}

RESTRICTED_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def build_pod_template(inputs: JobInputs, container_name: str, restart_policy: str) -> dict[str, Any]:
    names = child_names(inputs.resource, inputs.name)
    volumes, mounts = _volumes_and_mounts(inputs)
    gpus = job_backend(inputs.resource).gpus_per_pod(inputs.spec)
    container: dict[str, Any] = {
        "name": container_name,
        "image": _image(inputs),
        "imagePullPolicy": inputs.settings.image_pull_policy,
        "command": _command(inputs),
        "env": _env(inputs),
        "resources": {"requests": {c.GPU_RESOURCE: str(gpus)}, "limits": {c.GPU_RESOURCE: str(gpus)}},
        "volumeMounts": mounts,
        "securityContext": RESTRICTED_CONTAINER_SECURITY,
        "terminationMessagePath": c.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if uses_pytorchjob(inputs.spec):
        container["ports"] = [{"name": c.PYTORCHJOB_PORT_NAME, "containerPort": c.PYTORCHJOB_PORT}]
    metadata: dict[str, Any] = {"labels": common_labels(inputs)}
    if annotations := pod_annotations(inputs.annotations):
        metadata["annotations"] = annotations
    return {
        "metadata": metadata,
        "spec": {
            "restartPolicy": restart_policy,
            "serviceAccountName": names.service_account,
            "securityContext": RESTRICTED_POD_SECURITY,
            # A preempted trainer saves a checkpoint on SIGTERM; give it time to.
            "terminationGracePeriodSeconds": 120,
            "containers": [container],
            "volumes": volumes,
        },
    }


def _child_labels(inputs: JobInputs) -> dict[str, str]:
    queue = inputs.labels.get(c.LABEL_KUEUE_QUEUE)
    return {c.LABEL_KUEUE_QUEUE: queue} if queue else {}


def _child_metadata(inputs: JobInputs, name: str) -> dict[str, Any]:
    metadata = _metadata(inputs, name, _child_labels(inputs))
    annotations = {}
    if inputs.generation is not None:
        annotations[c.ANNOTATION_SPEC_GENERATION] = str(inputs.generation)
    if inputs.output_model is not None:
        annotations[c.ANNOTATION_OUTPUT_MODEL] = inputs.output_model
    if inputs.resume is not None:
        annotations[c.ANNOTATION_RESUMED_FROM] = f"{inputs.resume.job}@{inputs.resume.step}"
    if annotations:
        metadata["annotations"] = annotations
    return metadata


def child_ref(resource: Resource, name: str, spec: JobSpec) -> dict[str, str]:
    """Which workload runs a job, decided by the builders alone (never read back from
    the job's status, which others may write)."""
    if uses_pytorchjob(spec):
        return {"apiVersion": c.PYTORCHJOB_API_VERSION, "kind": "PyTorchJob", "name": child_names(resource, name).child}
    return {"apiVersion": "batch/v1", "kind": "Job", "name": child_names(resource, name).child}


def suspend_patch(spec: JobSpec, generation: int | None) -> dict[str, Any]:
    """Pass `spec.suspend` on to the child, recording the generation it came from."""
    annotations = {"metadata": {"annotations": {c.ANNOTATION_SPEC_GENERATION: str(generation)}}}
    if uses_pytorchjob(spec):
        return {**annotations, "spec": {"runPolicy": {"suspend": spec.suspend}}}
    return {**annotations, "spec": {"suspend": spec.suspend}}


def child_backoff_limit(spec: JobSpec) -> int:
    """The child's own retry limit: both budgets together, a backstop only. The operator
    counts each class against its own budget (spec.retries) and stops the child first;
    the child cannot tell a preempted pod from an OOMKilled one."""
    return spec.retries.failures + spec.retries.disruptions


def stop_patch(spec: JobSpec, message: str, now: str) -> dict[str, Any]:
    """Stop the child of a job out of retries, keeping its failed pods and their logs: a
    deadline already past makes its controller fail it and remove the running pods (a
    PyTorchJob keeps every pod under cleanPodPolicy None, so Running here). The
    annotations say why and when, for the job's status."""
    annotations = {"metadata": {"annotations": {c.ANNOTATION_STOPPED: message, c.ANNOTATION_STOPPED_AT: now}}}
    if uses_pytorchjob(spec):
        return {**annotations, "spec": {"runPolicy": {"activeDeadlineSeconds": 1, "cleanPodPolicy": "Running"}}}
    return {**annotations, "spec": {"activeDeadlineSeconds": 1}}


def build_batch_job(inputs: JobInputs) -> dict[str, Any]:
    names = child_names(inputs.resource, inputs.name)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _child_metadata(inputs, names.child),
        "spec": {
            "suspend": inputs.spec.suspend,
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": child_backoff_limit(inputs.spec),
            "podFailurePolicy": {
                "rules": [
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "trainer",
                            "operator": "In",
                            "values": [c.EXIT_TRAINER_ERROR],
                        },
                    },
                ]
            },
            "template": build_pod_template(inputs, "trainer", "Never"),
        },
    }


def build_pytorchjob(inputs: JobInputs) -> dict[str, Any]:
    backend = job_backend(inputs.resource)
    names = child_names(inputs.resource, inputs.name)
    template = build_pod_template(inputs, c.PYTORCHJOB_CONTAINER, "ExitCode")
    restart = template["spec"].pop("restartPolicy")
    nodes = backend.nodes(inputs.spec)
    # Workers only, with a fixed-size elastic policy: torchrun's c10d rendezvous on
    # worker 0 waits for its peers itself. A Master replica would make the
    # training-operator inject its `init-pytorch` container into every Worker (an
    # nslookup loop in alpine, with no security context), which Pod Security
    # "restricted" refuses and an air-gapped cluster cannot pull.
    replicas = {"Worker": {"replicas": nodes, "restartPolicy": restart, "template": template}}
    return {
        "apiVersion": c.PYTORCHJOB_API_VERSION,
        "kind": "PyTorchJob",
        "metadata": _child_metadata(inputs, names.child),
        "spec": {
            "nprocPerNode": str(backend.gpus_per_pod(inputs.spec)),
            "elasticPolicy": {"minReplicas": nodes, "maxReplicas": nodes, "rdzvBackend": "c10d"},
            "runPolicy": {
                "backoffLimit": child_backoff_limit(inputs.spec),
                "cleanPodPolicy": "None",
                "suspend": inputs.spec.suspend,
            },
            "pytorchReplicaSpecs": replicas,
        },
    }


def build_child(inputs: JobInputs) -> dict[str, Any]:
    return build_pytorchjob(inputs) if uses_pytorchjob(inputs.spec) else build_batch_job(inputs)


def build_all(inputs: JobInputs) -> list[dict[str, Any]]:
    """Every object of a job, in creation order (the child last: it needs the rest)."""
    return [build_config_map(inputs), *build_trainer_identity(inputs), build_child(inputs)]


def default_output_model_name(name: str, spec: JobSpec) -> str:
    return spec.output.name or f"{name}-output"


def output_model_name(inputs: JobInputs) -> str:
    return inputs.output_model or default_output_model_name(inputs.name, inputs.spec)


def fallback_output_model_name(preferred: str, uid: str) -> str:
    """For a job whose output name a Model of another producer already holds (an earlier
    job of the same name, a job of the other kind): the uid tells them apart."""
    return f"{preferred}-{uid[:8]}"


def output_subpath(inputs: JobInputs) -> str:
    """The job's directory on the output claim: `<name>/<uid>` (one rule with the trainer,
    which names checkpoints on the claim by it)."""
    return job_output_subpath(inputs.name, inputs.uid)


def output_format(spec: JobSpec) -> OutputFormat:
    return spec_backend(spec).output_format(spec)


def output_dir(fmt: str) -> str:
    """Where the trainer writes the result inside the output volume (docs/CONTRACT.md)."""
    return "adapter" if fmt == "adapter" else "model"


def build_output_model(inputs: JobInputs) -> dict[str, Any]:
    """The Model entity a finished job produces (the trainer wrote it under output/)."""
    fmt = output_format(inputs.spec)
    base = inputs.entities.get("model")
    base_ref = job_backend(inputs.resource).base_model(inputs.spec)
    spec: dict[str, Any] = {
        "storage": {
            "pvc": {"claimName": inputs.settings.output_claim, "path": f"{output_subpath(inputs)}/{output_dir(fmt)}"}
        },
        "format": fmt,
        "description": inputs.spec.output.description or f"Produced by {inputs.resource.kind} {inputs.name}",
    }
    if fmt == "adapter":
        spec["baseModel"] = base_ref
    if base is not None:
        for key in ("tokenizer", "vocabSize"):
            if base.spec.get(key) is not None:
                spec[key] = base.spec[key]
    metadata = _metadata(inputs, output_model_name(inputs), {c.LABEL_JOB_UID: inputs.uid})
    # Not owned by the job: deleting a finished job must not delete the model it made.
    del metadata["ownerReferences"]
    return {"apiVersion": c.API_VERSION, "kind": c.KIND_MODEL, "metadata": metadata, "spec": spec}
