"""The permissions the operator needs, as data: `make generate` writes them into the
Helm chart (files/operator*-rules.yaml, read by templates/rbac.yaml) and the tests read
them. No wildcard verbs, resources or groups.

The kubetune.io resources come from the table of kinds (api/resources.py), so a new
kind gets its permissions without a second list to keep in step."""

from __future__ import annotations

from typing import Any

from kubetune.api.resources import JOB_RESOURCES, MODEL, RESOURCES
from kubetune_api import constants as c

_PLURALS = [r.plural for r in RESOURCES]
_JOB_PLURALS = [r.plural for r in JOB_RESOURCES]

OPERATOR_RULES: list[dict[str, Any]] = [
    # The kinds it watches. No get, patch or update: it reads them from its watches and
    # writes only their status (a trainer's progress is the trainer's own write).
    {
        "apiGroups": [c.GROUP],
        "resources": _PLURALS,
        "verbs": ["list", "watch"],
    },
    # Status: phase, conditions, child, output of jobs; readiness of entities. `get` is
    # there because the per-job trainer Role grants it, and RBAC lets a Role grant only
    # what its creator holds.
    {
        "apiGroups": [c.GROUP],
        "resources": [f"{plural}/status" for plural in _PLURALS],
        "verbs": ["get", "patch"],
    },
    # ownerReferences with blockOwnerDeletion need this where OwnerReferencesPermissionEnforcement is on.
    {
        "apiGroups": [c.GROUP],
        "resources": [f"{plural}/finalizers" for plural in _JOB_PLURALS],
        "verbs": ["update"],
    },
    # The output Model entity of a finished job (get: whose is a Model of that name, after a 409).
    {"apiGroups": [c.GROUP], "resources": [MODEL.plural], "verbs": ["get", "create"]},
    # The workloads: a PyTorchJob (multi-GPU / multi-node) or a batch Job (one GPU).
    # get after a create answered 409; patch passes suspend on.
    {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"], "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch"]},
    # The config file mounted into the pods, and each job's least-privilege trainer identity.
    {"apiGroups": [""], "resources": ["configmaps", "serviceaccounts"], "verbs": ["get", "create"]},
    {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": ["get", "create"]},
    # Why a pod does not start (unschedulable, image pull) and whether a claim is bound.
    {"apiGroups": [""], "resources": ["pods", "persistentvolumeclaims"], "verbs": ["list", "watch"]},
    # spec.restart_stalled: a stalled trainer's pods are evicted (not deleted: the Eviction
    # API honours PodDisruptionBudgets and marks the pods DisruptionTarget).
    {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
    # Events for `kubectl describe`; list: a child's FailedCreate (its pods refused).
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["list", "create", "patch"]},
]

# Cluster-scoped reads, granted by a ClusterRole in either scope (a Role cannot grant a
# cluster-scoped resource): which volume backs a claim, to mount an entity shared from
# another namespace only through a claim on the same volume (docs/OPERATOR.md).
VOLUME_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["persistentvolumes"], "verbs": ["list", "watch"]},
    # The GPU size for the memory check: nodes labelled by GPU feature discovery, listed at
    # each resync (docs/OPERATOR.md, "Memory pre-flight check").
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]},
]

# In the operator's own namespace (a Role in either scope): the Lease of --leader-elect.
LEADER_ELECTION_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]},
]
