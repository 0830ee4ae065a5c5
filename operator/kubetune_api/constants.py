"""Every name the project shares across modules: API group, labels, annotations,
env variables, mount paths, field managers. One place, so that the operator,
the CLI, the trainers' contract and the tests cannot drift apart."""

from typing import Final

GROUP: Final = "kubetune.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
CATEGORY: Final = "kubetune"

KIND_AUTOMODEL: Final = "AutomodelJob"
KIND_UNSLOTH: Final = "UnslothJob"
KIND_MODEL: Final = "Model"
KIND_FILESET: Final = "Fileset"

# Labels put on everything the operator creates.
LABEL_JOB_NAME: Final = "kubetune.io/job-name"
LABEL_JOB_KIND: Final = "kubetune.io/job-kind"
# On an output Model: the uid of the job that made it (names are reused, uids are not).
LABEL_JOB_UID: Final = "kubetune.io/job-uid"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "kubetune"
LABEL_KUEUE_QUEUE: Final = "kueue.x-k8s.io/queue-name"

# On the child workload: the job's metadata.generation the operator last passed on
# (suspend). The operator's own record, where the trainer's identity cannot write,
# unlike the job's status.
ANNOTATION_SPEC_GENERATION: Final = "kubetune.io/spec-generation"
# On the child workload: the name of the Model the job will produce, decided once at
# creation (the default name may be taken by an earlier job of the same name).
ANNOTATION_OUTPUT_MODEL: Final = "kubetune.io/output-model"
# On the child workload: the checkpoint spec.resume_from resolved to, `<job>@<step>`,
# fixed at creation (the source job goes on saving newer ones).
ANNOTATION_RESUMED_FROM: Final = "kubetune.io/resumed-from"
# On a child the operator stopped because its job ran out of retries: why (the Failed
# condition's message) and when; the job's outcome is computed from them, never from status.
ANNOTATION_STOPPED: Final = "kubetune.io/stopped"
ANNOTATION_STOPPED_AT: Final = "kubetune.io/stopped-at"

# On an entity's initializer Job and its identity: which entity it downloads for (the
# operator finds the Job by them; kubetune.controller.initializer).
LABEL_ENTITY_KIND: Final = "kubetune.io/entity-kind"
LABEL_ENTITY_NAME: Final = "kubetune.io/entity-name"

# Field manager / user agent the operator uses, so its API calls can be counted.
FIELD_MANAGER: Final = "kubetune-operator"

# Where the trainer finds its inputs inside a pod (see docs/CONTRACT.md).
CONFIG_MOUNT_DIR: Final = "/etc/kubetune"
CONFIG_FILE_NAME: Final = "config.json"
CONFIG_PATH: Final = f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE_NAME}"
MODEL_MOUNT: Final = "/kubetune/model"
TEACHER_MOUNT: Final = "/kubetune/teacher"
TRAINING_DATA_MOUNT: Final = "/kubetune/data/training"
VALIDATION_DATA_MOUNT: Final = "/kubetune/data/validation"
OUTPUT_MOUNT: Final = "/kubetune/output"
RESUME_MOUNT: Final = "/kubetune/resume"  # spec.resume_from's checkpoint, read only
# Written last into a checkpoint directory by both trainers (the transformers Trainer's
# name): a directory with it is complete.
CHECKPOINT_STATE_FILE: Final = "trainer_state.json"
SHM_MOUNT: Final = "/dev/shm"
TERMINATION_LOG: Final = "/dev/termination-log"

# Where the initializer pod mounts the entity's storage.pvc (its path as subPath): the
# root under which kubetune_fetch puts `<version>/` and its completion marker.
FETCH_MOUNT: Final = "/kubetune/fetch"
# The initializer's credentials, under the names huggingface_hub and boto3 read themselves.
ENV_HF_TOKEN: Final = "HF_TOKEN"
ENV_HF_ENDPOINT: Final = "HF_ENDPOINT"
AWS_CREDENTIAL_KEYS: Final = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

# Env variables the trainer reads (credentials only; all settings come from the config file).
ENV_MLFLOW_TOKEN: Final = "MLFLOW_TRACKING_TOKEN"
ENV_WANDB_API_KEY: Final = "WANDB_API_KEY"
ENV_TERMINATION_LOG: Final = "KUBETUNE_TERMINATION_LOG"

GPU_RESOURCE: Final = "nvidia.com/gpu"
# Set on GPU nodes by NVIDIA GPU feature discovery: memory per device, in MiB.
LABEL_GPU_MEMORY_MIB: Final = "nvidia.com/gpu.memory"

# The trainer's exit codes (docs/CONTRACT.md section 2), which the operator's restart
# policies rely on: EXIT_TRAINER_ERROR fails the Job at once (podFailurePolicy; a bad
# config or bad data does not get better) and the PyTorchJob's ExitCode policy does not
# restart it; EXIT_PREEMPTED (128 + SIGTERM, as if the signal had killed the process)
# follows a checkpoint saved on SIGTERM: the pod is replaced and resumes there.
EXIT_SUCCESS: Final = 0
EXIT_TRAINER_ERROR: Final = 1
EXIT_INTERRUPTED: Final = 130  # 128 + SIGINT: a local run stopped with Ctrl-C
EXIT_PREEMPTED: Final = 143

# The numeric user (and group) of trainer pods and of both trainer images. 65532, as the
# operator image and distroless' "nonroot": outside the range of a host's human users
# (1000 is usually the first), so files it writes on a local or hostPath volume belong to
# no login on the node, and the images and the pod security context cannot disagree.
TRAINER_UID: Final = 65532

# Kubeflow training-operator (PyTorchJob) names the pod must use.
PYTORCHJOB_API_VERSION: Final = "kubeflow.org/v1"
PYTORCHJOB_CONTAINER: Final = "pytorch"
PYTORCHJOB_PORT_NAME: Final = "pytorchjob-port"
PYTORCHJOB_PORT: Final = 23456

# The Unsloth default LoRA target set (seed: "Unsloth's 7-module set").
UNSLOTH_DEFAULT_TARGET_MODULES: Final = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
