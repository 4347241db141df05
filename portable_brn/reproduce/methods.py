"""The two normalizations compared: batch norm and Batch Renormalization.

Both are the same layer of the core, so the comparison is fair on every backend:
batch norm *is* Batch Renormalization with ``r_max = 1`` and ``d_max = 0`` (r = 1 and
d = 0 at every step).  Everything else is shared: ``eps``, the micro-batching of the
regime, and the moving-average rate ``MOMENTUM``.

Choices for a run of a few thousand steps instead of the paper's 130,000 or more:

- ``MOMENTUM`` (the paper's alpha) is 0.05 instead of 0.01: the moving statistics must
  follow a network that changes quickly, and Batch Renormalization trains on them.
- The paper's schedule (section 4: batch norm for 5,000 steps, then ``r_max`` linear to
  3 at step 40,000 and ``d_max`` linear to 5 at step 25,000) is kept in shape but
  scaled to the run: plain batch norm for the first ``WARMUP`` of the steps, then
  ``d_max`` reaches 5 at ``D_MAX_AT`` and ``r_max`` reaches 3 at ``R_MAX_AT`` of them.
  Scaling keeps the schedule meaningful for any ``--steps``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from portable_brn import schedules

__all__ = ["EPS", "METHODS", "MOMENTUM", "Method", "batch_norm_limits", "renorm_limits"]

EPS = 1e-3
MOMENTUM = 0.05
R_MAX, D_MAX = 3.0, 5.0
WARMUP, D_MAX_AT, R_MAX_AT = 0.1, 0.3, 0.5


def batch_norm_limits(steps: int) -> dict[str, Any]:
    """r clipped to [1, 1] and d to [0, 0]: exactly batch norm."""
    return {"r_max": 1.0, "d_max": 0.0}


def renorm_limits(steps: int) -> dict[str, Any]:
    """The paper's warm-up and linear ramps, scaled to a run of ``steps`` steps."""
    start = round(WARMUP * steps)

    def end(fraction: float) -> int:
        return max(start + 1, round(fraction * steps))

    return {"r_max": schedules.linear(1.0, R_MAX, start, end(R_MAX_AT)),
            "d_max": schedules.linear(0.0, D_MAX, start, end(D_MAX_AT))}


@dataclass(frozen=True)
class Method:
    """A normalization: its name and its clip limits for a run of ``steps`` steps."""

    key: str
    title: str
    limits: Callable[[int], dict[str, Any]]

    def options(self, steps: int, micro_batch: int | None) -> dict[str, Any]:
        """Keyword options of the core's ``RenormConfig`` for this method and regime."""
        return {"eps": EPS, "momentum": MOMENTUM, "micro_batch": micro_batch,
                **self.limits(steps)}


METHODS = (
    Method("batch_norm", "batch norm", batch_norm_limits),
    Method("batch_renorm", "batch renorm", renorm_limits),
)
