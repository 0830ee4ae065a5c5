"""Failure reporting: a one-line reason in the termination log and a non-zero exit.

Kubernetes copies /dev/termination-log into the container status, where the
operator (and `kubectl describe`) show it; `KUBETUNE_TERMINATION_LOG` redirects
it for local runs and tests.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from kubetune_api import constants as c
from kubetune_trainer.common.config import ConfigError

# The kubelet reads at most 4096 bytes of the termination message.
MAX_REASON_CHARS = 1000


class TrainerError(RuntimeError):
    """A failure whose message is already the user-facing reason (no traceback needed)."""


class Preempted(Exception):
    """Stopped by a signal after saving a checkpoint; a restarted pod resumes there."""


def one_line(reason: str) -> str:
    line = " ".join(reason.split())
    return line[: MAX_REASON_CHARS - 3] + "..." if len(line) > MAX_REASON_CHARS else line


def write_termination_log(reason: str) -> Path | None:
    """Write the reason; returns the file written, or None when no log is writable here."""
    path = Path(os.environ.get(c.ENV_TERMINATION_LOG, c.TERMINATION_LOG))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(one_line(reason) + "\n", encoding="utf-8")
    except OSError:
        return None
    return path


def run_with_termination_log(main_fn: Callable[[], int | None]) -> NoReturn:
    """Run the trainer's main; on failure write the reason and exit non-zero.

    Exit codes (kubetune_api.constants, the operator's restart policies use the same):
    main's return value (EXIT_SUCCESS when None), EXIT_PREEMPTED on Preempted,
    EXIT_TRAINER_ERROR on any other exception, EXIT_INTERRUPTED on KeyboardInterrupt;
    SystemExit passes through (with a reason when non-zero).
    """
    try:
        code = main_fn()
    except Preempted as exc:
        print(f"kubetune-trainer: {exc}", file=sys.stderr, flush=True)
        write_termination_log(str(exc))
        sys.exit(c.EXIT_PREEMPTED)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            write_termination_log(f"exited with {exc.code}")
        raise
    except KeyboardInterrupt:
        write_termination_log("interrupted")
        sys.exit(c.EXIT_INTERRUPTED)
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, (TrainerError, ConfigError)):
            traceback.print_exc()
        print(f"kubetune-trainer: failed: {reason}", file=sys.stderr, flush=True)
        write_termination_log(reason)
        sys.exit(c.EXIT_TRAINER_ERROR)
    sys.exit(int(code or c.EXIT_SUCCESS))
