"""Batch renormalization with statistics over a ``torch.distributed`` process group.

The native path (float32/float64 input of the layer's dtype on CPU or CUDA, no
``micro_batch``, no ``output_clip``) works as ``torch.nn.SyncBatchNorm`` does: each
process computes its local count, mean and variance with native kernels, and ONE
all_reduce combines them, packed in one float64 tensor, as sums about a shift every
process shares (the running mean, identical on every process), so a large offset costs
no accuracy.  The forward output is batch norm's inference kernel with r and d folded
into the affine weights; the backward's two per-feature sums come from
``native_batch_norm_backward`` and are combined by ONE all_reduce.  Empty local batches
take part with zero counts, and the one-value-per-feature check reads the *global*
count after the all_reduce, so every process computes the global result or raises the
same error; none waits forever in a collective another one skipped.

Everything else (``micro_batch``, ``output_clip``, 16-bit or mixed dtypes) takes the
core's generic path, whose per-feature averages over processes are one all_reduce each;
there an all_reduce of every process's count and of whether its input was usable comes
first, so a local batch the core refuses raises on every process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from portable_brn.config import RenormConfig
from portable_brn.layout import make_layout
from portable_brn.renorm import clip_limits, momentum_at
from portable_brn.state import RenormState

from .functional import ReplicaMean, _batch_renorm

__all__ = ["sync_step"]


def _all_reduce_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _feature_view(x: torch.Tensor, array: torch.Tensor) -> torch.Tensor:
    """A per-feature array shaped to broadcast against ``x`` along dim 1."""
    return array.view((1, -1) + (1,) * (x.dim() - 2))


def _check_global_count(count: int) -> None:
    """The same error on every process when the global batch has one value per feature."""
    if count < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got {count} "
                         f"over all processes of the group")


def _local_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's per-feature mean and biased variance, in float64, by native kernels.

    ``batch_norm_update_stats`` is accurate for features outside the innermost dimension
    (NCHW); with features innermost ((N, C), channels-last) it accumulates in float32 and
    loses the mean at a large offset (4.8e-4 of the std at x = 100 + N(0, 1)), so there the
    mean gets the mean of ``x - mean`` added, which is small and exact enough (a float64
    sum costs a multiple of it); the variance stays within 5e-6 relative.
    """
    mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    mean64 = mean.to(torch.float64)
    if x.stride(1) == 1:
        mean64 += torch.sub(x, _feature_view(x, mean)).mean(_reduce_dims(x))
    return mean64, var.to(torch.float64)


def _global_moments(x: torch.Tensor, shift: torch.Tensor,
                    group: Any) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The global count and float64 mean and biased variance of ``x`` over the group, by
    one all_reduce of ``(n, n * (mean - shift), M2 + n * (mean - shift) ** 2)``."""
    features = x.shape[1]
    local = x.numel() // features
    packed = torch.zeros(1 + 2 * features, dtype=torch.float64, device=x.device)
    packed[0] = local
    if local:
        mean, var = _local_moments(x.detach())
        centred = mean - shift
        packed[1:1 + features] = centred * local
        packed[1 + features:] = (var + centred * centred) * local
    _all_reduce_sum(packed, group)
    count = int(packed[0].item())
    _check_global_count(count)
    centred = packed[1:1 + features] / count
    var = (packed[1 + features:] / count - centred * centred).clamp_(min=0.0)
    return count, centred + shift, var


class _SyncRenorm(torch.autograd.Function):
    """``y = (x - mean) * (w * r / sigma_B) + (w * d + b)`` with the global batch mean and
    std; the backward sums ``g`` and ``g * x_hat`` locally, all-reduces them once, and
    returns dx of the global batch and the local dweight and dbias (DDP sums those)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, mean: torch.Tensor, inv_std: torch.Tensor,
                r: torch.Tensor, d: torch.Tensor, count: int, group: Any) -> torch.Tensor:
        scale, shift = (r, d) if weight is None else (weight * r, torch.addcmul(bias, weight, d))
        ctx.save_for_backward(x, scale, mean, inv_std, r, d)
        ctx.count, ctx.group = count, group
        ones = torch.ones_like(mean)
        # batch norm's inference kernel with variance 1 and eps 0 is (x - mean) * k + shift:
        # x - mean is exact near a large mean, where x * k + (shift - mean * k) is not
        return F.batch_norm(x, mean, ones, scale * inv_std, shift, False, 0.0, 0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x, scale, mean, inv_std, r, d = ctx.saved_tensors
        features = x.shape[1]
        if x.numel():
            _, sum_g_xhat, sum_g = torch.ops.aten.native_batch_norm_backward(
                grad, x, None, None, None, mean, inv_std, True, 0.0, [False, True, True])
        else:
            sum_g_xhat = sum_g = torch.zeros_like(mean)
        packed = _all_reduce_sum(torch.cat((sum_g, sum_g_xhat)).to(torch.float64), ctx.group)
        mean_g = (packed[:features] / ctx.count).to(x.dtype)
        mean_g_xhat = (packed[features:] / ctx.count).to(x.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            # dx = k * (g - mean(g) - x_hat * mean(g * x_hat)) with k = w * r / sigma_B
            k = scale * inv_std
            x_scale = -k * inv_std * mean_g_xhat
            dx = F.batch_norm(x, mean, torch.ones_like(mean), x_scale, -k * mean_g,
                              False, 0.0, 0.0).addcmul_(grad, _feature_view(x, k))
        need_weight, need_bias = ctx.needs_input_grad[1:3]
        dweight = torch.addcmul(sum_g_xhat * r, d, sum_g) if need_weight else None
        return dx, dweight, sum_g if need_bias else None, None, None, None, None, None, None


def _native_sync_step(x: torch.Tensor, weight: torch.Tensor | None,
                      bias: torch.Tensor | None, state: RenormState | None,
                      config: RenormConfig, group: Any,
                      finite_out: torch.Tensor | None) -> torch.Tensor:
    """The native synchronised step; ``state`` None is batch norm (r = 1, d = 0)."""
    shift = (torch.zeros(x.shape[1], dtype=torch.float64, device=x.device) if state is None
             else state.mean.to(torch.float64))
    count, mean, var = _global_moments(x, shift, group)
    std = torch.sqrt(var + config.eps)
    if state is None:
        r, d = torch.ones_like(std), torch.zeros_like(std)
    else:
        r_min, r_max, d_max = clip_limits(config, state.step, torch.float64)
        running_std = state.std.to(torch.float64)
        r = torch.div(std, running_std).clamp_(r_min, r_max)
        d = torch.sub(mean, shift).div_(running_std).clamp_(-d_max, d_max)
    dtype = x.dtype
    y = _SyncRenorm.apply(x, weight, bias, mean.to(dtype), std.reciprocal().to(dtype),
                          r.to(dtype), d.to(dtype), count, group)
    if state is not None:
        finite = torch.isfinite(mean) & torch.isfinite(std)
        momentum = momentum_at(config, state.step, torch.float64)  # a schedule, or None's
        with torch.no_grad():
            for buffer, target in ((state.mean, mean), (state.std, std)):
                moved = buffer + momentum * (target - buffer)
                buffer.copy_(torch.where(finite, moved, buffer))
            state.step.add_(1)
            if finite_out is not None:
                finite_out.copy_(finite)
    return y


def _checked_replica_mean(x: torch.Tensor, config: RenormConfig, group: Any,
                          weighted: bool = True) -> ReplicaMean:
    """The core's replica average, after one all_reduce of every process's count and of
    whether the core accepts its input, so that a refused input raises the same error on
    every process.  ``weighted`` weights each process by its number of elements (the
    core's contract for unequal batches); unweighted, it is the plain mean, which the
    core's masked statistics need (they average sums and counts, whose ratio is then the
    global one)."""
    error = None
    if x.shape[0] == 0:
        error = "an empty batch"
    else:
        try:
            make_layout(tuple(x.shape), 1, config.micro_batch)
        except ValueError as refused:
            error = str(refused)
    counts = torch.tensor([x.numel() // x.shape[1], error is not None], dtype=torch.float64,
                          device=x.device)
    _all_reduce_sum(counts, group)
    if counts[1] > 0:  # only on this path: every process learns every refusal, raises it
        messages = [None] * dist.get_world_size(group)
        dist.all_gather_object(messages, error, group=group)
        raise ValueError("SyncBatchRenorm's generic path (micro_batch, output_clip, 16-bit "
                         "inputs) refused the local batch of " + "; ".join(
                             f"process {rank}: {message}"
                             for rank, message in enumerate(messages) if message))
    _check_global_count(int(counts[0].item()))
    share = ((x.numel() // x.shape[1]) / counts[0] if weighted
             else counts.new_tensor(1.0 / dist.get_world_size(group)))

    def replica_mean(array: torch.Tensor) -> torch.Tensor:
        return _all_reduce_sum(array * share.to(array.dtype), group)

    return replica_mean


def sync_step(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
              state: RenormState | None, config: RenormConfig, group: Any, *,
              finite_out: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """One training step whose batch statistics span ``group``; ``state`` (the layer's
    buffers, updated in place) None means batch norm with the global batch's statistics
    (``track_running_stats=False``); ``mask`` counts only its elements, on the core's
    generic path."""
    reference = weight if state is None else state.mean
    if mask is None and _takes_native(x, reference, config):
        return _native_sync_step(x, weight, bias, state, config, group, finite_out)
    replica_mean = _checked_replica_mean(x, config, group, weighted=mask is None)
    return _batch_renorm(x, state, weight, bias, True, config, replica_mean=replica_mean,
                         finite_out=finite_out, mask=mask)


def _takes_native(x: torch.Tensor, reference: torch.Tensor | None,
                  config: RenormConfig) -> bool:
    """Whether the native synchronised step computes this call: a float32/float64 ``x``
    on CPU or CUDA of the layer's dtype (``reference``), without ``micro_batch`` or
    ``output_clip``."""
    return (x.dtype in (torch.float32, torch.float64) and (x.is_cpu or x.is_cuda)
            and (reference is None or reference.dtype == x.dtype)
            and config.micro_batch is None and config.output_clip is None)
