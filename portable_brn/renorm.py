"""Batch Renormalization: training forward, inference forward and backward pass.

Pure functions: state comes in and new state goes out, nothing is mutated, and no
Python branch depends on an array value, so they trace under ``jax.jit`` and
``torch.compile``.  Specification sections 2-5 are the contract; the folded form
``y = x * scale + shift`` keeps full-size temporaries to a minimum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from .config import RenormConfig
from .inputs import (
    check_floating,
    check_param,
    check_same_device,
    namespace_of,
    per_feature_namespace,
)
from .kernels import kernel_for
from .layout import Layout, make_layout
from .moments import (
    Moments,
    ReplicaMean,
    as_compute,
    compute_dtype,
    mask_as_view,
    masked_view_moments,
    merge_moments,
    merge_two,
)
from .state import RenormState

__all__ = ["Residuals", "backward", "clip_limits", "deferred_update", "forward_infer",
           "forward_train", "momentum_at", "update_state"]


class Residuals(NamedTuple):
    """What ``backward`` needs from a training forward, plus what the caller may inspect.

    Per-feature arrays broadcast against ``x`` viewed as ``layout.view_shape``.
    ``moments`` are the batch's own (pooled over micro-batches) in the state's shape,
    ready for ``deferred_update``; ``finite`` is False for features whose batch
    statistic was NaN or Inf, whose moving statistics were therefore left as they were
    (the step counter advanced nonetheless).
    ``mask`` is the forward's mask in the view's shape (None: every element counted) and
    ``count`` the number of counted elements per statistic (an int without a mask).
    """

    x: Any
    batch_mean: Any
    batch_inv_std: Any
    r: Any
    d: Any
    weight: Any
    clipped_z: Any
    clip_mask: Any
    moments: Moments
    finite: Any
    layout: Layout
    replica_mean: ReplicaMean
    bias_dtype: Any
    mask: Any = None
    count: Any = None


def _check_call(x: Any, state: RenormState, weight: Any, bias: Any, layout_of: Callable) -> tuple:
    """Namespace, layout and compute dtype of one call, after checking every argument."""
    xp = namespace_of(x=x, mean=state.mean, std=state.std, weight=weight, bias=bias)
    check_floating(xp, "x", x)
    layout = layout_of(x.shape)
    for name, array in (("state.mean", state.mean), ("state.std", state.std),
                        ("weight", weight), ("bias", bias)):
        check_param(xp, name, array, layout.feature_shape)
    check_same_device(x=x, mean=state.mean, std=state.std, weight=weight, bias=bias)
    return xp, layout, compute_dtype(xp, x.dtype)


def _per_feature(xp: Any, array: Any, layout: Layout, dtype: Any) -> Any:
    """A state-shaped array in ``dtype``, shaped to broadcast against the view."""
    if array is None:
        return None
    array = array if array.dtype == dtype else xp.astype(array, dtype)
    return xp.reshape(array, layout.moving_stat_shape)


def _schedule_value(xp: Any, schedule: Any, step: Any) -> Any:
    """A clip limit at ``step`` (a 0-d float array) as a 0-d array of the step's dtype."""
    value = schedule(step) if callable(schedule) else schedule
    if isinstance(value, (int, float)):
        return xp.full_like(step, value)
    return value if value.dtype == step.dtype else xp.astype(value, step.dtype)


def _fold_affine(scale: Any, shift: Any, weight: Any, bias: Any) -> tuple[Any, Any]:
    """``weight * (x * scale + shift) + bias`` as one ``x * scale' + shift'``."""
    if weight is not None:
        scale, shift = scale * weight, shift * weight
    if bias is not None:
        shift = shift + bias
    return scale, shift


def clip_limits(config: RenormConfig, step: Any, dtype: Any) -> tuple[Any, Any, Any]:
    """``(r_min, r_max, d_max)`` at step ``t``, with warm-up folded in (r in [1, 1] and d in
    [0, 0] while ``t < warmup_steps``).

    Python floats when nothing depends on the step, so the common case costs no array
    operation; 0-d arrays of ``dtype`` otherwise (no Python branch on a value: traceable).
    """
    schedules = (config.r_max, config.d_max, config.r_min)
    if not config.warmup_steps and not any(callable(s) for s in schedules):
        r_max = float(config.r_max)
        r_min = 1.0 / r_max if config.r_min is None else float(config.r_min)
        return r_min, r_max, float(config.d_max)
    xp = namespace_of(step=step)
    t = xp.astype(step, dtype)
    r_max, d_max = _schedule_value(xp, config.r_max, t), _schedule_value(xp, config.d_max, t)
    r_min = 1.0 / r_max if config.r_min is None else _schedule_value(xp, config.r_min, t)
    if config.warmup_steps:
        warm = step < config.warmup_steps
        one, zero = xp.ones_like(t), xp.zeros_like(t)
        r_min, r_max = xp.where(warm, one, r_min), xp.where(warm, one, r_max)
        d_max = xp.where(warm, zero, d_max)
    return r_min, r_max, d_max


def momentum_at(config: RenormConfig, step: Any, dtype: Any) -> Any:
    """The update rate at step ``t`` (before the update): a Python float for a constant
    momentum, else the schedule's value as a 0-d array of ``dtype`` (traceable)."""
    if not callable(config.momentum):
        return config.momentum
    xp = namespace_of(step=step)
    return _schedule_value(xp, config.momentum, xp.astype(step, dtype))


def corrections(xp: Any, batch_mean: Any, batch_std: Any, mean: Any, std: Any, step: Any,
                config: RenormConfig) -> tuple[Any, Any]:
    """The clipped r and d of Algorithm 1 (r = 1, d = 0 during warm-up)."""
    r_min, r_max, d_max = clip_limits(config, step, batch_std.dtype)
    return (_clip(xp, batch_std / std, r_min, r_max),
            _clip(xp, (batch_mean - mean) / std, -d_max, d_max))


def _clip(xp: Any, value: Any, low: Any, high: Any) -> Any:
    """``clip`` as ``minimum(maximum(...))``: the same values (NaN stays NaN) at a fraction
    of the cost of some namespaces' ``clip`` wrappers on small arrays."""
    return xp.minimum(xp.maximum(value, low), high)


def _finite(xp: Any, batch_mean: Any, batch_std: Any) -> Any:
    """Per feature, whether both batch statistics are finite (else the state stays, while
    the step counter still advances)."""
    return xp.isfinite(batch_mean) & xp.isfinite(batch_std)


def _moved_state(xp: Any, state: RenormState, batch_mean: Any, batch_std: Any, finite: Any,
                 config: RenormConfig) -> RenormState:
    """``update_state`` on arguments already checked, with their ``finite`` flags."""

    momentum = momentum_at(config, state.step, batch_mean.dtype)

    def moved(old: Any, target: Any) -> Any:
        new = old + momentum * (target - old)
        return xp.where(finite, xp.astype(new, old.dtype, copy=False), old)

    step = xp.asarray(state.step + 1)  # NumPy turns 0-d arithmetic into a scalar
    return RenormState(moved(state.mean, batch_mean), moved(state.std, batch_std), step)


def update_state(state: RenormState, batch_mean: Any, batch_std: Any,
                 config: RenormConfig) -> tuple[RenormState, Any]:
    """Move the statistics toward the batch's by ``config.momentum`` (at the step before the
    update, for a schedule); step + 1.

    A feature whose batch statistic is not finite keeps its old statistics; the step
    counter advances all the same (on every backend), so warm-up and schedules count
    calls, not finite batches.  Returns the new state and the per-feature ``finite`` flags.
    """
    xp = per_feature_namespace(**{"state.mean": state.mean, "state.std": state.std,
                                  "batch_mean": batch_mean, "batch_std": batch_std})
    finite = _finite(xp, batch_mean, batch_std)
    return _moved_state(xp, state, batch_mean, batch_std, finite, config), finite


def deferred_update(state: RenormState, parts: Iterable[Moments],
                    config: RenormConfig) -> tuple[RenormState, Any]:
    """One update from the pooled moments of several calls (recurrent use: every
    timestep normalized with the same statistics, then one update from all of them)."""
    pooled = merge_moments(parts)
    xp = per_feature_namespace(**{"state.mean": state.mean, "state.std": state.std,
                                  "parts": pooled.mean})
    std = xp.sqrt(pooled.var + config.eps)
    finite = _finite(xp, pooled.mean, std)
    return _moved_state(xp, state, pooled.mean, std, finite, config), finite


def _pooled(xp: Any, mean: Any, var: Any, count: Any, layout: Layout) -> Moments:
    """Moments of the whole call from those of its micro-batches (``count`` elements
    each: the layout's, or per group and feature under a mask)."""
    if not isinstance(count, int):
        return _pooled_counted(xp, mean, var, count, layout)
    if layout.grouped:
        pooled_mean = xp.mean(mean, axis=0, keepdims=True)
        var = xp.mean(var + (mean - pooled_mean) ** 2, axis=0, keepdims=True)
        mean = pooled_mean
    count = layout.count * (layout.view_shape[0] if layout.grouped else 1)
    shape = layout.feature_shape
    return Moments(xp.reshape(mean, shape), xp.reshape(var, shape), count)


def _pooled_counted(xp: Any, mean: Any, var: Any, count: Any, layout: Layout) -> Moments:
    """``_pooled`` with per-group counts: groups weighted by what they counted, groups
    that counted nothing left out (NaN where no group counted anything)."""
    shape = layout.feature_shape
    if layout.grouped:
        merged = Moments(mean[0:1, ...], var[0:1, ...], count[0:1, ...])
        for group in range(1, layout.view_shape[0]):
            merged = merge_two(merged, Moments(mean[group:group + 1, ...],
                                               var[group:group + 1, ...],
                                               count[group:group + 1, ...]))
        mean, var, count = merged
    return Moments(xp.reshape(mean, shape), xp.reshape(var, shape), xp.reshape(count, shape))


def _group_mean(xp: Any, array: Any, layout: Layout) -> Any:
    """The mean over micro-batches of a per-group statistic, in the state's shape."""
    if layout.grouped:
        array = xp.mean(array, axis=0, keepdims=True)
    return xp.reshape(array, layout.feature_shape)


def forward_train(x: Any, state: RenormState, weight: Any, bias: Any, config: RenormConfig,
                  *, stop_gradient: Callable[[Any], Any] | None = None,
                  defer_update: bool = False, replica_mean: ReplicaMean = None,
                  mask: Any = None) -> tuple[Any, RenormState, Residuals]:
    """One training step of Algorithm 1: returns ``(y, new_state, residuals)``.

    ``stop_gradient`` is the framework's (r, d and the state update are wrapped in it).
    ``defer_update=True`` returns the state unchanged (recurrent use; see
    ``deferred_update``).  ``replica_mean`` averages a per-feature array over replicas,
    making the batch statistics those of the global batch; with ``micro_batch`` each
    micro-batch stays local to its replica and only the state update is averaged, so
    every replica still ends with the same moving statistics.  The step counter advances
    on every call, also when some (or all) features' batch statistics are NaN or Inf and
    their moving statistics are kept.

    ``mask`` (boolean, broadcastable to ``x``; True where an element counts) restricts
    the batch statistics, and so r, d and the state update, to the counted elements (per
    group with ``micro_batch``); every element still gets the same affine transform.  A
    feature or group that counted nothing has NaN statistics: its state stays, as for a
    non-finite batch.  With ``replica_mean`` the masked sums and counts are averaged
    over replicas, so the statistics are those of the global batch.
    """
    xp, layout, dtype = _check_call(
        x, state, weight, bias,
        lambda shape: make_layout(shape, config.feature_axis, config.micro_batch))
    no_grad = stop_gradient if stop_gradient is not None else (lambda a: a)
    batch_replica_mean = None if layout.grouped else replica_mean
    mask_view = None if mask is None else mask_as_view(xp, mask, x, layout)
    kernel = kernel_for(xp, batch_replica_mean)
    view = xp.reshape(x, layout.view_shape)

    count = layout.count
    if mask_view is None:
        batch_mean, batch_var = kernel.moments(xp, view, layout, batch_replica_mean)
    else:
        batch_mean, batch_var, count = masked_view_moments(
            xp, as_compute(xp, view), mask_view, layout, batch_replica_mean)
    batch_std = xp.sqrt(batch_var + config.eps)
    inv_std = 1.0 / batch_std
    mean = _per_feature(xp, state.mean, layout, dtype)
    std = _per_feature(xp, state.std, layout, dtype)
    r, d = corrections(xp, batch_mean, batch_std, mean, std, state.step, config)
    r, d = no_grad(r), no_grad(d)
    w, b = _per_feature(xp, weight, layout, dtype), _per_feature(xp, bias, layout, dtype)

    scale = r * inv_std
    shift = d - batch_mean * scale
    clipped_z = clip_mask = None
    if config.output_clip is None:
        y = kernel.affine(xp, view, *_fold_affine(scale, shift, w, b), x.dtype, layout)
    else:
        low, high = config.output_clip
        z = kernel.affine(xp, view, scale, shift, dtype, layout)
        clip_mask = (z >= low) & (z <= high)
        # z itself where it is within the bounds, ends included: differentiating the
        # forward (JAX's autodiff path) then passes the whole gradient at z == bound,
        # where clip's min/max would pass half of it (specification section 4: zero only beyond).
        clipped_z = xp.where(clip_mask, z, xp.clip(z, low, high))
        y = clipped_z if w is None else clipped_z * w
        y = y if b is None else y + b
        y = xp.astype(y, x.dtype)

    target_mean = no_grad(_group_mean(xp, batch_mean, layout))
    target_std = no_grad(_group_mean(xp, batch_std, layout))
    if layout.grouped and replica_mean is not None:
        target_mean, target_std = replica_mean(target_mean), replica_mean(target_std)
    finite = _finite(xp, target_mean, target_std)
    new_state = state if defer_update else _moved_state(xp, state, target_mean, target_std,
                                                        finite, config)
    saved_weight = None if weight is None else _per_feature(xp, weight, layout, weight.dtype)
    residuals = Residuals(view, batch_mean, inv_std, r, d, saved_weight, clipped_z, clip_mask,
                          _pooled(xp, no_grad(batch_mean), no_grad(batch_var), count, layout),
                          finite, layout, batch_replica_mean,
                          None if bias is None else bias.dtype, mask_view, count)
    return xp.reshape(y, x.shape), new_state, residuals


def forward_infer(x: Any, state: RenormState, weight: Any, bias: Any,
                  config: RenormConfig, *, mask: Any = None) -> Any:
    """Inference: ``weight * (x - mean) / std + bias`` with the moving statistics.

    ``mask`` is checked as in training and otherwise unused: inference computes no
    statistic, so every element gets the same transform (as ``flax.linen.BatchNorm``)."""
    xp, layout, dtype = _check_call(
        x, state, weight, bias,
        lambda shape: make_layout(shape, config.feature_axis, training=False))
    if mask is not None:
        mask_as_view(xp, mask, x, layout)
    scale = 1.0 / _per_feature(xp, state.std, layout, dtype)
    shift = -_per_feature(xp, state.mean, layout, dtype) * scale
    w, b = _per_feature(xp, weight, layout, dtype), _per_feature(xp, bias, layout, dtype)
    return kernel_for(xp).affine(xp, x, *_fold_affine(scale, shift, w, b), x.dtype, layout)


def backward(residuals: Residuals, dy: Any) -> tuple[Any, Any, Any]:
    """Gradients ``(dx, dweight, dbias)`` of specification section 4 from ``forward_train``'s
    residuals; ``dweight`` (``dbias``) is None when the forward had no weight (bias)."""
    res, layout = residuals, residuals.layout
    xp = namespace_of(dy=dy, x=res.x)
    if tuple(dy.shape) != layout.shape:
        raise ValueError(f"dy has shape {tuple(dy.shape)} but the forward input had "
                         f"shape {layout.shape}")
    check_floating(xp, "dy", dy)
    check_same_device(dy=dy, x=res.x)
    kernel = kernel_for(xp, res.replica_mean)
    grad = xp.reshape(dy, layout.view_shape)
    dtype = res.batch_inv_std.dtype

    def feature_sum(per_group: Any, param_dtype: Any) -> Any:
        """A per-group gradient summed over groups, shaped and typed like its parameter."""
        total = xp.sum(per_group, axis=0, keepdims=True) if layout.grouped else per_group
        return xp.astype(xp.reshape(total, layout.feature_shape), param_dtype)

    sum_g, sum_gc = kernel.grad_sums(xp, grad, res.x, res.batch_mean, res.batch_inv_std,
                                      layout)
    dbias = None if res.bias_dtype is None else feature_sum(sum_g, res.bias_dtype)
    dweight = None
    if res.weight is not None:
        if res.clip_mask is None:
            per_group = res.r * res.batch_inv_std * sum_gc + res.d * sum_g
        else:
            per_group = xp.sum(xp.astype(grad, dtype) * res.clipped_z, axis=layout.reduce_axes,
                               keepdims=True)
        dweight = feature_sum(per_group, res.weight.dtype)
    if res.clip_mask is not None:
        grad = xp.where(res.clip_mask, xp.astype(grad, dtype), xp.zeros_like(res.clipped_z))
        sum_g, sum_gc = kernel.grad_sums(xp, grad, res.x, res.batch_mean, res.batch_inv_std,
                                      layout)

    count = layout.count if res.mask is None else xp.where(  # nothing counted: NaN already
        res.count > 0, res.count, xp.ones_like(res.count))
    mean_g, mean_gc = sum_g / count, sum_gc / count
    if res.replica_mean is not None:
        mean_g, mean_gc = res.replica_mean(mean_g), res.replica_mean(mean_gc)
    scale = res.r * res.batch_inv_std
    if res.weight is not None:
        scale = scale * res.weight
    x_scale = -scale * res.batch_inv_std * res.batch_inv_std * mean_gc
    shift = -scale * mean_g
    if res.mask is None:
        dx = kernel.grad_input(xp, grad, res.x, res.batch_mean, res.batch_inv_std, scale,
                               x_scale, shift, res.x.dtype, layout)
    else:  # only counted elements moved the statistics, so only they get those terms
        through_stats = (as_compute(xp, res.x) - res.batch_mean) * x_scale + shift
        dx = as_compute(xp, grad) * scale + xp.where(res.mask, through_stats,
                                                     xp.zeros_like(through_stats))
        dx = xp.astype(dx, res.x.dtype)
    return xp.reshape(dx, layout.shape), dweight, dbias
