"""The local cluster for tests, benchmarks and `make cluster-up`: a real control plane on
loopback, kwok nodes, and optionally a real kubelet node (hack/cluster/README.md).

Importable as `localcluster` with hack/cluster on PYTHONPATH, which hack/run-in-venv.sh
and the Makefile set (mypy: MYPYPATH in hack/test.sh). The CLI is this package's
`__main__`: `python3 -m localcluster up|down|status|kubeconfig|volume`.
"""

from localcluster.cluster import (
    CLUSTER_DNS_IP,
    CONTAINERD_MINOR,
    CPU_NODES,
    FAKE_DURATION_ANNOTATION,
    FAKE_EXIT_CODE_ANNOTATION,
    FAKE_FAIL_ANNOTATION,
    GPU_NODES,
    NODE_IP,
    POD_CIDR,
    REAL_NODE,
    REAL_NODE_GPUS,
    REAL_NODE_LABEL,
    REAL_NODE_TAINT,
    REAL_STORAGE_CLASS,
    STORAGE_CLASS,
    ClusterError,
    ComponentDied,
    LocalCluster,
    free_port,
    main,
    read_versions,
    running_cluster,
)

__all__ = [
    "CLUSTER_DNS_IP",
    "CONTAINERD_MINOR",
    "CPU_NODES",
    "FAKE_DURATION_ANNOTATION",
    "FAKE_EXIT_CODE_ANNOTATION",
    "FAKE_FAIL_ANNOTATION",
    "GPU_NODES",
    "NODE_IP",
    "POD_CIDR",
    "REAL_NODE",
    "REAL_NODE_GPUS",
    "REAL_NODE_LABEL",
    "REAL_NODE_TAINT",
    "REAL_STORAGE_CLASS",
    "STORAGE_CLASS",
    "ClusterError",
    "ComponentDied",
    "LocalCluster",
    "free_port",
    "main",
    "read_versions",
    "running_cluster",
]
