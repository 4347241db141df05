"""The computation behind the PyTorch layers: a native fast path and the core's generic one.

Both are ``torch.autograd.Function`` s whose backward is SPEC section 4 (r, d and the
moving statistics are constants; gradients flow through the batch mean and std):

- ``_NativeRenorm`` folds r and d into the affine weights of PyTorch's own batch-norm
  kernels: the forward is one statistics pass (``torch.batch_norm_update_stats``) and one
  transform ``y = x_hat * (weight * r) + (weight * d + bias)`` (batch norm's inference
  kernel, or one ``addcmul`` when features are the innermost dimension); the backward is
  ``native_batch_norm_backward`` with weight ``weight * r``, which is exactly section 4
  because the batch-norm backward is linear in the incoming gradient (for ``(N, C)``
  inputs its per-feature sums, then dx in two ``addcmul`` passes).  It serves float32 and
  float64 inputs on CPU or CUDA whose dtype matches the layer's, without ``micro_batch``
  or ``output_clip`` and without replicas.
- ``_CoreRenorm`` wraps the core's ``forward_train`` and ``backward``: the reference,
  used for everything else (micro-batches, output clipping, 16-bit inputs, mixed dtypes,
  statistics synchronised across processes).

The tests hold the fast path to the core within SPEC section 6's tolerances.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from portable_brn.config import RenormConfig
from portable_brn.renorm import backward, clip_limits, forward_infer, forward_train, momentum_at
from portable_brn.state import RenormState

__all__ = ["batch_norm_step", "infer_step", "train_step"]

ReplicaMean = Callable[[torch.Tensor], torch.Tensor] | None

_NATIVE_DTYPES = (torch.float32, torch.float64)


def uses_native(x: torch.Tensor, reference: torch.Tensor | None, config: RenormConfig | None,
                replica_mean: ReplicaMean = None) -> bool:
    """Whether the native kernels compute this call: a float32/float64 ``x`` on CPU or
    CUDA of the layer's dtype (``reference``), and (for training, ``config`` given) no
    option without a fast path."""
    if (x.dtype not in _NATIVE_DTYPES or not (x.is_cpu or x.is_cuda)
            or (reference is not None and reference.dtype != x.dtype)):
        return False
    if config is None:
        return True
    return replica_mean is None and config.micro_batch is None and config.output_clip is None


# ---------------------------------------------------------------------------
# The native fast path
# ---------------------------------------------------------------------------


def _channels_innermost(x: torch.Tensor) -> bool:
    """Whether features are x's fastest-varying dimension: ``(N, C)`` or channels-last."""
    return x.stride(1) == 1


def _feature_view(x: torch.Tensor, array: torch.Tensor) -> torch.Tensor:
    """A per-feature array shaped to broadcast against ``x`` along dim 1."""
    return array if x.dim() == 2 else array.view((1, -1) + (1,) * (x.dim() - 2))


def _rows_dx(grad: torch.Tensor, x: torch.Tensor, k: torch.Tensor, mean: torch.Tensor,
             inv_std: torch.Tensor, sum_g_xhat: torch.Tensor,
             sum_g: torch.Tensor) -> torch.Tensor:
    """``dx = k * (g - mean(g) - x_hat * mean(g * x_hat))`` for ``(N, C)`` inputs as
    ``g * k + x * x_scale + shift`` (SPEC section 4 in the core's form): two passes that
    beat the native kernel's dx pass on N * C one-pixel images."""
    minus_count = -x.shape[0]
    x_scale = torch.mul(k, inv_std).mul_(sum_g_xhat).div_(minus_count)
    shift = torch.mul(k, sum_g).div_(minus_count).addcmul_(mean, x_scale, value=-1)
    return torch.addcmul(shift, x, x_scale).addcmul_(grad, k)


class _NativeRenorm(torch.autograd.Function):
    """``y = x_hat * (w * r) + (w * d + b)`` by native batch-norm kernels, given the batch
    mean, biased variance and inverse std; r and d arrive computed and receive no
    gradient.  ``weight`` and ``bias`` are both given or both None (``affine``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor,
                inv_std: torch.Tensor, r: torch.Tensor, d: torch.Tensor,
                eps: float) -> torch.Tensor:
        ctx.eps = eps
        scale, shift = (r, d) if weight is None else (weight * r, torch.addcmul(bias, weight, d))
        if not _channels_innermost(x):
            ctx.save_for_backward(x, scale, mean, inv_std, r, d)
            return F.batch_norm(x, mean, var, scale, shift, False, 0.0, eps)
        # one addcmul over x: y = x * k + (shift - mean * k) with k = scale / sigma_B; batch
        # norm's inference kernel is 2x slower on (N, C) and 1.4x slower on channels-last
        k = scale * inv_std  # saved in its place for (N, C) rows, whose backward uses it
        ctx.save_for_backward(x, k if x.dim() == 2 else scale, mean, inv_std, r, d)
        shift = shift.addcmul(mean, k, value=-1)
        return torch.addcmul(_feature_view(x, shift), x, _feature_view(x, k))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x, factor, mean, inv_std, r, d = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        if x.dim() == 2 and _channels_innermost(x):  # factor is k = scale / sigma_B
            _, sum_g_xhat, sum_g = torch.ops.aten.native_batch_norm_backward(
                grad, x, None, None, None, mean, inv_std, True, ctx.eps, [False, True, True])
            dx = _rows_dx(grad, x, factor, mean, inv_std, sum_g_xhat, sum_g) if need_x else None
        else:  # factor is scale = w * r
            dx, sum_g_xhat, sum_g = torch.ops.aten.native_batch_norm_backward(
                grad, x, factor, None, None, mean, inv_std, True, ctx.eps,
                [need_x, need_weight, need_weight or need_bias])
        # dweight = sum(g * z) with z = x_hat * r + d
        dweight = torch.addcmul(sum_g_xhat.mul_(r), d, sum_g) if need_weight else None
        return dx, dweight, sum_g if need_bias else None, None, None, None, None, None, None


def _saved_not_recomputed(r: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """r and d as values the compiled backward must save rather than recompute.

    Under ``torch.compile`` the AOT partitioner may recompute cheap per-feature ops in the
    backward from the moving statistics, which by then this step has updated in place:
    silently wrong dweight (pytorch/pytorch PR #197039).  ``stack`` is not on its list of
    recomputable ops, so routing r and d through one pins the values of this step.
    """
    if torch.compiler.is_compiling():
        r, d = torch.stack((r, d)).unbind()
    return r, d


def _batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and biased variance over every dim but 1: batch norm's statistics
    kernel eagerly; ``var_mean`` under ``torch.compile``, where the kernel has no fake
    implementation for symbolic shapes (a recompile for a new batch size would fail)."""
    if torch.compiler.is_compiling():
        var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
        return mean, var
    return torch.batch_norm_update_stats(x, None, None, 0.0)


def _native_train(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  state: RenormState, config: RenormConfig,
                  finite_out: torch.Tensor | None) -> torch.Tensor:
    """The fast training step: updates ``state``'s tensors in place after the output."""
    mean, var = _batch_moments(x.detach())
    std = torch.add(var, config.eps).sqrt_()
    r_min, r_max, d_max = clip_limits(config, state.step, std.dtype)
    r = torch.div(std, state.std).clamp_(r_min, r_max)
    d = torch.sub(mean, state.mean).div_(state.std).clamp_(-d_max, d_max)
    r, d = _saved_not_recomputed(r, d)
    y = _NativeRenorm.apply(x, weight, bias, mean, var, std.reciprocal(), r, d, config.eps)
    # A non-finite batch mean makes every centred square, so the variance, non-finite too:
    # std alone tells whether both statistics are finite (one kernel; isfinite is eight).
    finite = std < math.inf
    torch._foreach_lerp_([state.mean, state.std],
                         [torch.where(finite, mean, state.mean),
                          torch.where(finite, std, state.std, out=std)],
                         momentum_at(config, state.step, std.dtype))
    state.step.add_(1)
    if finite_out is not None:
        finite_out.copy_(finite)
    return y


# ---------------------------------------------------------------------------
# The core's generic path
# ---------------------------------------------------------------------------


class _CoreRenorm(torch.autograd.Function):
    """The core's ``forward_train`` and ``backward`` as one autograd node.

    Returns ``y`` and the new state (mean, std, step) and the per-feature finite flags,
    which carry no gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, state: RenormState, config: RenormConfig,
                replica_mean: ReplicaMean) -> tuple:
        y, new_state, residuals = forward_train(x, state, weight, bias, config,
                                                replica_mean=replica_mean)
        ctx.save_for_backward(x)
        ctx.residuals = residuals._replace(x=None)
        ctx.mark_non_differentiable(*new_state, residuals.finite)
        ctx.set_materialize_grads(False)
        return (y, *new_state, residuals.finite)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor | None, *unused: Any) -> tuple:
        if grad is None:
            return (None,) * 6
        (x,) = ctx.saved_tensors
        residuals = ctx.residuals._replace(x=x.reshape(ctx.residuals.layout.view_shape))
        dx, dweight, dbias = backward(residuals, grad)
        return dx, dweight, dbias, None, None, None


def _core_train(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                state: RenormState, config: RenormConfig, replica_mean: ReplicaMean,
                finite_out: torch.Tensor | None) -> torch.Tensor:
    """The generic training step: commits the core's new state to ``state`` in place."""
    y, mean, std, step, finite = _CoreRenorm.apply(x, weight, bias, state, config, replica_mean)
    with torch.no_grad():
        for buffer, value in zip(state, (mean, std, step), strict=True):
            buffer.copy_(value)
        if finite_out is not None:
            finite_out.copy_(finite)
    return y


# ---------------------------------------------------------------------------
# The three entry points of a layer
# ---------------------------------------------------------------------------


def train_step(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               state: RenormState, config: RenormConfig, *, replica_mean: ReplicaMean = None,
               finite_out: torch.Tensor | None = None) -> torch.Tensor:
    """One training step of batch renormalization; ``state`` holds the layer's buffers
    (moving mean, moving std, step) and is updated in place, whole or not at all.
    ``finite_out`` receives the per-feature flags of which statistics moved."""
    if uses_native(x, state.mean, config, replica_mean):
        return _native_train(x, weight, bias, state, config, finite_out)
    return _core_train(x, weight, bias, state, config, replica_mean, finite_out)


def _fresh_state(x: torch.Tensor, num_features: int) -> RenormState:
    """Mean 0, std 1, step 0 (any state does once r = 1 and d = 0 are forced)."""
    dtype = torch.float32 if x.dtype not in _NATIVE_DTYPES else x.dtype
    return RenormState(torch.zeros(num_features, dtype=dtype, device=x.device),
                       torch.ones(num_features, dtype=dtype, device=x.device),
                       torch.zeros((), dtype=torch.int64, device=x.device))


def batch_norm_step(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    config: RenormConfig, *, replica_mean: ReplicaMean = None) -> torch.Tensor:
    """Normalize with the batch's own statistics and no state: batch renormalization with
    r = 1 and d = 0, which is plain batch norm (``track_running_stats=False``)."""
    if uses_native(x, weight, config, replica_mean):
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, config.eps)
    plain = dataclasses.replace(config, r_max=1.0, d_max=0.0, r_min=None, warmup_steps=0)
    state = _fresh_state(x, x.shape[1])
    return _CoreRenorm.apply(x, weight, bias, state, plain, replica_mean)[0]


def infer_step(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               mean: torch.Tensor, std: torch.Tensor, config: RenormConfig) -> torch.Tensor:
    """Inference, ``weight * (x - mean) / std + bias``.  Natively this is one ``addcmul``
    when features are innermost and otherwise batch norm's inference kernel with variance
    ``std * std`` and eps 0: in binary floating point ``sqrt(std * std) == std`` exactly
    for a positive std whose square neither overflows nor underflows."""
    if not uses_native(x, mean, None):
        return forward_infer(x, RenormState(mean, std, None), weight, bias, config)
    if _channels_innermost(x):
        scale = std.reciprocal() if weight is None else weight / std
        shift = torch.mul(mean, scale).neg_() if bias is None else torch.addcmul(
            bias, mean, scale, value=-1)
        return torch.addcmul(_feature_view(x, shift), x, _feature_view(x, scale))
    return F.batch_norm(x, mean, std * std, weight, bias, False, 0.0, 0.0)
