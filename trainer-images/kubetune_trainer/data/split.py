"""Held-out validation split when the job names no validation fileset."""

from __future__ import annotations

import random
from typing import TypeVar

from kubetune_trainer.data.files import DataError

T = TypeVar("T")

HOLDOUT_FRACTION = 0.05
MAX_HOLDOUT = 1000


def holdout_split(items: list[T], *, seed: int, fraction: float = HOLDOUT_FRACTION) -> tuple[list[T], list[T]]:
    """(train, validation): a seeded random `fraction` (at least 1, at most 1000) held out.

    The same seed and items give the same split on every rank and on every
    restart, which resume depends on.
    """
    if len(items) < 2:
        raise DataError(
            f"the training set has {len(items)} usable example(s); a validation split needs at least 2 "
            "(add rows or name a validation fileset in dataset.validation)"
        )
    count = min(MAX_HOLDOUT, max(1, int(len(items) * fraction)))
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    train = [item for i, item in enumerate(items) if i not in held]
    validation = [item for i, item in enumerate(items) if i in held]
    return train, validation
