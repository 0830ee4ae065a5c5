"""schedule.val_check_interval as the seed means it: the steps after which the loop validates.

The training run that shows the same on real steps (and the checkpoints) is
test_outputs.py::test_validation_and_checkpoints_follow_the_cadence_over_odd_epochs.
"""

from __future__ import annotations

import pytest

from kubetune_trainer.automodel.cadence import validation_cadence

pytestmark = pytest.mark.training


def steps(val_check_interval: float | None, steps_per_epoch: int, epochs: int = 2) -> list[int]:
    cadence = validation_cadence(val_check_interval, steps_per_epoch)
    return [s for s in range(1, steps_per_epoch * epochs + 1) if cadence.validates_after(s)]


@pytest.mark.parametrize(
    "interval,steps_per_epoch,expected",
    [
        # 0.5: mid-epoch and the epoch's end, in every epoch, also when the length is odd
        # (the first step at or past the midpoint: 3 of 5, 4 of 7).
        (0.5, 4, [2, 4, 6, 8]),
        (0.5, 5, [3, 5, 8, 10]),
        (0.5, 7, [4, 7, 11, 14]),
        (0.5, 1, [1, 2]),  # one-step epochs: the midpoint and the end are the same step
        # 0.25 of 7 steps: points at 1.75, 3.5, 5.25 and 7.
        (0.25, 7, [2, 4, 6, 7, 9, 11, 13, 14]),
        # 1/f not whole: f, 2f, 3f, then the end (0.3 of 10: 3, 6, 9, 10).
        (0.3, 10, [3, 6, 9, 10, 13, 16, 19, 20]),
        # Exact decimal arithmetic: 0.1 of 10 steps is every step (3 * 0.1 is no "3.0000000000000004").
        (0.1, 10, list(range(1, 21))),
        (0.01, 3, [1, 2, 3, 4, 5, 6]),  # a fraction below 1 / steps per epoch: every step
        # Null and 1 (written 1 or 1.0): once per epoch, never every step.
        (None, 5, [5, 10]),
        (1.0, 5, [5, 10]),
        (1, 5, [5, 10]),
        # A whole number from 2: a step count from the start, plus every epoch end.
        (3, 5, [3, 5, 6, 9, 10]),
        (3.0, 5, [3, 5, 6, 9, 10]),
        (2, 4, [2, 4, 6, 8]),
        (100, 5, [5, 10]),
    ],
)
def test_validation_steps(interval: float | None, steps_per_epoch: int, expected: list[int]) -> None:
    assert steps(interval, steps_per_epoch) == expected


def test_one_written_as_integer_or_float_is_the_same_cadence() -> None:
    """The API server stores 1.0 as 1: the cadence must not depend on which arrived."""
    assert validation_cadence(1, 9) == validation_cadence(1.0, 9) == validation_cadence(None, 9)
    assert validation_cadence(4, 9) == validation_cadence(4.0, 9)


@pytest.mark.parametrize("interval", [1.5, 0.0, -0.5])
def test_values_the_schema_refuses_are_refused_here_too(interval: float) -> None:
    with pytest.raises(ValueError, match="val_check_interval"):
        validation_cadence(interval, 5)


def test_the_log_says_the_steps() -> None:
    assert validation_cadence(0.5, 5).describe() == "2 times per 5-step epoch, after its steps 3, 5"
    assert validation_cadence(None, 5).describe() == "at each epoch end (every 5 steps)"
    assert validation_cadence(3, 5).describe() == "every 3 steps and at each epoch end (every 5 steps)"
    assert validation_cadence(0.01, 100).describe() == "100 times per 100-step epoch, after its steps 1, 2, ..., 100"
