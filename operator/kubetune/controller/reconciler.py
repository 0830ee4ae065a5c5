"""The reconciler: validate → resolve → build → create-or-get → write status once.

The handlers (handlers.py) feed it watch events; it keeps no state it could not
rebuild from the API server: children have fixed names and are created with
create-or-get, and every status write is computed whole from what the job, its
entities and its child say now. So a killed operator resumes where it left off
and never makes a second child.

One class, one concern per module:

| module | what |
|---|---|
| reconcile_state.py | the in-memory tables, the lock per job |
| retry.py | transient failures: retry with backoff; the pass metrics |
| world.py | entities, claims and volumes as the watches know them (pure) |
| entities.py | entity, claim and volume events; entity status; initializers; a job's claim checks |
| initializer.py | the builders of an entity's initializer (download Job and its identity; pure) |
| children.py | child and pod events; suspend; the output Model |
| jobs.py | job events, resync, the job's pass and its status writes |
"""

from __future__ import annotations

from kubetune.controller.children import job_key_of
from kubetune.controller.jobs import JobPasses
from kubetune.controller.reconcile_state import PER_JOB_TABLES, EventPoster, JobKey

__all__ = ["PER_JOB_TABLES", "EventPoster", "JobKey", "Reconciler", "job_key_of"]


class Reconciler(JobPasses):
    """The operator's one reconciler, what the handlers call: `on_job`, `forget_job`,
    `on_child`, `on_pod`, `on_entity`, `on_claim`, `on_volume`, `prime_children`,
    `resync`; `tables` and `job_phases` for the metrics.

    Mixins over one shared state rather than objects that call each other: every
    concern reads and writes the same per-job tables under the same per-job lock, and
    each starts the same pass (`_reconcile`); as mixins, the method bodies stay as
    they were, with no plumbing of the state or of callbacks between the parts."""
