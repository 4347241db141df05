"""``batch_renorm``: batch renormalization as a function, in the manner of
``torch.nn.functional.batch_norm``, and the computation behind the PyTorch layers.

Every configuration trains natively, with specification section 4's backward (r, d and
the moving statistics are constants; gradients flow through the batch mean and std):

- one group, eagerly on the CPU: the whole step is one C++ autograd node
  (``features.cpp``'s ``train_step``, the same computation as ``_NativeRenorm``'s),
  whose fixed cost per call is close to batch norm's (``_whole_step``); without the
  compiled code, ``(N, C)`` rows take r and d (state moved) and then batch norm's own
  training op with them folded into its weight and bias (``_rows_train``).
- everything else, ``_NativeRenorm`` (a Python ``autograd.Function``): one statistics
  pass (``batch_norm_update_stats``, float32 for 16-bit inputs; for float32 and 16-bit
  NCHW one pass of ``features.cpp``; grouped sums or ``var_mean`` for micro-batches,
  ``var_mean`` under ``torch.compile``); the per-feature algebra in tensor operations
  (``_Step``); r and d folded into the affine weights,
  ``y = x_hat * (weight * r) + (weight * d + bias)``, by batch norm's inference kernel
  (per micro-batch for large slices) or one ``addcmul`` over a ``(groups, micro_batch,
  C, ...)`` view; batch norm's backward, or its sums and two ``addcmul`` passes.
  ``output_clip`` runs ``features.cpp``'s fused passes: transform, clip and affine in
  one; the backward's sums in one; dx in one.

Float32 inputs far from zero (some feature's |mean| above ``SHIFT_ABOVE`` stds) are
first shifted by their first sample's features (on CUDA, where no value is read back,
always where features are innermost, micro-batched or clipped): the statistics, the
transform and the backward then work on values of the order of the batch's spread,
which keeps the specification's 1e-5 at inputs like ``100 + N(0, 1)`` for one more pass
over x.  Statistics synchronised across processes (``replica_mean``) and masks use the
core's generic path, ``_CoreRenorm``.  The tests hold every path, with and without the
compiled code, to the core and to a float64 reference within specification section 6.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from portable_brn.config import RenormConfig
from portable_brn.renorm import backward, clip_limits, forward_train, momentum_at
from portable_brn.schedules import ScheduleLike
from portable_brn.state import RenormState, init_state

from . import compiled

__all__ = ["batch_renorm"]

ReplicaMean = Callable[[torch.Tensor], torch.Tensor] | None

_WIDE_DTYPES = (torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------
# Shapes and views
# ---------------------------------------------------------------------------


def _channels_innermost(x: torch.Tensor) -> bool:
    """Whether features are x's fastest-varying dimension: ``(N, C)`` or channels-last."""
    return x.stride(1) == 1


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``x`` viewed as ``(groups, micro_batch, C, ...)`` (a view in any memory format),
    or ``x`` itself for one group."""
    return x if groups == 1 else x.view(groups, x.shape[0] // groups, *x.shape[1:])


def _broadcast(array: torch.Tensor, view: torch.Tensor, groups: int) -> torch.Tensor:
    """A ``(groups, C)`` or ``(C,)`` array shaped to broadcast against ``view``."""
    channels = array.shape[-1]
    if groups == 1:
        return array if view.dim() == 2 else array.reshape((channels,) + (1,) * (view.dim() - 2))
    return array.reshape((groups, 1, channels) + (1,) * (view.dim() - 3))


def _summed(array: torch.Tensor, groups: int) -> torch.Tensor:
    """A per-(group, feature) array summed over the groups."""
    return array if groups == 1 else array.sum(0)


def _slices(x: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """The micro-batches of ``x`` along dim 0, views in x's memory format."""
    return list(x.chunk(groups))


def _batch_norm_layout(x: torch.Tensor) -> bool:
    """Whether batch norm's own kernels beat ``addcmul`` for one group of ``x``: all but
    float32/float64 ``(N, C)`` rows (16-bit ``addcmul`` would run in float32; on
    channels-last images batch norm's backward beats the sums and two ``addcmul``)."""
    return x.dim() > 2 or not _channels_innermost(x) or x.dtype in _HALF_DTYPES


def _groups(x: torch.Tensor, micro_batch: int | None) -> int:
    """How many micro-batches ``x`` holds, after checking that they split it evenly and
    leave more than one value per feature (the core's checks, without its cached
    layout objects, which ``torch.compile`` does not trace)."""
    batch = x.shape[0]
    if micro_batch is not None and batch % micro_batch:
        raise ValueError(f"micro_batch={micro_batch} does not divide the batch size "
                         f"{batch} of x with shape {tuple(x.shape)}")
    groups = 1 if micro_batch is None else batch // micro_batch
    if x.numel() // (x.shape[1] * groups) < 2:
        raise ValueError(f"Expected more than 1 value per feature when training, got x of "
                         f"shape {tuple(x.shape)}"
                         + (f" and micro_batch={micro_batch}" if micro_batch else ""))
    return groups


def _reduce_dims(x: torch.Tensor) -> list[int]:
    """Every dimension of ``x`` but the feature dimension 1."""
    return [0, *range(2, x.dim())]


def _shift_of(x: torch.Tensor, shifted: bool) -> torch.Tensor | None:
    """The first sample's features, ``(C,)`` and contiguous (a view where features are
    innermost), when ``x`` is to be shifted."""
    if not shifted:
        return None
    return x.detach()[(0, slice(None)) + (0,) * (x.dim() - 2)].contiguous()


# ---------------------------------------------------------------------------
# The native path
# ---------------------------------------------------------------------------


def _packed_image(x: torch.Tensor) -> bool:
    """Whether ``x`` is an image (rank 3 or more) in NCHW-contiguous or channels-last
    memory: the layouts ``features.cpp``'s statistics take."""
    channels_last = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.dim() > 2 and (x.is_contiguous() or x.is_contiguous(memory_format=channels_last))


def _per_group_stats(x: torch.Tensor, groups: int, stat_dtype: torch.dtype,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-micro-batch mean and biased variance, ``(groups, C)`` (``(C,)`` for one group)
    in ``stat_dtype``.

    On the CPU, float32 and 16-bit images, NCHW or channels-last, take ``features.cpp``'s
    one pass (five times faster than torch's NCHW kernel for float32, as fast or faster
    for 16-bit and channels-last, and exact at any offset).  Elsewhere 16-bit inputs
    pass float32 scratch buffers with momentum 0, which selects batch norm's mixed-dtype
    kernel: float32 accumulation and float32 results.  Under
    ``torch.compile`` (whose tracer lacks a fake kernel for ``batch_norm_update_stats``
    once a process has compiled another graph with it) one ``var_mean`` the compiler
    fuses with any cast."""
    compiling = torch.compiler.is_compiling()
    if (not compiling and x.dtype in (torch.float32, *_HALF_DTYPES) and x.is_cpu
            and _packed_image(x)):
        lib = compiled.library()
        if lib is not None:
            mean, var = lib.batch_stats(x, groups)
            return (mean[0], var[0]) if groups == 1 else (mean, var)
    scratch = None
    if compiling:
        var, mean = torch.var_mean(_grouped(x, groups).to(stat_dtype),
                                   _reduce_dims(x) if groups == 1 else
                                   [1, *range(3, x.dim() + 1)], correction=0)
        return (mean, var) if groups == 1 else (mean.reshape(groups, -1),
                                                var.reshape(groups, -1))
    if groups > 1 and not _channels_innermost(x) and x.dtype == stat_dtype:
        # batch norm's NCHW statistics kernel is several times slower on small slices,
        # var_mean ten times slower than sums; x is shifted: E[x^2] - E[x]^2 cancels little
        count = x.numel() // (x.shape[1] * groups)
        rows = _rows(x, groups)
        mean = rows.sum((1, 3)).div_(count)
        var = _row_dots(rows, rows).sum(1).div_(count).addcmul_(mean, mean, value=-1)
        return mean, var.clamp_(min=0)
    if groups > 1 and not _channels_innermost(x):
        var, mean = torch.var_mean(_grouped(x, groups).to(stat_dtype),
                                   [1, *range(3, x.dim() + 1)], correction=0)
        return mean.reshape(groups, -1), var.reshape(groups, -1)
    if x.dtype != stat_dtype:
        scratch = torch.empty((2, x.shape[1]), dtype=stat_dtype, device=x.device)
    if groups == 1:
        return torch.batch_norm_update_stats(x, *((None, None) if scratch is None else scratch),
                                             0.0)
    means, variances = [], []
    for part in _slices(x, groups):
        running = (None, None) if scratch is None else (scratch[0], scratch[1])
        mean, var = torch.batch_norm_update_stats(part, *running, 0.0)
        means.append(mean)
        variances.append(var)
    return torch.stack(means), torch.stack(variances)


def _statistics(x: torch.Tensor, groups: int, stat_dtype: torch.dtype, shift: bool,
                ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The origin x is shifted by (None: not shifted), the shifted x, and its per-group
    mean and variance."""
    origin = _shift_of(x, shift)
    xs = x if origin is None else x - _broadcast(origin, x, 1)
    return (origin, xs, *_per_group_stats(xs, groups, stat_dtype))


def _dx_by_addcmul(grad: torch.Tensor, x: torch.Tensor, k: torch.Tensor,
                   x_scale: torch.Tensor, dx_shift: torch.Tensor, groups: int) -> torch.Tensor:
    """``dx = g * k + x * x_scale + dx_shift`` (``_backward_features``' coefficients, per
    group): two passes over the ``(groups, ...)`` view, which beat batch norm's dx pass
    on ``(N, C)`` rows and serve every micro-batched layout."""
    gv, xv = _grouped(grad, groups), _grouped(x, groups)
    dx = torch.addcmul(_broadcast(dx_shift, xv, groups), xv, _broadcast(x_scale, xv, groups))
    dx.addcmul_(gv, _broadcast(k, gv, groups))
    return dx if groups == 1 else dx.view(x.shape)


def _saved_not_recomputed(*arrays: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-feature values the compiled backward must save rather than recompute.

    Under ``torch.compile`` the AOT partitioner may recompute cheap per-feature ops in the
    backward from the moving statistics, which by then this step has updated in place:
    silently wrong dweight (pytorch/pytorch PR #197039).  ``stack`` is not on its list of
    recomputable ops, so routing the values through one pins those of this step.
    """
    if torch.compiler.is_compiling():
        return tuple(torch.stack(arrays).unbind())
    return arrays


# Shift x when some feature's |batch mean| exceeds this many batch stds: below it the
# unshifted float32 statistics and transform keep the specification's 1e-5 (tested), so
# the extra pass over x is paid only by inputs far from zero.
SHIFT_ABOVE = 3.0


def _needs_shift(mean: torch.Tensor, var: torch.Tensor, eps: float) -> bool:
    """Whether some feature's |mean| exceeds ``SHIFT_ABOVE`` stds (``features.cpp`` asks
    the same)."""
    return bool(torch.any(mean.square() > (var + eps).mul_(SHIFT_ABOVE ** 2)))


def _tensor_features(mean: torch.Tensor, std: torch.Tensor, origin: torch.Tensor | None,
                     running_mean: torch.Tensor | None, running_std: torch.Tensor | None,
                     weight: torch.Tensor | None, bias: torch.Tensor | None, limits: tuple,
                     ) -> tuple[torch.Tensor, ...]:
    """The per-(group, feature) rows of ``features.cpp``'s forward in tensor operations:
    inv_std, r, d, scale = weight * r, shift = weight * d + bias, k = scale * inv_std and
    offset = shift - mean * k from the batch mean and std (``running_std`` None: r = 1,
    d = 0)."""
    inv_std = std.reciprocal()
    if running_std is None:
        r, d = torch.ones_like(std), torch.zeros_like(std)
    else:
        r_min, r_max, d_max = limits
        r = torch.div(std, running_std).clamp_(r_min, r_max)
        # mu_B - mean as (shifted mu_B) + (origin - mean): exact while mu_B is rounded
        at = running_mean if origin is None else running_mean - origin
        d = torch.sub(mean, at).div_(running_std).clamp_(-d_max, d_max)
    r, d = _saved_not_recomputed(r, d)
    scale, shift = (r, d) if weight is None else (weight * r, torch.addcmul(bias, weight, d))
    k = scale * inv_std
    return inv_std, r, d, scale, shift, k, shift.addcmul(mean, k, value=-1)


def _backward_features(sum_g_xhat: torch.Tensor, sum_g: torch.Tensor,
                       inv_std: torch.Tensor, k: torch.Tensor, mean: torch.Tensor,
                       r: torch.Tensor, d: torch.Tensor, count: int,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``features.cpp``'s backward rows in tensor operations: with
    ``dx = k * (g - mean(g) - x_hat * mean(g * x_hat))`` (specification section 4, per group)
    written ``g * k + x * x_scale + dx_shift``, x_scale and dx_shift; and
    ``dweight = sum(g * (x_hat * r + d))``."""
    x_scale = torch.mul(k, inv_std).mul_(sum_g_xhat).div_(-count)
    dx_shift = torch.mul(k, sum_g).div_(-count).addcmul_(mean, x_scale, value=-1)
    return x_scale, dx_shift, torch.addcmul(sum_g_xhat * r, d, sum_g)


class _Step:
    """The batch statistics of a training step (of x shifted where ``shift`` and needed:
    see ``_NativeRenorm``) and its per-feature rows (``_tensor_features``); the state
    moves by ``move_tensor_state``."""

    def __init__(self, x: torch.Tensor, groups: int, shift: bool,
                 running_mean: torch.Tensor | None, running_std: torch.Tensor | None,
                 weight: torch.Tensor | None, bias: torch.Tensor | None, limits: tuple,
                 eps: float) -> None:
        stat_dtype = torch.float32 if x.dtype in _HALF_DTYPES else x.dtype
        if_needed = shift and x.is_cpu and not torch.compiler.is_compiling()
        self.origin, self.xs, self.mean, self.var = _statistics(x, groups, stat_dtype,
                                                                shift and not if_needed)
        self.groups, self.running = groups, (running_mean, running_std)
        if if_needed and _needs_shift(self.mean, self.var, eps):
            self.origin, self.xs, self.mean, self.var = _statistics(x, groups, stat_dtype,
                                                                    True)
        self.std = torch.add(self.var, eps).sqrt_()
        self.rows = _tensor_features(self.mean, self.std, self.origin, running_mean,
                                     running_std, weight, bias, limits)

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch mean and std the state moves toward: over micro-batches, their mean."""
        mean = self.mean if self.origin is None else self.mean + self.origin
        if self.groups == 1:
            return mean, self.std
        return mean.mean(0), self.std.mean(0)

    def move_tensor_state(self, step: torch.Tensor, momentum: Any,
                          finite_out: torch.Tensor | None) -> None:
        """Move the state toward ``pooled`` with tensor operations (``_moved_state``)."""
        _moved_state(*self.running, *self.pooled(), step, momentum, finite_out)


class _NativeRenorm(torch.autograd.Function):
    """One training step on batch norm's kernels: returns ``y``, and the pooled batch mean
    and std the moving statistics move toward (no gradient) when ``update`` is None.

    ``running_mean``/``running_std`` None means r = 1 and d = 0 (no state); ``limits``
    are ``clip_limits``' ``(r_min, r_max, d_max)``; ``groups`` micro-batches of equal
    size; ``clip`` is ``output_clip`` or None; ``shift`` asks that x be shifted by its
    first sample's features when it is far from zero (float32 accuracy at large
    offsets): always under ``torch.compile`` and on CUDA (no branch on a value), only
    where ``_needs_shift`` on the CPU.  ``update`` ``(step, momentum, finite_out)``
    moves the state here (eager mode)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, running_mean: torch.Tensor | None,
                running_std: torch.Tensor | None, limits: tuple, eps: float, groups: int,
                clip: tuple[float, float] | None, shift: bool, update: tuple | None,
                ) -> Any:
        step = _Step(x, groups, shift, running_mean, running_std, weight, bias, limits, eps)
        if update is not None:
            step.move_tensor_state(*update)
        inv_std, r, d, scale, shift_, k, offset = step.rows
        xs, mean, var = step.xs, step.mean, step.var
        if clip is None:
            y = _transform(xs, scale, shift_, k, offset, mean, var, eps, groups)
            clipped_z = z = None
        else:
            k_z = r * inv_std
            offset_z = d.addcmul(mean, k_z, value=-1)
            fused = _fused_clip(xs, weight)
            if fused is not None:
                y, z = fused.clip_forward(xs, k_z, offset_z, weight, bias, *clip, groups)
                clipped_z = None
            else:
                z = _transform(xs, r, d, k_z, offset_z, mean, var, eps, groups,
                               out_dtype=mean.dtype)
                clipped_z = z.clamp(*clip)
                y = _affine(clipped_z, weight, bias, x.dtype)
            ctx.fused_clip = fused
        ctx.eps, ctx.groups, ctx.clip = eps, groups, clip
        ctx.save_for_backward(xs, scale, k, mean, inv_std, r, d, clipped_z, z)
        if update is not None or running_std is None:  # the state has moved, or none
            return y
        pooled = step.pooled()
        ctx.mark_non_differentiable(*pooled)
        return (y, *pooled)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor, *unused: Any) -> tuple:
        xs, scale, k, mean, inv_std, r, d, clipped_z, z = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        groups = ctx.groups
        if ctx.clip is not None and ctx.fused_clip is not None:
            return (*_fused_clip_backward(ctx.fused_clip, grad, xs, k, mean, inv_std, r, d, z,
                                          ctx.clip, groups, need_x, need_weight, need_bias),
                    *(None,) * 8)
        if clipped_z is not None:  # dweight = sum(g * clipped z), then g where z is inside
            wide = grad.to(z.dtype)
            origin = torch.zeros(z.shape[1], dtype=z.dtype, device=z.device)
            _, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
                wide, clipped_z, None, None, None, origin, origin + 1, True, 0.0,
                [False, True, True])
            dweight, dbias = (dweight if need_weight else None), (dbias if need_bias else None)
            grad = torch.ops.aten.hardtanh_backward(wide, z, *_open_bounds(ctx.clip, z.dtype))
            grad = grad.to(xs.dtype)
        dx, sum_g_xhat, sum_g = _batch_norm_backward(grad, xs, scale, mean, inv_std, ctx.eps,
                                                     groups, need_x)
        count = xs.numel() // (xs.shape[1] * groups)
        x_scale, dx_shift, dweight_z = _backward_features(sum_g_xhat, sum_g, inv_std, k, mean,
                                                          r, d, count)
        if need_x and dx is None:
            dx = _dx_by_addcmul(grad, xs, k, x_scale, dx_shift, groups).to(grad.dtype)
        if clipped_z is None:  # every sum is in the parameters' dtype (_kernels_take)
            dweight = _summed(dweight_z, groups) if need_weight else None
            dbias = _summed(sum_g, groups) if need_bias else None
        return dx, dweight, dbias, None, None, None, None, None, None, None, None


def _fused_clip(xs: torch.Tensor, weight: torch.Tensor | None) -> Any:
    """``features.cpp`` where its clip kernels take ``xs`` (eager, CPU, NCHW-contiguous or
    packed with features innermost, contiguous parameters), else None."""
    if not xs.is_cpu or torch.compiler.is_compiling() or not (
            weight is None or weight.is_contiguous()):
        return None
    inner = xs.numel() // (xs.shape[0] * xs.shape[1])
    packed = (xs.permute(0, *range(2, xs.dim()), 1).is_contiguous()
              if xs.dim() > 2 and inner > 1 and xs.stride(1) == 1 else xs.is_contiguous())
    return compiled.library() if packed else None


def _fused_clip_backward(lib: Any, grad: torch.Tensor, xs: torch.Tensor, k: torch.Tensor,
                         mean: torch.Tensor, inv_std: torch.Tensor, r: torch.Tensor,
                         d: torch.Tensor, z: torch.Tensor, clip: tuple[float, float],
                         groups: int, need_x: bool, need_weight: bool, need_bias: bool,
                         ) -> tuple:
    """dx, dweight and dbias of a clipped step by ``features.cpp``: the sums in one pass
    over g, z and x, dx in another (g passes where ``low <= z <= high``)."""
    if grad.stride() != xs.stride():
        grad = torch.empty_like(xs).copy_(grad)
    sums = lib.clip_sums(grad, z, xs, mean, inv_std, *clip, groups)
    sum_g, sum_g_clipped, sum_passed, sum_passed_xhat = sums[:, 0] if groups == 1 else sums
    dx = None
    if need_x:
        count = xs.numel() // (xs.shape[1] * groups)
        x_scale, dx_shift, _ = _backward_features(sum_passed_xhat, sum_passed, inv_std, k,
                                                  mean, r, d, count)
        dx = lib.clip_dx(grad, z, xs, k, x_scale, dx_shift, *clip, groups)
    return (dx, _summed(sum_g_clipped, groups) if need_weight else None,
            _summed(sum_g, groups) if need_bias else None)


@lru_cache(maxsize=16)
def _open_bounds(clip: tuple[float, float], dtype: torch.dtype) -> tuple[float, float]:
    """The open interval of ``dtype`` values that is the closed ``[low, high]`` the clip
    passes gradients in (a z exactly at a bound is not clipped): each bound, as
    ``clamp`` rounds it to ``dtype``, moved one ulp outward.  ``hardtanh``'s backward
    then masks the gradient in one pass, where a boolean mask takes several.  (A NaN z
    passes its gradient there; its feature's sums, hence dx, are NaN either way.)"""
    low, high = torch.tensor(clip, dtype=dtype)
    return (float(torch.nextafter(low, torch.tensor(-math.inf, dtype=dtype))),
            float(torch.nextafter(high, torch.tensor(math.inf, dtype=dtype))))


def _affine(z: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    """``weight * z + bias`` (per feature) rounded once to ``dtype``: batch norm's
    inference kernel with mean 0 and variance 1 (exact) where ``_batch_norm_layout``."""
    if weight is None:
        return z.to(dtype)
    if dtype == z.dtype and _batch_norm_layout(z) and not torch.compiler.is_compiling():
        zero = torch.zeros_like(weight)
        return F.batch_norm(z, zero, zero + 1, weight, bias, False, 0.0, 0.0)
    return _addcmul_as(dtype, _broadcast(bias, z, 1), z, _broadcast(weight, z, 1))


def _addcmul_as(dtype: torch.dtype, shift: torch.Tensor, x: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
    """``shift + x * scale`` computed in the promoted dtype and rounded once to ``dtype``:
    straight into an output of that dtype in eager mode; under ``torch.compile``, whose
    tracer takes no ``out=`` of channels-last strides, as a cast the compiler fuses."""
    if torch.compiler.is_compiling() or dtype == torch.promote_types(x.dtype, scale.dtype):
        y = torch.addcmul(shift, x, scale)
        return y if y.dtype == dtype else y.to(dtype)
    return torch.addcmul(shift, x, scale, out=torch.empty_like(x, dtype=dtype))


def _transform(xs: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, k: torch.Tensor,
               offset: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float,
               groups: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(x - mean) * inv_std * scale + shift`` per (group, feature), i.e. ``x * k + offset``,
    rounded once to ``out_dtype`` (default x's): batch norm's inference kernel where
    ``_batch_norm_layout`` (per micro-batch where ``_slice_by_slice``), else one
    ``addcmul`` over the view."""
    out_dtype = out_dtype or xs.dtype
    if _batch_norm_layout(xs) and out_dtype == xs.dtype:
        if groups == 1:
            return F.batch_norm(xs, mean, var, scale, shift, False, 0.0, eps)
        if _slice_by_slice(xs, groups):
            y = torch.empty_like(xs)
            unused = xs.new_empty(0, dtype=mean.dtype)
            for part, out, *features in zip(_slices(xs, groups), _slices(y, groups), scale,
                                            shift, mean, var, strict=True):
                torch.ops.aten.native_batch_norm.out(part, *features, False, 0.0, eps,
                                                     out=out, save_mean=unused,
                                                     save_invstd=unused)
            return y
    view = _grouped(xs, groups)
    y = _addcmul_as(out_dtype, _broadcast(offset, view, groups), view,
                    _broadcast(k, view, groups))
    return y if groups == 1 else y.view(xs.shape)


def _batch_norm_backward(grad: torch.Tensor, xs: torch.Tensor, scale: torch.Tensor,
                         mean: torch.Tensor, inv_std: torch.Tensor, eps: float, groups: int,
                         need_x: bool) -> tuple:
    """The ``(groups, C)`` sums of ``g * x_hat`` and ``g``, and, where batch norm's own
    backward computes it with weight ``scale`` (``_batch_norm_layout``: one group, or
    each micro-batch where ``_slice_by_slice``), dx (else None)."""
    if groups == 1 and _batch_norm_layout(xs):
        dx, sum_g_xhat, sum_g = torch.ops.aten.native_batch_norm_backward(
            grad, xs, scale, None, None, mean, inv_std, True, eps, [need_x, True, True])
        return dx, sum_g_xhat, sum_g
    if _batch_norm_layout(xs) and _slice_by_slice(xs, groups):
        dx = torch.empty_like(xs) if need_x else None
        sums = mean.new_empty((2, *mean.shape))
        for index, (g, x, dx_part) in enumerate(zip(
                _slices(grad, groups), _slices(xs, groups),
                _slices(dx, groups) if need_x else [None] * groups, strict=True)):
            torch.ops.aten.native_batch_norm_backward.out(
                g, x, scale[index], None, None, mean[index], inv_std[index], True, eps,
                [need_x, True, True], out0=dx_part if need_x else x.new_empty(0),
                out1=sums[0, index], out2=sums[1, index])
        return dx, sums[0], sums[1]
    if groups > 1 and not _channels_innermost(xs) and xs.dtype == mean.dtype:
        return None, *_grouped_sums(grad, xs, mean, inv_std, groups)
    return None, *_per_slice_sums(grad, xs, mean, inv_std, eps, groups)


def _slice_by_slice(x: torch.Tensor, groups: int) -> bool:
    """Whether batch norm's kernels run micro-batch by micro-batch (eager mode, slices of
    at least 64 Ki values, where their speed outweighs a call per slice)."""
    return x.numel() // groups >= 1 << 16 and not torch.compiler.is_compiling()


def _grouped_sums(grad: torch.Tensor, xs: torch.Tensor, mean: torch.Tensor,
                  inv_std: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(groups, C)`` sums of ``g * x_hat`` and ``g`` for float32/float64 features
    that are not innermost: dot products along the contiguous spatial run, no temporary
    (batch norm's NCHW backward kernel is several times slower on small slices; 16-bit
    dot products would round each row's sum, so those keep that kernel)."""
    gv, xv = _rows(grad, groups), _rows(xs, groups)
    sum_g = gv.sum((1, 3))
    sum_gx = _row_dots(gv, xv).sum(1)
    return sum_gx.addcmul_(mean, sum_g, value=-1).mul_(inv_std), sum_g


def _rows(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``x`` (features not innermost) as ``(groups, micro_batch, C, spatial)``."""
    return x.reshape(groups, x.shape[0] // groups, x.shape[1], -1)


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot products of matching rows along the last dimension, ``(G, M, C)`` (a multiply
    and a contiguous sum: several times faster than ``bmm`` or ``var_mean`` here)."""
    return torch.linalg.vecdot(a, b, dim=-1)


def _per_slice_sums(grad: torch.Tensor, xs: torch.Tensor, mean: torch.Tensor,
                    inv_std: torch.Tensor, eps: float, groups: int,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(groups, C)`` (``(C,)``) sums of ``g * x_hat`` and ``g``, by batch norm's
    backward per micro-batch."""
    if groups == 1:
        return torch.ops.aten.native_batch_norm_backward(
            grad, xs, None, None, None, mean, inv_std, True, eps, [False, True, True])[1:]
    sums = [torch.ops.aten.native_batch_norm_backward(
        g, x, None, None, None, m, s, True, eps, [False, True, True])[1:]
        for g, x, m, s in zip(_slices(grad, groups), _slices(xs, groups), mean, inv_std,
                              strict=True)]
    return tuple(torch.stack(column) for column in zip(*sums, strict=True))


def _moved_state(running_mean: torch.Tensor, running_std: torch.Tensor, mean: torch.Tensor,
                 std: torch.Tensor, step: torch.Tensor, momentum: Any,
                 finite_out: torch.Tensor | None) -> None:
    """Move the running statistics toward the batch's in place and advance ``step``;
    features whose statistics are not finite keep theirs.  A non-finite batch mean makes
    every centred square, so the variance, non-finite too: std alone tells whether both
    are finite (one kernel)."""
    finite = std < math.inf
    torch._foreach_lerp_(
        [running_mean, running_std],
        [torch.where(finite, mean.to(running_mean.dtype), running_mean),
         torch.where(finite, std.to(running_std.dtype), running_std)], momentum)
    step.add_(1)
    if finite_out is not None:
        finite_out.copy_(finite)


def _whole_step(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                state: RenormState, limits: tuple, eps: float, shift: bool, update: tuple,
                clip: tuple[float, float] | None) -> torch.Tensor | None:
    """The eager step of one group as ``features.cpp``'s C++ autograd node (on the CPU;
    with a clip where its fused passes take x), whose fixed cost per call is close to
    batch norm's: y, the state moved; None where the compiled code does not take it."""
    lib = compiled.library() if x.is_cpu else None
    if lib is None or not compiled.takes(x, update[0], update[2], state.mean, state.std,
                                         weight, bias) or (
            clip is not None and _fused_clip(x, weight) is None):
        return None
    return compiled.train_step(lib, x, weight, bias, state, update[2],
                               tuple(float(v) for v in limits), eps, float(update[1]),
                               SHIFT_ABOVE if shift else 0.0, clip)


def _rows_train(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                state: RenormState, limits: tuple, eps: float, shift: bool, update: tuple,
                ) -> torch.Tensor:
    """The eager step on float32/float64 ``(N, C)`` rows (one group, no clip) without
    the compiled code: r and d from the batch statistics (the state moved), then batch
    norm's own training op with them folded into its weight and bias, whose native
    backward is specification section 4's (r and d carry no gradient) at the price of a
    second statistics pass inside it."""
    with torch.no_grad():
        step = _Step(x, 1, shift, state.mean, state.std, weight, bias, limits, eps)
        step.move_tensor_state(*update)
    r, d = step.rows[1], step.rows[2]
    xs = x if step.origin is None else x - step.origin
    scale, shift = (r, d) if weight is None else (weight * r, torch.addcmul(bias, weight, d))
    return torch.batch_norm(xs, scale, shift, None, None, True, 0.0, eps, False)


def _native_train(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  state: RenormState | None, config: RenormConfig,
                  finite_out: torch.Tensor | None = None) -> torch.Tensor:
    """The native training step; updates ``state``'s tensors in place (None: no state,
    r = 1 and d = 0)."""
    groups = _groups(x, config.micro_batch)
    # shifted where far from zero the statistics or the folded transform would lose
    # float32 accuracy: float32 on the CPU (only where needed, so free for inputs near
    # zero), else features innermost, micro-batched or clipped; float64 where grouped
    # statistics are plain sums (E[x^2] - E[x]^2)
    shift = (x.dtype == torch.float32 and (
        x.is_cpu or groups > 1 or config.output_clip is not None
        or _channels_innermost(x))) or (
        x.dtype == torch.float64 and groups > 1 and not _channels_innermost(x))
    if state is None:
        return _NativeRenorm.apply(x, weight, bias, None, None, None, config.eps, groups,
                                   config.output_clip, shift, None)
    limits = clip_limits(config, state.step, state.std.dtype)
    momentum = momentum_at(config, state.step, state.std.dtype)
    if not torch.compiler.is_compiling():
        update = (state.step, momentum, finite_out)
        if groups == 1:
            y = _whole_step(x, weight, bias, state, limits, config.eps, shift, update,
                            config.output_clip)
            if y is not None:
                return y
            if config.output_clip is None and not _batch_norm_layout(x):
                return _rows_train(x, weight, bias, state, limits, config.eps, shift, update)
        return _NativeRenorm.apply(x, weight, bias, state.mean, state.std, limits,
                                   config.eps, groups, config.output_clip, shift, update)
    y, batch_mean, batch_std = _NativeRenorm.apply(
        x, weight, bias, state.mean, state.std, limits, config.eps, groups,
        config.output_clip, shift, None)
    _moved_state(state.mean, state.std, batch_mean, batch_std, state.step, momentum,
                 finite_out)
    return y


# ---------------------------------------------------------------------------
# The core's generic path (statistics synchronised across processes)
# ---------------------------------------------------------------------------


class _CoreRenorm(torch.autograd.Function):
    """The core's ``forward_train`` and ``backward`` as one autograd node.

    Returns ``y`` and the new state (mean, std, step) and the per-feature finite flags,
    which carry no gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, state: RenormState, config: RenormConfig,
                replica_mean: ReplicaMean, mask: torch.Tensor | None) -> tuple:
        y, new_state, residuals = forward_train(x, state, weight, bias, config,
                                                replica_mean=replica_mean, mask=mask)
        ctx.save_for_backward(x)
        ctx.residuals = residuals._replace(x=None)
        ctx.mark_non_differentiable(*new_state, residuals.finite)
        ctx.set_materialize_grads(False)
        return (y, *new_state, residuals.finite)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor | None, *unused: Any) -> tuple:
        if grad is None:
            return (None,) * 7
        (x,) = ctx.saved_tensors
        residuals = ctx.residuals._replace(x=x.reshape(ctx.residuals.layout.view_shape))
        dx, dweight, dbias = backward(residuals, grad)
        return dx, dweight, dbias, None, None, None, None


def _core_train(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                state: RenormState | None, config: RenormConfig, replica_mean: ReplicaMean,
                finite_out: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """The generic training step: commits the core's new state to ``state`` in place
    (None: no state, plain batch norm with the config's micro-batches and clip)."""
    if state is None:
        config = dataclasses.replace(config, r_max=1.0, d_max=0.0, r_min=None,
                                     warmup_steps=0)
        fresh = init_state(x.shape[1], xp=torch, dtype=x.dtype, device=x.device)
        return _CoreRenorm.apply(x, weight, bias, fresh, config, replica_mean,
                                 mask)[0]
    y, mean, std, step, finite = _CoreRenorm.apply(x, weight, bias, state, config,
                                                   replica_mean, mask)
    with torch.no_grad():
        for buffer, value in zip(state, (mean, std, step), strict=True):
            buffer.copy_(value)
        if finite_out is not None:
            finite_out.copy_(finite)
    return y


# ---------------------------------------------------------------------------
# Inference and the entry point the layers share
# ---------------------------------------------------------------------------


def _kernels_take(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether batch norm's CPU/CUDA kernels take these dtypes: parameters and state of
    x's dtype, or float32 for a 16-bit x (the mixed-dtype kernels)."""
    if x.dtype not in _WIDE_DTYPES + _HALF_DTYPES or not (x.is_cpu or x.is_cuda):
        return False
    expected = torch.float32 if x.dtype in _HALF_DTYPES else x.dtype
    return all(p is None or p.dtype == expected for p in params)


def _infer(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
           mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``weight * (x - mean) / std + bias`` in one pass, rounded once to x's dtype: one
    ``addcmul`` on ``(N, C)`` rows, else batch norm's inference kernel with variance
    ``std * std`` and eps 0 (in binary floating point ``sqrt(std * std) == std`` exactly
    for a positive std whose square neither overflows nor underflows)."""
    if x.dim() == 2 or not _kernels_take(x, weight, mean):
        scale = std.reciprocal() if weight is None else weight / std
        shift = torch.mul(mean, scale).neg_() if bias is None else torch.addcmul(
            bias, mean, scale, value=-1)
        y = torch.addcmul(_broadcast(shift, x, 1), x, _broadcast(scale, x, 1))
        return y if y.dtype == x.dtype else y.to(x.dtype)
    return torch.batch_norm(x, weight, bias, mean, std * std, False, 0.0, 0.0,
                            torch.backends.cudnn.enabled)


def _batch_renorm(x: torch.Tensor, state: RenormState | None, weight: torch.Tensor | None,
           bias: torch.Tensor | None, training: bool, config: RenormConfig, *,
           replica_mean: ReplicaMean = None, finite_out: torch.Tensor | None = None,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """``batch_renorm`` on checked arguments and a validated config (the layers' call).

    ``state`` None normalizes with the batch's statistics (r = 1, d = 0); in training
    ``state`` is updated in place, whole or not at all, and ``finite_out`` receives the
    per-feature flags of which statistics moved.  A ``mask`` takes the core's generic
    path, which counts only its elements."""
    if mask is not None:
        _check_mask(mask, x)
    if state is not None and not training:
        return _infer(x, weight, bias, state.mean, state.std)
    params = (weight, bias) if state is None else (weight, bias, state.mean, state.std)
    if replica_mean is not None or mask is not None or not _kernels_take(x, *params):
        return _core_train(x, weight, bias, state, config, replica_mean, finite_out, mask)
    if state is None and config.micro_batch is None and config.output_clip is None:
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, config.eps)
    return _native_train(x, weight, bias, state, config, finite_out)


def _check_mask(mask: Any, x: torch.Tensor) -> None:
    """``mask`` must be a boolean tensor on ``x``'s device that broadcasts to ``x``."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a boolean torch.Tensor, got {kind}")
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but input is on {x.device}")
    try:
        fits = torch.broadcast_shapes(mask.shape, x.shape) == x.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, which does not broadcast to "
                         f"input's shape {tuple(x.shape)}")


# ---------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _cached_config(**options: Any) -> RenormConfig:
    return RenormConfig(feature_axis=1, **options)


def _config(**options: Any) -> RenormConfig:
    """A validated config, built once per distinct set of hashable options."""
    if options["output_clip"] is not None:
        options["output_clip"] = tuple(options["output_clip"])
    try:
        return _cached_config(**options)
    except TypeError as error:  # an unhashable schedule: validate it uncached
        if "unhashable" not in str(error):
            raise
        return RenormConfig(feature_axis=1, **options)


def _check_arguments(input: Any, running_mean: Any, running_std: Any,
                     num_batches_tracked: Any, weight: Any, bias: Any, training: bool,
                     config: RenormConfig) -> None:
    """Every argument of ``batch_renorm`` that could fail, checked before any state moves."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must have a real floating point dtype, got {input.dtype}")
    if input.dim() < 2:
        raise ValueError(f"input must have at least 2 dimensions (N, C, ...), got shape "
                         f"{tuple(input.shape)}")
    stateless = running_mean is None
    if stateless != (running_std is None) or (
            not stateless and training and num_batches_tracked is None):
        raise ValueError("running_mean, running_std and (in training) num_batches_tracked "
                         "must be given together, or running_mean and running_std both None")
    if stateless and not training:
        raise ValueError("running_mean and running_std are needed when training=False")
    if (weight is None) != (bias is None):
        raise ValueError("weight and bias must be given together (affine) or both be None")
    channels = input.shape[1]
    for name, array in (("running_mean", running_mean), ("running_std", running_std),
                        ("weight", weight), ("bias", bias)):
        if array is None:
            continue
        if not isinstance(array, torch.Tensor) or not array.is_floating_point():
            raise TypeError(f"{name} must be a floating point torch.Tensor, got {array!r}")
        if tuple(array.shape) != (channels,):
            raise ValueError(f"{name} must have shape ({channels},) to match input's "
                             f"{channels} features along dim 1, got {tuple(array.shape)}")
        if array.device != input.device:
            raise ValueError(f"{name} is on {array.device} but input is on {input.device}")
    if num_batches_tracked is not None and (
            not isinstance(num_batches_tracked, torch.Tensor) or num_batches_tracked.dim()
            or num_batches_tracked.dtype != torch.int64):
        raise TypeError(f"num_batches_tracked must be a 0-d int64 tensor, got "
                        f"{num_batches_tracked!r}")


def batch_renorm(input: torch.Tensor, running_mean: torch.Tensor | None,
                 running_std: torch.Tensor | None,
                 num_batches_tracked: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 training: bool = False, momentum: float = 0.01, eps: float = 1e-3, *,
                 r_max: ScheduleLike = 3.0, d_max: ScheduleLike = 5.0,
                 r_min: ScheduleLike | None = None, warmup_steps: int = 0,
                 micro_batch: int | None = None,
                 output_clip: tuple[float, float] | None = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Batch Renormalization (Ioffe, 2017) of ``input`` ``(N, C, ...)`` over dim 1, in the
    manner of ``torch.nn.functional.batch_norm``.

    Training (``training=True``) normalizes with the batch's statistics corrected by
    ``r = clip(sigma_B / running_std, r_min, r_max)`` and
    ``d = clip((mu_B - running_mean) / running_std, -d_max, d_max)`` (r, d and the
    running statistics receive no gradient), then updates ``running_mean``,
    ``running_std`` and ``num_batches_tracked`` in place, as ``F.batch_norm`` updates its
    running buffers: the statistics move toward the batch's by ``momentum`` (features
    whose batch statistics are not finite keep theirs) and the step ``t`` that schedules
    and ``warmup_steps`` read goes up by one.  ``running_mean=running_std=None`` uses the
    batch's statistics alone (r = 1, d = 0: batch norm).  Inference computes
    ``weight * (input - running_mean) / running_std + bias``.

    ``running_std`` is ``sqrt(running_var + eps)`` in batch norm's terms.  16-bit inputs
    take float32 buffers and parameters; statistics are then float32 and the output is in
    the input's dtype.  ``r_max``, ``d_max``, ``r_min``, ``warmup_steps``,
    ``micro_batch`` and ``output_clip`` are as in ``portable_brn.RenormConfig``.
    ``mask`` (boolean, broadcastable to ``input``, True where an element counts) restricts
    the batch statistics, r, d and the update to the counted elements, as
    ``flax.linen.BatchNorm``'s does; every element is transformed alike.
    """
    config = _config(eps=eps, momentum=momentum, r_max=r_max, d_max=d_max, r_min=r_min,
                     warmup_steps=warmup_steps, micro_batch=micro_batch,
                     output_clip=output_clip)
    _check_arguments(input, running_mean, running_std, num_batches_tracked, weight, bias,
                     training, config)
    state = None if running_mean is None else RenormState(running_mean, running_std,
                                                          num_batches_tracked)
    return _batch_renorm(input, state, weight, bias, training, config, mask=mask)
