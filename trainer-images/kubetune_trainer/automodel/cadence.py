"""When the Automodel loop validates (and checkpoints): `schedule.val_check_interval` as the seed means it.

- null, or exactly 1: once per epoch, after its last step.
- below 1, a fraction f of an epoch: after the steps where f, 2f, 3f, ... of the
  epoch is first reached (the first step at or past each point), and after the
  epoch's last step: 0.5 over a 5-step epoch validates after steps 3 and 5, and
  again after 8 and 10 in the second epoch. The points restart with each epoch,
  so an epoch length that f does not divide does not shift them.
- a whole number n from 2 up: after every n optimizer steps, counted from the
  start of training, and after each epoch's last step.

Every validation but the run's last is followed by a checkpoint, so every epoch
end has both. The value's meaning depends on its number only, never on its JSON
type: `kubectl` turns a YAML `1.0` into `1` and the API server stores a JSON
`1.0` as `1`, so 1 and 1.0 cannot be told apart and both mean one epoch (never
"every step"; a fraction no larger than 1 / steps-per-epoch validates every step).
The schema refuses a non-whole number above 1.

Fractions are taken from the value's shortest decimal form (0.1 is 1/10), so
0.1 of a 10-step epoch is every step, not "step 4" by a rounding error.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class ValidationCadence:
    """The steps after which the loop validates and saves a checkpoint."""

    steps_per_epoch: int
    # Steps within an epoch, counted from 1, after which to validate; always holds steps_per_epoch.
    in_epoch: frozenset[int]
    # A step count: also validate after every `every` optimizer steps since the start.
    every: int | None

    def validates_after(self, step: int) -> bool:
        """Whether the loop validates after global optimizer step `step` (1-based)."""
        if step <= 0:
            return False
        if self.every is not None and step % self.every == 0:
            return True
        return (step - 1) % self.steps_per_epoch + 1 in self.in_epoch

    def describe(self) -> str:
        """For the trainer's log: the cadence in steps."""
        steps = sorted(self.in_epoch)
        if self.every is not None:
            return f"every {self.every} steps and at each epoch end (every {self.steps_per_epoch} steps)"
        if steps == [self.steps_per_epoch]:
            return f"at each epoch end (every {self.steps_per_epoch} steps)"
        shown = ", ".join(str(s) for s in steps) if len(steps) <= 8 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"
        return f"{len(steps)} times per {self.steps_per_epoch}-step epoch, after its steps {shown}"


def validation_cadence(val_check_interval: float | None, steps_per_epoch: int) -> ValidationCadence:
    """The cadence of `schedule.val_check_interval` (the module docstring) for epochs of `steps_per_epoch` steps."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
    epoch_end = frozenset({steps_per_epoch})
    if val_check_interval is None or val_check_interval == 1:
        return ValidationCadence(steps_per_epoch, epoch_end, None)
    if val_check_interval > 1:
        if not float(val_check_interval).is_integer():
            # The schema refuses this; a hand-written config must not get a silent rounding.
            raise ValueError(
                f"schedule.val_check_interval {val_check_interval} is neither a fraction below 1 nor a whole number "
                "of steps"
            )
        return ValidationCadence(steps_per_epoch, epoch_end, int(val_check_interval))
    if val_check_interval <= 0:
        raise ValueError(f"schedule.val_check_interval must be above 0, got {val_check_interval}")
    # Points k*f of the epoch lie at k*f*L steps. The first step at or past a point is the
    # first s whose count of points reached, floor(s / (f*L)), grows: integer arithmetic on
    # the exact fraction, so an epoch of odd length (2.5 steps for 0.5 of 5) rounds up, always.
    per_point = Fraction(repr(float(val_check_interval))) * steps_per_epoch
    reached = [(s * per_point.denominator) // per_point.numerator for s in range(steps_per_epoch + 1)]
    steps = {s for s in range(1, steps_per_epoch + 1) if reached[s] > reached[s - 1]}
    return ValidationCadence(steps_per_epoch, frozenset(steps) | epoch_end, None)
