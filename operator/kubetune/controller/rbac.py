"""The permissions the operator needs, as data: the Helm chart's Role/ClusterRole
and the tests read this one list. No wildcard verbs, resources or groups."""

from __future__ import annotations

from typing import Any

from kubetune import constants as c

OPERATOR_RULES: list[dict[str, Any]] = [
    # The jobs it reconciles, and their status (conditions, phase, child, output).
    {
        "apiGroups": [c.GROUP],
        "resources": ["automodeljobs", "unslothjobs", "models", "filesets"],
        "verbs": ["get", "list", "watch", "patch"],
    },
    {
        "apiGroups": [c.GROUP],
        "resources": ["automodeljobs/status", "unslothjobs/status", "models/status", "filesets/status"],
        "verbs": ["get", "patch", "update"],
    },
    # ownerReferences with blockOwnerDeletion need this where OwnerReferencesPermissionEnforcement is on.
    {
        "apiGroups": [c.GROUP],
        "resources": ["automodeljobs/finalizers", "unslothjobs/finalizers"],
        "verbs": ["update"],
    },
    # The output Model entity of a finished job.
    {"apiGroups": [c.GROUP], "resources": ["models"], "verbs": ["create"]},
    # The workloads: a PyTorchJob (multi-GPU / multi-node) or a batch Job (one GPU).
    {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"], "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch"]},
    # The config file mounted into the pods, and each job's least-privilege trainer identity.
    {"apiGroups": [""], "resources": ["configmaps", "serviceaccounts"], "verbs": ["get", "create"]},
    {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": ["get", "create"]},
    # Why a pod does not start (unschedulable, image pull) and whether a claim is bound.
    {"apiGroups": [""], "resources": ["pods", "persistentvolumeclaims"], "verbs": ["get", "list", "watch"]},
    # Events for `kubectl describe`.
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
]
