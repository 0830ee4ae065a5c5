"""Transient failures: what is worth retrying, and the per-job retry with backoff.

A watch event is delivered once: a request that times out or meets a busy API server
must not lose the job. Such a pass is retried for that job alone, with backoff
(0.5 s doubling to 60 s), and kopf never sees the error. A refusal (a quota, an
admission policy) is retried too, on a slower backoff (jobs.py, `_refused`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial

import aiohttp

from kubetune.controller import metrics
from kubetune.controller.kubeclient import ApiError
from kubetune.controller.reconcile_state import JobKey, ReconcilerState

log = logging.getLogger("kubetune.operator")

RETRY_FIRST_S = 0.5
RETRY_MAX_S = 60.0
# A refusal (quota, admission policy) changes only when someone acts: ask less often.
REFUSED_RETRY_FIRST_S = 5.0
REFUSED_RETRY_MAX_S = 600.0


def is_transient(err: BaseException) -> bool:
    """Worth retrying: the network, a timeout, a busy or failing API server, or RBAC
    that an administrator may still grant."""
    if isinstance(err, aiohttp.ClientError | asyncio.TimeoutError):
        return True
    if not isinstance(err, ApiError):
        return False
    return err.status >= 500 or err.status == 429 or (err.status == 403 and err.refusal is None)


class RetryPasses(ReconcilerState):
    """Runs a job's pass so that a transient error retries it later instead of reaching kopf;
    the metrics of every pass (kubetune.controller.metrics) are counted here."""

    async def _guarded(self, key: JobKey, step: Callable[[], Awaitable[None]]) -> None:
        started = time.monotonic()
        try:
            await step()
        except Exception as err:
            metrics.RECONCILE_SECONDS.labels(key[0]).observe(time.monotonic() - started)
            transient = is_transient(err)
            metrics.RECONCILE_PASSES.labels(key[0], "retry" if transient else "error").inc()
            if not transient:
                raise
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (failures - 1))
            # str() of a timeout is empty: name its type instead.
            log.warning("%s %s/%s: %s; retrying in %.1f s", *key, str(err) or type(err).__name__, delay)
            self._retry_later(key, delay)
        else:
            metrics.RECONCILE_SECONDS.labels(key[0]).observe(time.monotonic() - started)
            metrics.RECONCILE_PASSES.labels(key[0], "ok").inc()
            self._failures.pop(key, None)

    def _retry_later(self, key: JobKey, delay: float) -> None:
        if key in self._retries:
            return

        async def retry() -> None:
            await asyncio.sleep(delay)
            self._retries.pop(key, None)
            if key not in self.jobs:
                return
            async with self._lock(key):
                if key in self.jobs:
                    await self._guarded(key, partial(self._reconcile, key))

        self._retries[key] = asyncio.create_task(retry())

    async def retry_waiting(self) -> None:
        for key in list(self.waiting):
            if key not in self.jobs:
                continue  # deleted meanwhile: taking its lock would make the lock again
            async with self._lock(key):
                if key in self.jobs:
                    await self._guarded(key, partial(self._reconcile, key))
