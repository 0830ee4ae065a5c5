"""Progress to the job's status (docs/CONTRACT.md section 3), with stdlib urllib + ssl only.

The patch is built as `kubetune_api.status.Progress`, the model the CRD's status schema and
the operator's admission policy are generated from, and dumped by alias.

The trainer image carries no Kubernetes client: one JSON merge patch on the
job's `/status` with the pod's service-account token is all it needs. A failed
patch is logged and never fails training.
"""

from __future__ import annotations

import json
import math
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune_api.status import MAX_CHECKPOINTS, Checkpoint, Progress, ProgressPoint
from kubetune_trainer.common.config import KubernetesProgress, TrainerConfig

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MIN_INTERVAL_S = 10.0
HISTORY_POINTS = 50
PATCH_TIMEOUT_S = 5.0
# Rates are measured over the last RATE_WINDOW steps: long enough to smooth one slow step
# (a checkpoint, a validation), short enough to follow a change (a node that got slower).
RATE_WINDOW = 20


def human_duration(seconds: int) -> str:
    """12m, 3h05m, 2d04h: what fits a `kubectl get` column."""
    if seconds < 60:
        return f"{seconds}s"
    minutes, _ = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


@dataclass(frozen=True)
class Rates:
    seconds_per_step: float
    tokens_per_second: float | None


def rates(marks: Sequence[tuple[float, int, float | None]]) -> Rates | None:
    """Step time and token rate between the first and last (time, step, tokens seen) mark.
    None until two marks with time and steps between them exist."""
    if len(marks) < 2:
        return None
    (t0, s0, _), (t1, s1, _) = marks[0], marks[-1]
    if t1 <= t0 or s1 <= s0:
        return None
    # Tokens between the first and last marks that count them (a validation before the
    # first step, for one, does not).
    counted = [(t, k) for t, _, k in marks if k is not None]
    tokens = None
    if len(counted) >= 2:
        (ta, ka), (tb, kb) = counted[0], counted[-1]
        if tb > ta and kb >= ka:
            tokens = (kb - ka) / (tb - ta)
    return Rates((t1 - t0) / (s1 - s0), tokens)


def progress_patch(progress: Progress) -> dict[str, Any]:
    """`status.progress` of the merge patch: kubetune_api's model by alias (camelCase), fields
    without a value left out so that they keep what the last patch said."""
    return progress.model_dump(mode="json", by_alias=True, exclude_none=True)


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def rfc3339(timestamp: float) -> str:
    """A POSIX timestamp as status writes times (seconds, UTC)."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_checkpoint(
    cfg: TrainerConfig,
    directory: Path,
    *,
    step: int,
    epoch: float | None,
    committed_at: float,
    validation_loss: float | None = None,
) -> Checkpoint:
    """One checkpoint under `paths.output` as the job's status lists it: its path on the output
    claim (what a user mounts), not the pod's mount path, which no one outside the pod sees."""
    on_claim = f"{cfg.metadata.output_subpath}/{directory.relative_to(cfg.paths.output).as_posix()}"
    return Checkpoint(
        step=int(step),
        epoch=round(float(epoch), 4) if epoch is not None else None,
        time=rfc3339(committed_at),
        validation_loss=_finite(validation_loss),
        path=on_claim,
    )


class ProgressReporter:
    """Sends `status.progress` patches, at most one per `min_interval_s`, plus one on close().

    `ProgressReporter.from_config(cfg)` gives a reporter that does nothing when
    progress.type is "none", on ranks other than 0, or outside a cluster.
    """

    def __init__(
        self,
        url: str | None,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        min_interval_s: float = MIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._token = token
        self._ssl_context = ssl_context
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._last_sent: float | None = None
        # The last point reported, and whether the status has not seen it (or a checkpoint change) yet.
        self._latest: Progress | None = None
        self._unsent = False
        # None: not known in this process, so a patch leaves the list as the last one said.
        self._checkpoints: list[Checkpoint] | None = None
        self._history: list[ProgressPoint] = []
        self._last_train_loss: float | None = None
        self._last_validation_loss: float | None = None
        # (clock, step, tokens seen) at each new step: the rates' window.
        self._marks: deque[tuple[float, int, float | None]] = deque(maxlen=RATE_WINDOW + 1)
        self.patches_sent = 0
        self.patches_failed = 0

    @classmethod
    def disabled(cls) -> ProgressReporter:
        return cls(None)

    @classmethod
    def from_config(
        cls,
        cfg: TrainerConfig,
        *,
        rank: int | None = None,
        service_account_dir: Path = SERVICE_ACCOUNT_DIR,
        api_server: str | None = None,
    ) -> ProgressReporter:
        """Build the reporter the config asks for.

        rank defaults to $RANK (torchrun) or 0. `api_server` overrides the
        in-cluster address (https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT).
        """
        if rank is None:
            rank = int(os.environ.get("RANK", "0"))
        target = cfg.progress
        if not isinstance(target, KubernetesProgress) or rank != 0:
            return cls.disabled()
        if api_server is None:
            host = os.environ.get("KUBERNETES_SERVICE_HOST")
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                print(
                    "kubetune-trainer: progress.type is kubernetes but KUBERNETES_SERVICE_HOST is unset; "
                    "progress will not be reported",
                    file=sys.stderr,
                    flush=True,
                )
                return cls.disabled()
            # An IPv6 service address needs brackets in a URL.
            api_server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        token_file = service_account_dir / "token"
        ca_file = service_account_dir / "ca.crt"
        token = token_file.read_text().strip() if token_file.exists() else None
        context: ssl.SSLContext | None = None
        if api_server.startswith("https://"):
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file.exists() else None)
        return cls(f"{api_server.rstrip('/')}{target.status_path}", token=token, ssl_context=context)

    @property
    def enabled(self) -> bool:
        return self.url is not None

    def report(
        self,
        *,
        step: int,
        max_steps: int | None = None,
        epoch: float | None = None,
        train_loss: float | None = None,
        validation_loss: float | None = None,
        tokens_seen: float | None = None,
    ) -> None:
        """Record a point; send a patch when the last one is at least min_interval_s old.

        `tokens_seen`: training tokens processed so far by this process's run (any origin;
        only differences count), for tokensPerSecond."""
        if not self.enabled:
            return
        if not self._marks or int(step) > self._marks[-1][1]:
            self._marks.append((self._clock(), int(step), tokens_seen))
        train_loss = _finite(train_loss)
        validation_loss = _finite(validation_loss)
        if train_loss is not None:
            self._last_train_loss = train_loss
        if validation_loss is not None:
            self._last_validation_loss = validation_loss
        if train_loss is not None or validation_loss is not None:
            last = self._history[-1] if self._history else None
            if last is not None and last.step == int(step):  # a validation point at a train step's step
                self._history[-1] = ProgressPoint(
                    step=last.step,
                    train_loss=train_loss if train_loss is not None else last.train_loss,
                    validation_loss=validation_loss if validation_loss is not None else last.validation_loss,
                )
            else:
                self._history.append(
                    ProgressPoint(step=int(step), train_loss=train_loss, validation_loss=validation_loss)
                )
            del self._history[:-HISTORY_POINTS]
        measured = rates(self._marks)
        planned = int(max_steps) if max_steps is not None else None
        percent = eta = None
        summary = str(int(step))  # What `kubectl get` shows (a printer column cannot compute).
        if planned is not None:
            percent = min(100, 100 * int(step) // max(planned, 1))
            summary = f"{int(step)}/{planned} ({percent}%)"
            if measured is not None:
                eta = round(measured.seconds_per_step * max(planned - int(step), 0))
                summary = f"{percent}% · ETA {human_duration(eta)}"
        self._latest = Progress(
            step=int(step),
            max_steps=planned,
            epoch=round(float(epoch), 4) if epoch is not None else None,
            train_loss=self._last_train_loss,
            validation_loss=self._last_validation_loss,
            percent=percent,
            seconds_per_step=round(measured.seconds_per_step, 4) if measured is not None else None,
            tokens_per_second=(
                round(measured.tokens_per_second, 1)
                if measured is not None and measured.tokens_per_second is not None
                else None
            ),
            eta_seconds=eta,
            summary=summary,
        )
        self._unsent = True
        self._send_when_due()

    def checkpoints_changed(self, checkpoints: Sequence[Checkpoint]) -> None:
        """The checkpoints that are on the output claim now; the next patch carries the newest
        MAX_CHECKPOINTS, oldest first.

        The trainer reads them from disk after each save and once at start, rather than this
        reporter adding up saves: the list then drops what the trainer's own retention removed
        (a listed path is one a user can mount) and a restarted pod starts from the ones its
        predecessors left. Sent with the next step's patch, or now if the interval allows and a
        step was reported: a patch sets `updatedAt`, which the operator reads as "a step
        finished" (the Stalled condition), so none goes out before this process made a step."""
        if not self.enabled:
            return
        by_step = {c.step: c for c in checkpoints}  # one per step, as the CRD's list map requires
        newest = [by_step[s] for s in sorted(by_step)][-MAX_CHECKPOINTS:]
        if newest == self._checkpoints:
            return
        self._checkpoints = newest
        self._unsent = True
        if self._latest is not None:
            self._send_when_due()

    def close(self) -> None:
        """Send what the status has not seen yet (the final point per the contract)."""
        if self.enabled and self._unsent and self._latest is not None:
            self._send()

    def _send_when_due(self) -> None:
        now = self._clock()
        if self._last_sent is None or now - self._last_sent >= self._min_interval_s:
            self._send()

    def _send(self) -> None:
        assert self.url is not None and self._latest is not None
        update: dict[str, Any] = {"updated_at": rfc3339(time.time()), "history": list(self._history)}
        if self._checkpoints is not None:
            # An empty list is sent too: a merge patch replaces the whole list, so the status
            # drops checkpoints the trainer removed.
            update["checkpoints"] = list(self._checkpoints)
        progress = self._latest.model_copy(update=update)
        body = json.dumps({"status": {"progress": progress_patch(progress)}}).encode()
        request = urllib.request.Request(self.url, data=body, method="PATCH")
        request.add_header("Content-Type", "application/merge-patch+json")
        request.add_header("Accept", "application/json")
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        self._last_sent = self._clock()
        self._unsent = False
        try:
            with urllib.request.urlopen(request, timeout=PATCH_TIMEOUT_S, context=self._ssl_context) as response:
                response.read()
            self.patches_sent += 1
        except (urllib.error.URLError, OSError, ValueError) as exc:
            self.patches_failed += 1
            print(
                f"kubetune-trainer: progress patch to {self.url} failed (training continues): {exc}",
                file=sys.stderr,
                flush=True,
            )
