"""Exact population statistics after training (patent claims 14, 15 and 18).

Replaces the moving averages with the pooled mean and standard deviation of every
example in an iterable of batches, possibly from a new domain, one batch at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import count
from typing import Any

from array_api_compat import device

from .config import RenormConfig
from .inputs import floating_namespace, namespace_of, per_feature_namespace
from .layout import make_layout
from .moments import Moments, merge_moments, moments
from .state import RenormState, zero_step

__all__ = ["recalibrate"]


_END = object()  # an exhausted iterable


def _paired(batches: Iterable[Any], masks: Iterable[Any] | None) -> Iterator[tuple[Any, Any]]:
    """``(batch, mask)`` pairs (mask None without ``masks``); a ``ValueError`` naming both
    when ``masks`` does not hold one mask per batch."""
    if masks is None:
        yield from ((batch, None) for batch in batches)
        return
    batch_iter, mask_iter = iter(batches), iter(masks)
    for index in count():
        batch, mask = next(batch_iter, _END), next(mask_iter, _END)
        if batch is _END and mask is _END:
            return
        if batch is _END or mask is _END:
            more, fewer = ("masks", "batches") if batch is _END else ("batches", "masks")
            raise ValueError(f"masks must hold one mask per batch, but {more} has more "
                             f"entries than {fewer} ({index})")
        yield batch, mask


def _batch_moments(batches: Iterable[Any], masks: Iterable[Any] | None,
                   config: RenormConfig) -> Iterator[Moments]:
    """The moments of each batch (over its mask's counted elements), after checking it
    is a floating array of a shape ``feature_axis`` fits (errors name ``batches[i]``) and
    its mask (errors name ``masks[i]``)."""
    for index, (batch, mask) in enumerate(_paired(batches, masks)):
        floating_namespace(f"batches[{index}]", batch)
        try:
            make_layout(tuple(batch.shape), config.feature_axis, training=False)
        except ValueError as error:
            raise ValueError(f"batches[{index}]: {error}") from error
        try:
            yield moments(batch, config.feature_axis, mask=mask)
        except (TypeError, ValueError) as error:
            if mask is None:
                raise
            raise type(error)(f"masks[{index}]: {error}") from error


def recalibrate(batches: Iterable[Any], config: RenormConfig, *,
                state: RenormState | None = None,
                masks: Iterable[Any] | None = None) -> RenormState:
    """State whose mean and std are the exact statistics of all ``batches`` together.

    ``std = sqrt(pooled biased variance + eps)``.  The step (and dtype) come from
    ``state`` when given; otherwise the step is 0 and the dtype the compute dtype.
    Every batch must share the first one's library, device and features.  ``masks``,
    one per batch, restrict the statistics to the counted elements; a feature no batch
    counted keeps ``state``'s statistics (NaN without a ``state``).
    """
    pooled = merge_moments(_batch_moments(batches, masks, config), name="batches")
    xp = namespace_of(batches=pooled.mean)
    std = xp.sqrt(pooled.var + config.eps)
    if state is None:
        return RenormState(pooled.mean, std, zero_step(xp, device(pooled.mean)))
    per_feature_namespace(**{"batches": pooled.mean, "state.mean": state.mean,
                             "state.std": state.std})
    counted = xp.isfinite(pooled.mean) & xp.isfinite(std)
    return RenormState(xp.where(counted, xp.astype(pooled.mean, state.mean.dtype), state.mean),
                       xp.where(counted, xp.astype(std, state.std.dtype), state.std),
                       state.step)
