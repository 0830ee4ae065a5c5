"""Fixtures of the Automodel training tier (see automodel_helpers)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from automodel_helpers import make_job, status_server, task_data, task_validation

__all__ = ["make_job", "status_server", "task_data", "task_validation"]
