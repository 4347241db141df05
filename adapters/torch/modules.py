"""``BatchRenorm1d/2d/3d`` and ``SyncBatchRenorm``: drop-ins for ``torch.nn.BatchNorm*``.

Same constructor, buffers and train/eval behaviour as batch norm, plus the options of
``RenormConfig``.  The running statistics are a mean and a *std* (``running_std``), and
``num_batches_tracked`` is the step ``t`` that schedules and warm-up read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from portable_brn.config import RenormConfig
from portable_brn.schedules import ScheduleLike
from portable_brn.state import RenormState

from .functional import ReplicaMean, _batch_renorm

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "SyncBatchRenorm"]


def _check_num_features(num_features: object) -> None:
    if isinstance(num_features, bool) or not isinstance(num_features, int):
        raise TypeError(f"num_features must be an int, got {num_features!r}")
    if num_features < 1:
        raise ValueError(f"num_features must be >= 1, got {num_features!r}")


class _BatchRenorm(nn.Module):
    """Batch Renormalization (Ioffe, 2017) over dim 1 of ``(N, C, ...)`` inputs.

    Training (``train()``) normalizes with the batch's statistics corrected by
    ``r = clip(sigma_B / running_std, r_min, r_max)`` and
    ``d = clip((mu_B - running_mean) / running_std, -d_max, d_max)``, then moves the
    running statistics toward the batch's by ``momentum`` (the weight of the new value,
    as in batch norm; the paper's alpha, default 0.01).  Inference (``eval()``) computes
    ``weight * (x - running_mean) / running_std + bias``.

    With ``track_running_stats=False`` there is no state: like batch norm, both modes use
    the batch's statistics, and renormalization reduces to r = 1, d = 0, i.e. plain batch
    norm (``micro_batch`` and ``output_clip`` still apply).

    ``r_max``, ``d_max`` and ``r_min`` take a number or a schedule from
    ``portable_brn.schedules``; ``warmup_steps``, ``micro_batch`` and ``output_clip`` are
    as in ``RenormConfig``.  ``momentum=None`` (batch norm's cumulative average) is not
    supported.

    Every configuration trains on PyTorch's native batch-norm kernels with r and d folded
    into the affine weights (``portable_brn.adapters.torch.functional.batch_renorm``):
    float32/float64 inputs of the layer's dtype and 16-bit inputs of a float32 layer
    (statistics and state in float32, output in the input dtype, e.g. under
    ``torch.autocast``), with or without ``micro_batch`` and ``output_clip``.  Inputs of
    another dtype and synchronised statistics take the core's generic path.  Both have
    SPEC section 4's gradients; neither supports double backward.  ``torch.compile``
    traces the native path whole (``fullgraph=True``).

    After each training step the non-persistent buffer ``last_finite`` says, per feature,
    whether the batch statistics were finite; where they were not, the running
    statistics were left as they were.
    """

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float = 0.01,
                 affine: bool = True, track_running_stats: bool = True,
                 device: Any = None, dtype: torch.dtype | None = None, *,
                 r_max: ScheduleLike = 3.0, d_max: ScheduleLike = 5.0,
                 r_min: ScheduleLike | None = None, warmup_steps: int = 0,
                 micro_batch: int | None = None,
                 output_clip: tuple[float, float] | None = None) -> None:
        super().__init__()
        _check_num_features(num_features)
        self.config = RenormConfig(feature_axis=1, eps=eps, momentum=momentum, r_max=r_max,
                                   d_max=d_max, r_min=r_min, warmup_steps=warmup_steps,
                                   micro_batch=micro_batch, output_clip=output_clip)
        self.num_features = num_features
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        factory = {"device": device, "dtype": dtype}
        if self.affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_std", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
            self.register_buffer("last_finite",
                                 torch.ones(num_features, dtype=torch.bool, device=device),
                                 persistent=False)
        else:
            for name in ("running_mean", "running_std", "num_batches_tracked", "last_finite"):
                self.register_buffer(name, None)
        self.reset_parameters()

    # -- hyperparameters: one validated RenormConfig behind batch norm's attribute names

    @property
    def eps(self) -> float:
        return self.config.eps

    @eps.setter
    def eps(self, value: float) -> None:
        self.config = dataclasses.replace(self.config, eps=value)

    @property
    def momentum(self) -> float:
        return self.config.momentum

    @momentum.setter
    def momentum(self, value: float) -> None:
        self.config = dataclasses.replace(self.config, momentum=value)

    # -- batch norm's housekeeping

    def reset_running_stats(self) -> None:
        """Running mean 0, running std 1, step 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_std.fill_(1.0)
            self.num_batches_tracked.zero_()
            self.last_finite.fill_(True)

    def reset_parameters(self) -> None:
        """Running statistics reset; weight 1, bias 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        raise NotImplementedError

    def _check_input(self, input: Any) -> None:
        """Everything about ``input`` that could fail, checked before any state moves."""
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        self._check_input_dim(input)
        if not input.is_floating_point():
            raise TypeError(f"input must have a real floating point dtype (float16, bfloat16, "
                            f"float32 or float64), got {input.dtype}")
        if input.shape[1] != self.num_features:
            raise ValueError(f"input has {input.shape[1]} features along dim 1 but "
                             f"{type(self).__name__} has num_features={self.num_features}")
        reference = self.running_mean if self.running_mean is not None else self.weight
        if reference is not None and reference.device != input.device:
            raise ValueError(f"input is on {input.device} but {type(self).__name__}'s "
                             f"parameters and buffers are on {reference.device}")
        if self._uses_batch_stats() and input.numel() // input.shape[1] < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"input size {tuple(input.shape)}")

    def _uses_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def _replica_mean(self, input: torch.Tensor) -> ReplicaMean:
        """How to average a per-feature statistic over replicas; None: this process only."""
        return None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        state = None
        if self.track_running_stats:
            state = RenormState(self.running_mean, self.running_std, self.num_batches_tracked)
        return _batch_renorm(input, state, self.weight, self.bias, self._uses_batch_stats(),
                             self.config, replica_mean=self._replica_mean(input),
                             finite_out=self.last_finite)

    def extra_repr(self) -> str:
        c = self.config
        parts = [f"{self.num_features}", f"eps={c.eps}", f"momentum={c.momentum}",
                 f"affine={self.affine}", f"track_running_stats={self.track_running_stats}",
                 f"r_max={c.r_max}", f"d_max={c.d_max}"]
        for name in ("r_min", "micro_batch", "output_clip"):
            if getattr(c, name) is not None:
                parts.append(f"{name}={getattr(c, name)}")
        if c.warmup_steps:
            parts.append(f"warmup_steps={c.warmup_steps}")
        return ", ".join(parts)

    def _renorm_options(self) -> dict[str, Any]:
        """The constructor keywords that rebuild this layer's configuration."""
        c = self.config
        return {"eps": c.eps, "momentum": c.momentum, "r_max": c.r_max, "d_max": c.d_max,
                "r_min": c.r_min, "warmup_steps": c.warmup_steps,
                "micro_batch": c.micro_batch, "output_clip": c.output_clip}


class BatchRenorm1d(_BatchRenorm):
    """Batch renormalization over ``(N, C)`` or ``(N, C, L)`` inputs; see ``_BatchRenorm``."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchRenorm2d(_BatchRenorm):
    """Batch renormalization over ``(N, C, H, W)`` inputs; see ``_BatchRenorm``."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchRenorm3d(_BatchRenorm):
    """Batch renormalization over ``(N, C, D, H, W)`` inputs; see ``_BatchRenorm``."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


def _all_reduce_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


class SyncBatchRenorm(_BatchRenorm):
    """Batch renormalization whose batch statistics span every process of ``process_group``
    (default: the world), like ``torch.nn.SyncBatchNorm``, for inputs ``(N, C, ...)``.

    Each step all-reduces the per-feature batch mean and variance in the forward and the
    two per-feature gradient means in the backward (the core's ``replica_mean``), weighting
    each process by its number of elements, so the statistics are exactly those of the
    concatenated batch and every process ends the step with the same running statistics.
    Parameter gradients stay local, as with ``SyncBatchNorm``: DDP sums them.  Outside
    training, or when ``torch.distributed`` is not initialized or has one process, it is
    an ordinary ``BatchRenorm``.  Always on the core's generic path.
    """

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float = 0.01,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Any = None, device: Any = None,
                 dtype: torch.dtype | None = None, **renorm_options: Any) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device, dtype, **renorm_options)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _replica_mean(self, input: torch.Tensor) -> ReplicaMean:
        if not (self._uses_batch_stats() and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1):
            return None
        group = self.process_group
        local = torch.tensor(float(input.numel() // input.shape[1]), dtype=torch.float64,
                             device=input.device)
        share = local / _all_reduce_sum(local.clone(), group)

        def replica_mean(array: torch.Tensor) -> torch.Tensor:
            return _all_reduce_sum(array * share.to(array.dtype), group)

        return replica_mean
