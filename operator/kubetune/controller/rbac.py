"""The permissions the operator needs, as data: the Helm chart's Role/ClusterRole
and the tests read this one list. No wildcard verbs, resources or groups."""

from __future__ import annotations

from typing import Any

from kubetune_api import constants as c

OPERATOR_RULES: list[dict[str, Any]] = [
    # The kinds it watches. No get, patch or update: it reads them from its watches and
    # writes only their status (a trainer's progress is the trainer's own write).
    {
        "apiGroups": [c.GROUP],
        "resources": ["automodeljobs", "unslothjobs", "models", "filesets"],
        "verbs": ["list", "watch"],
    },
    # Status: phase, conditions, child, output of jobs; readiness of entities. `get` is
    # there because the per-job trainer Role grants it, and RBAC lets a Role grant only
    # what its creator holds.
    {
        "apiGroups": [c.GROUP],
        "resources": ["automodeljobs/status", "unslothjobs/status", "models/status", "filesets/status"],
        "verbs": ["get", "patch"],
    },
    # ownerReferences with blockOwnerDeletion need this where OwnerReferencesPermissionEnforcement is on.
    {
        "apiGroups": [c.GROUP],
        "resources": ["automodeljobs/finalizers", "unslothjobs/finalizers"],
        "verbs": ["update"],
    },
    # The output Model entity of a finished job (get: whose is a Model of that name, after a 409).
    {"apiGroups": [c.GROUP], "resources": ["models"], "verbs": ["get", "create"]},
    # The workloads: a PyTorchJob (multi-GPU / multi-node) or a batch Job (one GPU).
    # get after a create answered 409; patch passes suspend on.
    {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"], "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch"]},
    # The config file mounted into the pods, and each job's least-privilege trainer identity.
    {"apiGroups": [""], "resources": ["configmaps", "serviceaccounts"], "verbs": ["get", "create"]},
    {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": ["get", "create"]},
    # Why a pod does not start (unschedulable, image pull) and whether a claim is bound.
    {"apiGroups": [""], "resources": ["pods", "persistentvolumeclaims"], "verbs": ["list", "watch"]},
    # Events for `kubectl describe`; list: a child's FailedCreate (its pods refused).
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["list", "create", "patch"]},
]

# Cluster-scoped reads, granted by a ClusterRole in either scope (a Role cannot grant a
# cluster-scoped resource): which volume backs a claim, to mount an entity shared from
# another namespace only through a claim on the same volume (docs/OPERATOR.md).
VOLUME_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["persistentvolumes"], "verbs": ["list", "watch"]},
]

# In the operator's own namespace (a Role in either scope): the Lease of --leader-elect.
LEADER_ELECTION_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]},
]
