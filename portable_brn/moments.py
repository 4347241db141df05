"""Per-feature mean and biased variance, and their exact merge.

Statistics are computed in float32 for float16/bfloat16 inputs and in the input's
dtype otherwise.  ``merge_moments`` pools the moments of several batches exactly
(Chan et al.'s parallel update), which serves recalibration, the deferred update of
recurrent use and any sum across replicas.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from .inputs import floating_namespace, per_feature_namespace
from .layout import Layout, make_layout

__all__ = ["Moments", "accumulator_dtype", "compute_dtype", "merge_moments", "moments"]

ReplicaMean = Callable[[Any], Any] | None


class Moments(NamedTuple):
    """Per-feature ``mean`` and biased ``var`` of ``count`` elements each."""

    mean: Any
    var: Any
    count: Any


def compute_dtype(xp: Any, dtype: Any) -> Any:
    """The dtype statistics are kept in: float32 for 16-bit floats, else ``dtype``."""
    return dtype if xp.finfo(dtype).bits >= 32 else xp.float32


def as_compute(xp: Any, x: Any) -> Any:
    """``x`` in its compute dtype, without a copy when it already is."""
    dtype = compute_dtype(xp, x.dtype)
    return x if x.dtype == dtype else xp.astype(x, dtype)


def accumulator_dtype(xp: Any, dtype: Any) -> Any:
    """float64 for sums of float32 data where the namespace has it, else ``dtype``.

    Long float32 reductions (NumPy adds outer axes one by one) drift by more than the
    SPEC's 1e-5 at channels-last sizes; a wide accumulator costs little on a CPU.
    """
    if dtype == xp.float32 and "float64" in xp.__array_namespace_info__().dtypes():
        return xp.float64
    return dtype


def reduce_sum(xp: Any, array: Any, axes: tuple[int, ...], accumulator: Any,
               count: int = 1) -> Any:
    """Sum over ``axes`` (kept as size 1) in ``accumulator``, divided by ``count`` before
    it is returned in the input's dtype (so a mean rounds once, not twice)."""
    total = xp.sum(array, axis=axes, keepdims=True, dtype=accumulator)
    if count != 1:
        total = total / count
    return total if total.dtype == array.dtype else xp.astype(total, array.dtype)


def view_moments(xp: Any, view: Any, layout: Layout, replica_mean: ReplicaMean = None,
                 accumulator: Any = None) -> tuple[Any, Any]:
    """Mean and biased variance of ``view`` over the reduced axes, keeping dims (two
    passes, summed in ``accumulator``, default :func:`accumulator_dtype`).

    ``replica_mean`` averages a per-feature array over replicas of equal batch size, so
    both moments become those of the global batch.
    """
    axes = layout.reduce_axes
    accumulator = accumulator or accumulator_dtype(xp, view.dtype)
    mean = reduce_sum(xp, view, axes, accumulator, layout.count)
    if replica_mean is not None:
        mean = replica_mean(mean)
    centered = view - mean
    var = reduce_sum(xp, centered * centered, axes, accumulator, layout.count)
    if replica_mean is not None:
        var = replica_mean(var)
    return mean, var


def moments(x: Any, feature_axis: int | tuple[int, ...] = 1, *,
            micro_batch: int | None = None) -> Moments:
    """Per-feature mean and biased variance of ``x`` over every non-feature axis.

    With ``micro_batch`` the result has a leading axis, one entry per group.
    """
    xp = floating_namespace("x", x)
    # one value per feature is a valid (zero-variance) sample here, unlike in training
    layout = make_layout(x.shape, feature_axis, micro_batch, training=micro_batch is not None)
    view = xp.reshape(as_compute(xp, x), layout.view_shape)
    mean, var = view_moments(xp, view, layout)
    shape = ((layout.view_shape[0],) if layout.grouped else ()) + layout.feature_shape
    return Moments(xp.reshape(mean, shape), xp.reshape(var, shape), layout.count)


def merge_two(a: Moments, b: Moments) -> Moments:
    """Exact moments of the union of two disjoint sets (Chan et al.)."""
    count = a.count + b.count
    delta = b.mean - a.mean
    weight_b = b.count / count
    mean = a.mean + delta * weight_b
    var = (a.var * (a.count / count) + b.var * weight_b
           + delta * delta * (a.count / count) * weight_b)
    return Moments(mean, var, count)


def merge_moments(parts: Iterable[Moments], *, name: str = "parts") -> Moments:
    """Exact pooled mean and biased variance of all ``parts`` together.

    Every part must share the first one's library, device and feature shape; errors call
    the parts ``name[i]``.
    """
    parts = iter(parts)
    first = pooled = next(parts, None)
    if first is None:
        raise ValueError(f"{name} must not be empty, got nothing to merge")
    for index, part in enumerate(parts, start=1):
        per_feature_namespace(**{f"{name}[0]": first.mean, f"{name}[{index}]": part.mean})
        pooled = merge_two(pooled, part)
    return pooled
