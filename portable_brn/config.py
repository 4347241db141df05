"""The hyperparameters of Batch Renormalization as one frozen, validated object."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .schedules import ScheduleLike

__all__ = ["RenormConfig"]

FeatureAxis = int | tuple[int, ...]


def _require_number(name: str, value: object, *, low: float, high: float = math.inf,
                    low_open: bool = False, high_open: bool = False,
                    allow_inf: bool = False) -> None:
    """Raise a ``ValueError``/``TypeError`` naming ``name`` unless low <(=) value <(=) high;
    NaN never passes, +inf only with ``allow_inf`` (a limit of inf: no clipping)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    infinite = value == math.inf and not allow_inf
    if too_low or too_high or infinite or math.isnan(value):
        closed = allow_inf if high == math.inf else not high_open
        left, right = "(" if low_open else "[", "]" if closed else ")"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {value!r}")


def _require_schedule(name: str, value: object, *, low: float, high: float = math.inf,
                      low_open: bool = False, allow_inf: bool = False) -> None:
    """Check a float or schedule; schedules with a known range are checked over it."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        _require_number(name, value, low=low, high=high, low_open=low_open,
                        allow_inf=allow_inf)
        return
    if not callable(value):
        raise TypeError(f"{name} must be a number or a schedule (a callable of the step), "
                        f"got {value!r}")
    value_range = getattr(value, "value_range", None)
    if value_range is not None:
        for end in value_range():
            _require_number(f"{name} (schedule value)", end, low=low, high=high,
                            low_open=low_open, allow_inf=allow_inf)


def _require_int(name: str, value: object, *, low: int) -> None:
    """Raise a ``TypeError``/``ValueError`` naming ``name`` unless value is an int >= low."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


def _check_feature_axis(feature_axis: object) -> None:
    """An int or a non-empty tuple of distinct ints (the range is checked per input)."""
    axes = feature_axis if isinstance(feature_axis, tuple) else (feature_axis,)
    if not axes:
        raise ValueError("feature_axis must name at least one axis, got ()")
    for axis in axes:
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"feature_axis must be an int or a tuple of ints, got {feature_axis!r}")
    if len(set(axes)) != len(axes):
        raise ValueError(f"feature_axis has a repeated axis: {feature_axis!r}")


@dataclass(frozen=True)
class RenormConfig:
    """Everything that shapes the computation (specification sections 2 and 5), checked once here.

    ``momentum`` is the paper's update rate alpha, the weight of the new batch statistic: a
    number or a schedule (``schedules.cumulative_average()`` is torch's ``momentum=None``).
    ``r_max``, ``d_max`` and ``r_min`` take a number or a schedule (see ``schedules``);
    ``r_min=None`` means ``1 / r_max``.  ``r_max`` and ``d_max`` may be ``math.inf``: no
    clipping on that side (``r_max=inf`` makes the derived ``r_min`` 0, so r is not
    clipped at all; warm-up still gives r = 1, d = 0 exactly).
    """

    feature_axis: FeatureAxis = 1
    eps: float = 1e-3
    momentum: ScheduleLike = 0.01
    r_max: ScheduleLike = 3.0
    d_max: ScheduleLike = 5.0
    r_min: ScheduleLike | None = None
    warmup_steps: int = 0
    micro_batch: int | None = None
    output_clip: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.feature_axis, list):
            object.__setattr__(self, "feature_axis", tuple(self.feature_axis))
        _check_feature_axis(self.feature_axis)
        _require_number("eps", self.eps, low=0.0, low_open=True)
        _require_schedule("momentum", self.momentum, low=0.0, high=1.0, low_open=True)
        _require_schedule("r_max", self.r_max, low=1.0, allow_inf=True)
        _require_schedule("d_max", self.d_max, low=0.0, allow_inf=True)
        if self.r_min is not None:
            _require_schedule("r_min", self.r_min, low=0.0, high=1.0, low_open=True)
        _require_int("warmup_steps", self.warmup_steps, low=0)
        if self.micro_batch is not None:
            _require_int("micro_batch", self.micro_batch, low=1)
        if self.output_clip is not None:
            self._check_output_clip()

    def _check_output_clip(self) -> None:
        """A ``(low, high)`` pair of real numbers with low < high, stored as floats."""
        clip = self.output_clip
        if not isinstance(clip, (tuple, list)) or len(clip) != 2:
            raise TypeError(f"output_clip must be a (low, high) pair, got {clip!r}")
        low, high = clip
        for end in clip:
            if isinstance(end, bool) or not isinstance(end, numbers.Real) or math.isnan(end):
                raise TypeError(f"output_clip must hold two real numbers, got {clip!r}")
        if not low < high:
            raise ValueError(f"output_clip needs low < high, got {clip!r}")
        object.__setattr__(self, "output_clip", (float(low), float(high)))
