"""Exact population statistics after training (patent claims 14, 15 and 18).

Replaces the moving averages with the pooled mean and standard deviation of every
example in an iterable of batches, possibly from a new domain, one batch at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .config import RenormConfig
from .inputs import check_floating, namespace_of
from .moments import Moments, merge_two, moments
from .state import RenormState

__all__ = ["recalibrate"]


def recalibrate(batches: Iterable[Any], config: RenormConfig, *,
                state: RenormState | None = None) -> RenormState:
    """State whose mean and std are the exact statistics of all ``batches`` together.

    ``std = sqrt(pooled biased variance + eps)``.  The step (and dtype) come from
    ``state`` when given; otherwise the step is 0 and the dtype the compute dtype.
    """
    pooled: Moments | None = None
    for index, batch in enumerate(batches):
        xp = namespace_of(batch=batch)
        check_floating(xp, f"batches[{index}]", batch)
        part = moments(batch, config.feature_axis)
        if pooled is not None and tuple(part.mean.shape) != tuple(pooled.mean.shape):
            raise ValueError(f"batches[{index}] has {tuple(part.mean.shape)} features but "
                             f"earlier batches had {tuple(pooled.mean.shape)}")
        pooled = part if pooled is None else merge_two(pooled, part)
    if pooled is None:
        raise ValueError("batches must yield at least one batch, got none")
    std = xp.sqrt(pooled.var + config.eps)
    if state is None:
        step = xp.zeros((), dtype=xp.__array_namespace_info__().default_dtypes()["integral"])
        return RenormState(pooled.mean, std, step)
    xp = namespace_of(mean=state.mean, batch=pooled.mean)
    if tuple(state.mean.shape) != tuple(pooled.mean.shape):
        raise ValueError(f"state has {tuple(state.mean.shape)} features but the batches "
                         f"have {tuple(pooled.mean.shape)}")
    return RenormState(xp.astype(pooled.mean, state.mean.dtype),
                       xp.astype(std, state.std.dtype), state.step)
