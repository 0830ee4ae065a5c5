"""Pieces shared by the Automodel and Unsloth trainers.

Nothing here imports torch at import time: the Unsloth image pins a different
stack, and the config/progress/termination code must work before torch loads.
"""

from kubetune_trainer.common.config import (
    AutomodelTrainerConfig,
    ConfigError,
    TrainerConfig,
    TrainerPaths,
    UnslothTrainerConfig,
    expect_kind,
    load_config,
)
from kubetune_trainer.common.metrics import MetricsWriter
from kubetune_trainer.common.progress import ProgressReporter
from kubetune_trainer.common.signals import StopSignal
from kubetune_trainer.common.termination import TrainerError, run_with_termination_log, write_termination_log

__all__ = [
    "AutomodelTrainerConfig",
    "ConfigError",
    "MetricsWriter",
    "ProgressReporter",
    "StopSignal",
    "TrainerConfig",
    "TrainerError",
    "TrainerPaths",
    "UnslothTrainerConfig",
    "expect_kind",
    "load_config",
    "run_with_termination_log",
    "write_termination_log",
]
