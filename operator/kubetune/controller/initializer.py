"""Pure builders of an entity's initializer: the Job that downloads its `spec.source` into
its `storage.pvc` (`python -m kubetune_fetch`), and the identity that Job runs as.

Choices made on purpose (docs/OPERATOR.md, "Entities that download themselves"):
- One Job per entity and version of its source: every job naming the entity shares it. Its
  name carries a digest of the entity's uid and the whole source (credentials' Secret names
  included), so a changed revision, a re-created entity or a new Secret gets a new Job, and
  the same entity seen again (an operator restart) gets the same one (create-or-get).
- The source is pinned in the Job's arguments: the Job downloads the version it was made for.
- Retries: restartPolicy OnFailure with backoffLimit INITIALIZER_BACKOFF_LIMIT. The kubelet
  restarts the container with its crash-loop backoff (10 s doubling to 5 min), each attempt
  resuming the partial files; no failed pods pile up. After the last attempt the Job fails
  and the entity keeps the last cause; deleting the Job makes the operator start a new one.
- Identity: a ServiceAccount per entity whose Role may get and patch that entity's status
  only (as a trainer's may its job's); no token of it reaches any other pod.
- Image: the operator's own image by default (--initializer-image): it carries kubetune_api
  and kubetune_fetch with their pinned clients, so the initializer adds no image to build,
  scan or mirror into an air-gapped registry.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from kubetune.api.resources import BY_KIND
from kubetune.controller.builders import (
    RESTRICTED_CONTAINER_SECURITY,
    RESTRICTED_POD_SECURITY,
    InitializerSettings,
    status_writer_identity,
)
from kubetune_api import constants as c

INITIALIZER_BACKOFF_LIMIT = 10


@dataclass(frozen=True, kw_only=True)
class EntityRef:
    """The entity an initializer is for, as the watch delivered it."""

    kind: str
    namespace: str
    name: str
    uid: str
    spec: Mapping[str, Any]

    @property
    def source(self) -> Mapping[str, Any]:
        source: Mapping[str, Any] = self.spec["source"]
        return source


def _label_safe(name: str, limit: int) -> str:
    return re.sub(r"[^a-z0-9-]", "-", name.lower())[:limit].strip("-") or "x"


def initializer_name(entity: EntityRef) -> str:
    """`<entity>-<model|fileset>-fetch-<digest>`, within 63 characters (the Job's pods carry
    it in a label): the digest covers the uid and the whole source."""
    identity = json.dumps({"uid": entity.uid, "source": entity.source}, sort_keys=True)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:8]
    return f"{_label_safe(entity.name, 36)}-{entity.kind.lower()}-fetch-{digest}"


def identity_name(entity: EntityRef) -> str:
    """The ServiceAccount and Role: one per entity, whatever its versions."""
    return f"{_label_safe(entity.name, 200)}-{entity.kind.lower()}-fetch"


def initializer_labels(entity: EntityRef) -> dict[str, str]:
    return {
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
        c.LABEL_ENTITY_KIND: entity.kind,
        # Label values are at most 63 characters; the name is there to find things by, the Job's
        # arguments say exactly which entity it is.
        c.LABEL_ENTITY_NAME: _label_safe(entity.name, 63),
    }


def _metadata(entity: EntityRef, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": entity.namespace,
        "labels": initializer_labels(entity),
        # Deleting the entity deletes its initializer. No blockOwnerDeletion: that would need
        # update on the entity's finalizers, which the operator has no other use for.
        "ownerReferences": [
            {
                "apiVersion": c.API_VERSION,
                "kind": entity.kind,
                "name": entity.name,
                "uid": entity.uid,
                "controller": True,
            }
        ],
    }


def build_initializer_identity(entity: EntityRef) -> list[dict[str, Any]]:
    """ServiceAccount, Role (get and patch this entity's status, nothing else), RoleBinding."""
    name = identity_name(entity)
    return status_writer_identity(
        partial(_metadata, entity), entity.namespace, name, name, (BY_KIND[entity.kind].plural, entity.name)
    )


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def initializer_env(entity: EntityRef, settings: InitializerSettings) -> list[dict[str, Any]]:
    """The credentials from the entity's Secrets, under the names the clients read themselves."""
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # The Hub client's caches and token file: on the writable scratch volume, not the read-only root.
        {"name": "HF_HOME", "value": "/tmp/hf"},
    ]
    hf = entity.source.get("huggingface")
    s3 = entity.source.get("s3")
    if hf is not None:
        if settings.hf_endpoint:
            env.append({"name": c.ENV_HF_ENDPOINT, "value": settings.hf_endpoint})
        token = hf.get("tokenSecret")
        if token:
            env.append(_secret_env(c.ENV_HF_TOKEN, token["name"], token.get("key", "token")))
    if s3 is not None:
        secret = (s3.get("credentialsSecret") or {}).get("name")
        if secret:
            access, key, session = c.AWS_CREDENTIAL_KEYS
            env += [
                _secret_env(access, secret, access),
                _secret_env(key, secret, key),
                _secret_env(session, secret, session, optional=True),  # only temporary keys have one
            ]
    return env


def build_initializer_job(entity: EntityRef, settings: InitializerSettings) -> dict[str, Any]:
    """The batch Job that downloads the entity's source into its claim (the claim's
    `storage.pvc.path` mounted at FETCH_MOUNT), reporting to the entity's status."""
    pvc = entity.spec["storage"]["pvc"]
    mount: dict[str, Any] = {"name": "files", "mountPath": c.FETCH_MOUNT}
    if pvc.get("path"):
        mount["subPath"] = pvc["path"]
    command = [
        "python",
        "-m",
        "kubetune_fetch",
        f"--kind={entity.kind}",
        f"--namespace={entity.namespace}",
        f"--name={entity.name}",
        f"--uid={entity.uid}",
        f"--source={json.dumps(entity.source, sort_keys=True, separators=(',', ':'))}",
        f"--root={c.FETCH_MOUNT}",
    ]
    container = {
        "name": "fetch",
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": command,
        "env": initializer_env(entity, settings),
        # A download is network- and disk-bound: a little CPU, memory for the chunks in flight.
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": [mount, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": RESTRICTED_CONTAINER_SECURITY,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(entity, initializer_name(entity)),
        "spec": {
            "backoffLimit": INITIALIZER_BACKOFF_LIMIT,
            "template": {
                "metadata": {"labels": initializer_labels(entity)},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "serviceAccountName": identity_name(entity),
                    "securityContext": RESTRICTED_POD_SECURITY,
                    "containers": [container],
                    "volumes": [
                        {"name": "files", "persistentVolumeClaim": {"claimName": pvc["claimName"]}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def build_initializer(entity: EntityRef, settings: InitializerSettings) -> list[dict[str, Any]]:
    """Every object of an initializer, in creation order (the Job last)."""
    return [*build_initializer_identity(entity), build_initializer_job(entity, settings)]
