"""Per-feature mean and biased variance, and their exact merge.

Statistics are computed in float32 for float16/bfloat16 inputs and in the input's
dtype otherwise.  ``merge_moments`` pools the moments of several batches exactly
(Chan et al.'s parallel update), which serves recalibration, the deferred update of
recurrent use and any sum across replicas.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from array_api_compat import array_namespace, device

from .inputs import check_same_device, floating_namespace, namespace_of, per_feature_namespace
from .layout import Layout, make_layout

__all__ = ["Moments", "accumulator_dtype", "compute_dtype", "mask_as_view", "masked_view_moments",
           "merge_moments", "moments"]

ReplicaMean = Callable[[Any], Any] | None


class Moments(NamedTuple):
    """Per-feature ``mean`` and biased ``var`` of ``count`` elements each (an int, or a
    per-feature array when a mask made the counts differ)."""

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
    the specification's 1e-5 at channels-last sizes; a wide accumulator costs little on a CPU.
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


def masked_view_moments(xp: Any, view: Any, mask: Any, layout: Layout,
                        replica_mean: ReplicaMean = None) -> tuple[Any, Any, Any]:
    """Mean, biased variance and count of the elements of ``view`` where ``mask`` (a
    boolean array of the view's shape) is True, per feature (per group), keeping dims.

    A feature with no counted element gets NaN moments (0 / 0), which the non-finite
    guard then keeps out of the state.  ``replica_mean`` as for :func:`view_moments`:
    sums and counts are averaged over replicas, so their ratio is the global mean.
    """
    axes, accumulator = layout.reduce_axes, accumulator_dtype(xp, view.dtype)
    zero = xp.zeros((), dtype=view.dtype, device=device(view))
    count = reduce_sum(xp, xp.astype(mask, view.dtype), axes, accumulator)
    total = reduce_sum(xp, xp.where(mask, view, zero), axes, accumulator)
    if replica_mean is not None:
        count, total = replica_mean(count), replica_mean(total)
    counted = count > 0
    divisor = xp.where(counted, count, xp.ones_like(count))  # 0 / 0 without a warning
    mean = xp.where(counted, total / divisor, xp.nan)
    centered = xp.where(mask, view - mean, zero)
    squares = reduce_sum(xp, centered * centered, axes, accumulator)
    if replica_mean is not None:
        squares = replica_mean(squares)
    return mean, xp.where(counted, squares / divisor, xp.nan), count


def moments(x: Any, feature_axis: int | tuple[int, ...] = 1, *,
            micro_batch: int | None = None, mask: Any = None) -> Moments:
    """Per-feature mean and biased variance of ``x`` over every non-feature axis.

    With ``micro_batch`` the result has a leading axis, one entry per group.  With
    ``mask`` (boolean, broadcastable to ``x``) only the elements where it is True count,
    and ``count`` is a per-feature (per-group) array.
    """
    xp = floating_namespace("x", x)
    # one value per feature is a valid (zero-variance) sample here, unlike in training
    layout = make_layout(x.shape, feature_axis, micro_batch, training=micro_batch is not None)
    view = xp.reshape(as_compute(xp, x), layout.view_shape)
    shape = ((layout.view_shape[0],) if layout.grouped else ()) + layout.feature_shape
    if mask is None:
        mean, var = view_moments(xp, view, layout)
        return Moments(xp.reshape(mean, shape), xp.reshape(var, shape), layout.count)
    mask_view = mask_as_view(xp, mask, x, layout)
    mean, var, count = masked_view_moments(xp, view, mask_view, layout)
    return Moments(xp.reshape(mean, shape), xp.reshape(var, shape), xp.reshape(count, shape))


def mask_as_view(xp: Any, mask: Any, x: Any, layout: Layout) -> Any:
    """``mask`` checked (a boolean array of ``x``'s library and device that broadcasts
    to ``x``), broadcast to ``x``'s shape and viewed like ``x``."""
    namespace_of(x=x, mask=mask)
    check_same_device(x=x, mask=mask)
    if mask.dtype != xp.bool:
        raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}")
    try:
        full = xp.broadcast_to(mask, tuple(x.shape))
    except (ValueError, RuntimeError, TypeError) as error:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, which does not broadcast to "
                         f"x's shape {tuple(x.shape)}") from error
    return xp.reshape(full, layout.view_shape)


def merge_two(a: Moments, b: Moments) -> Moments:
    """Exact moments of the union of two disjoint sets (Chan et al.).  With per-feature
    counts (masks) a side that counted nothing for a feature contributes nothing there,
    and a feature neither side counted stays NaN with count 0."""
    if isinstance(a.count, (int, float)) and isinstance(b.count, (int, float)):
        count = a.count + b.count
        weight_a, weight_b = a.count / count, b.count / count
        a_mean, b_mean = a.mean, b.mean
    else:
        xp = array_namespace(a.mean, b.mean)
        count_a, count_b = a.count + xp.zeros_like(a.mean), b.count + xp.zeros_like(b.mean)
        count = count_a + count_b
        divisor = xp.where(count > 0, count, xp.ones_like(count))
        weight_a, weight_b = count_a / divisor, count_b / divisor
        a_mean = xp.where(count_a > 0, a.mean, b.mean)  # an empty side adds no delta
        b_mean = xp.where(count_b > 0, b.mean, a_mean)
        a, b = a._replace(var=xp.where(count_a > 0, a.var, b.var)), b._replace(
            var=xp.where(count_b > 0, b.var, a.var))
    delta = b_mean - a_mean
    mean = a_mean + delta * weight_b
    var = a.var * weight_a + b.var * weight_b + delta * delta * weight_a * weight_b
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
