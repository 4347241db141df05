"""Clip limits as functions of the training step, traceable under ``jit``.

A schedule is any callable mapping the step counter, given as a 0-d floating
array, to a value (a 0-d array or a Python float).  The ones here use array
operations only, never a Python branch on the step, so the same schedule runs
eagerly, under ``jax.jit`` and under ``torch.compile``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace

__all__ = ["Constant", "CumulativeAverage", "Linear", "Schedule", "ScheduleLike", "constant",
           "cumulative_average", "linear", "paper"]

Schedule = Callable[[Any], Any]
ScheduleLike = float | Schedule


@dataclass(frozen=True)
class Constant:
    """The same value at every step."""

    value: float

    def __call__(self, step: Any) -> float:
        return self.value

    def value_range(self) -> tuple[float, float]:
        """The smallest and largest value the schedule takes."""
        return (self.value, self.value)


@dataclass(frozen=True)
class Linear:
    """``start_value`` until ``start_step``, a straight line to ``end_value`` at
    ``end_step``, constant afterwards.  An infinite end (``math.inf``: no clipping) makes
    the value infinite strictly inside the ramp, as the line's limit, with no ``inf * 0``."""

    start_value: float
    end_value: float
    start_step: int
    end_step: int

    def __post_init__(self) -> None:
        if math.isnan(self.start_value) or math.isnan(self.end_value):
            raise ValueError(f"Linear schedule values must not be NaN, got start_value="
                             f"{self.start_value!r}, end_value={self.end_value!r}")
        if not 0 <= self.start_step < self.end_step:
            raise ValueError(
                "Linear schedule needs 0 <= start_step < end_step, got "
                f"start_step={self.start_step!r}, end_step={self.end_step!r}"
            )

    def __call__(self, step: Any) -> Any:
        xp = array_namespace(step)
        span = float(self.end_step - self.start_step)
        progress = xp.clip((step - float(self.start_step)) / span, 0.0, 1.0)
        start, end = self.start_value, self.end_value
        if math.isfinite(start) and math.isfinite(end):
            return start + (end - start) * progress
        inside = xp.full_like(progress, start + end)  # the infinite end (NaN: -inf to inf)
        return xp.where(progress <= 0.0, xp.full_like(progress, start),
                        xp.where(progress >= 1.0, xp.full_like(progress, end), inside))

    def value_range(self) -> tuple[float, float]:
        """The smallest and largest value the schedule takes."""
        return (min(self.start_value, self.end_value), max(self.start_value, self.end_value))


@dataclass(frozen=True)
class CumulativeAverage:
    """A momentum of ``1 / (t + 1)`` at step ``t``: after ``n`` updates the moving statistic
    is the plain mean of the ``n`` batch statistics (``torch.nn.BatchNorm*d``'s
    ``momentum=None``).  Its values lie in (0, 1]."""

    def __call__(self, step: Any) -> Any:
        return 1.0 / (step + 1.0)


def constant(value: float) -> Constant:
    """A schedule that always returns ``value``."""
    return Constant(float(value))


def linear(start_value: float, end_value: float, start_step: int, end_step: int) -> Linear:
    """A linear ramp from ``start_value`` at ``start_step`` to ``end_value`` at ``end_step``."""
    return Linear(float(start_value), float(end_value), int(start_step), int(end_step))


def cumulative_average() -> CumulativeAverage:
    """The momentum schedule of a cumulative moving average (torch's ``momentum=None``)."""
    return CumulativeAverage()


def paper() -> dict[str, Linear]:
    """The paper's schedule (section 4): batch norm (r_max=1, d_max=0) for 5,000 steps,
    then r_max rises to 3 at step 40,000 and d_max to 5 at step 25,000.

    Use as ``RenormConfig(**schedules.paper())``.
    """
    return {"r_max": linear(1.0, 3.0, 5_000, 40_000), "d_max": linear(0.0, 5.0, 5_000, 25_000)}
