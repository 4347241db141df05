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
import torch.nn.functional as F
from torch import nn

from portable_brn.config import RenormConfig
from portable_brn.conventions import torch_options
from portable_brn.schedules import ScheduleLike, cumulative_average
from portable_brn.state import RenormState

from .functional import _batch_renorm, _infer
from .sync import sync_step

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "SyncBatchRenorm"]


def _check_num_features(num_features: object) -> None:
    if isinstance(num_features, bool) or not isinstance(num_features, int):
        raise TypeError(f"num_features must be an int, got {num_features!r}")
    if num_features < 1:
        raise ValueError(f"num_features must be >= 1, got {num_features!r}")


def _entry_problem(name: str, value: Any, current: torch.Tensor) -> str | None:
    """Why checkpoint entry ``name`` cannot replace ``current`` exactly, or None."""
    if not isinstance(value, torch.Tensor):
        return f"expected a tensor, got {type(value).__name__}"
    if value.shape != current.shape:
        return f"shape {tuple(value.shape)} where the layer has {tuple(current.shape)}"
    if value.is_complex() or value.dtype == torch.bool:
        return f"dtype {value.dtype} is not real"
    if name == "num_batches_tracked":
        step = value.to(torch.float64) if value.is_floating_point() else value
        if not bool(torch.isfinite(step).all()) or bool((step != step.round()).any()):
            return f"the step must be a whole number, got {value.item()!r}"
        if bool((step < 0).any()) or bool((step >= 2.0 ** 63).any()):
            return f"the step must be >= 0 and fit int64, got {value.item()!r}"
        return None
    if not value.is_floating_point():
        return f"dtype {value.dtype} is not floating point"
    back = value.detach().to(current.dtype).to(value.dtype)
    if not torch.allclose(back, value, rtol=0.0, atol=0.0, equal_nan=True):
        return f"{value.dtype} values that {current.dtype} cannot hold exactly (convert " \
               f"the layer or the checkpoint first)"
    if name in ("running_mean", "running_std") and not bool(torch.isfinite(value).all()):
        return "not finite"
    if name == "running_std" and not bool((value > 0).all()):
        return "a running std must be > 0"
    return None


def std_from_batchnorm_var(var: torch.Tensor, eps: float) -> torch.Tensor:
    """Batch norm's inference std ``sqrt(running_var + eps)``, computed in float64 and
    returned in ``var``'s dtype (the one conversion: checkpoints and ``convert_batchnorm``)."""
    return torch.sqrt(var.double() + eps).to(var.dtype)


def _config_property(name: str) -> property:
    """A constructor option kept in ``self.config``: setting it validates the value (the
    error names it, the layer stays as it was) and takes effect from the next call."""

    def get(self: _BatchRenorm) -> Any:
        return getattr(self.config, name)

    def set(self: _BatchRenorm, value: Any) -> None:
        self.config = dataclasses.replace(self.config, **{name: value})

    return property(get, set, doc=f"``RenormConfig.{name}``, settable between calls.")


def _fixed_property(name: str) -> property:
    """A constructor option that shapes the parameters and buffers: read-only."""

    def get(self: _BatchRenorm) -> Any:
        return getattr(self, "_" + name)

    def set(self: _BatchRenorm, value: Any) -> None:
        raise AttributeError(f"{name} of {type(self).__name__} is fixed at construction (it "
                             f"decides the parameters and buffers); build a new layer instead")

    return property(get, set, doc=f"``{name}`` as constructed (read-only).")


def _rate(momentum: Any) -> Any:
    """The core's momentum for torch's: None is the cumulative moving average."""
    return cumulative_average() if momentum is None else momentum


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
    as in ``RenormConfig``.  ``momentum=None`` is batch norm's cumulative moving average
    (weight ``1 / num_batches_tracked`` for the new value).

    Every configuration trains natively (``portable_brn.adapters.torch.functional``):
    float32/float64 inputs of the layer's dtype and 16-bit inputs of a float32 layer
    (statistics and state in float32, output in the input dtype, e.g. under
    ``torch.autocast``), with or without ``micro_batch`` and ``output_clip``.  On the CPU
    the per-feature algebra, ``(N, C)`` steps and clipping run in C++ code compiled on the
    first training step (under a minute, once per machine; ``PORTABLE_BRN_NO_COMPILE=1``
    or no C++ compiler: tensor operations instead).  Inputs of another dtype and
    synchronised statistics take the core's generic path.  All have specification section 4's
    gradients and no second derivative (backpropagating through a gradient taken with
    ``create_graph=True`` raises).  ``torch.compile`` traces the native path whole
    (``fullgraph=True``).

    After each training step the non-persistent buffer ``last_finite`` says, per feature,
    whether the batch statistics were finite; where they were not, the running
    statistics were left as they were.  ``num_batches_tracked`` advances on every
    training step, a non-finite batch included, so that schedules and warm-up keep
    counting steps, not good batches.

    Every renorm option (``eps``, ``momentum``, ``r_max``, ``d_max``, ``r_min``,
    ``warmup_steps``, ``micro_batch``, ``output_clip``) is a property: setting it
    validates the value (an error names it and leaves the layer as it was) and takes
    effect from the next call.  ``num_features``, ``affine`` and ``track_running_stats``
    shape the parameters and buffers and are read-only.

    ``torch.jit.script`` compiles the layer's inference (eval mode with running
    statistics: ``weight * (x - running_mean) / running_std + bias``); a scripted layer
    in training mode, or without running statistics, raises, since TorchScript cannot
    run the training step.  ``torch.jit.trace`` and ``torch.export.export`` of an
    eval-mode model are the supported graph paths; ``torch.compile`` trains.
    """

    # TorchScript compiles properties unless named here; these read ``self.config``
    __jit_unused_properties__ = ("eps", "momentum", "r_max", "d_max", "r_min", "warmup_steps",
                                 "micro_batch", "output_clip", "num_features", "affine",
                                 "track_running_stats")

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float | None = 0.01,
                 affine: bool = True, track_running_stats: bool = True,
                 device: Any = None, dtype: torch.dtype | None = None, *,
                 r_max: ScheduleLike = 3.0, d_max: ScheduleLike = 5.0,
                 r_min: ScheduleLike | None = None, warmup_steps: int = 0,
                 micro_batch: int | None = None,
                 output_clip: tuple[float, float] | None = None) -> None:
        super().__init__()
        _check_num_features(num_features)
        self.config = RenormConfig(feature_axis=1, eps=eps, momentum=_rate(momentum), r_max=r_max,
                                   d_max=d_max, r_min=r_min, warmup_steps=warmup_steps,
                                   micro_batch=micro_batch, output_clip=output_clip)
        self._num_features = num_features
        self._affine = bool(affine)
        self._track_running_stats = bool(track_running_stats)
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

    eps = _config_property("eps")
    r_max = _config_property("r_max")
    d_max = _config_property("d_max")
    r_min = _config_property("r_min")
    warmup_steps = _config_property("warmup_steps")
    micro_batch = _config_property("micro_batch")
    output_clip = _config_property("output_clip")
    num_features = _fixed_property("num_features")
    affine = _fixed_property("affine")
    track_running_stats = _fixed_property("track_running_stats")

    @property
    def momentum(self) -> float | None:
        """The weight of the new value; None: the cumulative moving average."""
        return torch_options(self.config)["momentum"]

    @momentum.setter
    def momentum(self, value: float | None) -> None:
        self.config = dataclasses.replace(self.config, momentum=_rate(value))

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

    # -- checkpoints: every entry checked before any is copied; all or nothing

    def load_state_dict(self, state_dict: Any, strict: bool = True,
                        assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, all or nothing: when it raises (a bad entry, or
        a missing or unexpected key with ``strict``), the layer keeps its state."""
        tensors = {**self._parameters, **self._buffers}
        saved = {name: (value, value.detach().clone()) for name, value in tensors.items()
                 if value is not None}
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except Exception:
            with torch.no_grad():
                for name, (original, copy) in saved.items():
                    original.copy_(copy)
                    table = self._parameters if name in self._parameters else self._buffers
                    table[name] = original
            raise

    _version = 3  # version 3 stores running_std; older dicts may be batch norm's

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        """A batch-norm state dict (before version 3, with ``running_var`` and no
        ``running_std``) loads with ``running_std = sqrt(running_var + eps)``; then every
        entry is checked, and a bad one loads nothing of this layer."""
        version = local_metadata.get("version")
        var_key, std_key = prefix + "running_var", prefix + "running_std"
        older = version is None or version < 3
        if older and isinstance(state_dict.get(var_key), torch.Tensor) \
                and std_key not in state_dict:
            var = state_dict.pop(var_key)
            state_dict[std_key] = std_from_batchnorm_var(var, self.eps)
        problems = self._state_dict_problems(state_dict, prefix)
        if problems:  # load_state_dict raises them all; nothing of this layer moved
            error_msgs.extend(problems)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def _state_dict_problems(self, state_dict: dict[str, Any], prefix: str) -> list[str]:
        """What is wrong with this layer's entries of ``state_dict``: values that are not
        tensors, of another shape, of a dtype that cannot hold them exactly, a
        non-finite running statistic, a running std <= 0, or a step that is not a
        non-negative integer."""
        own = {name: value for name, value in self._parameters.items() if value is not None}
        own.update((name, value) for name, value in self._buffers.items()
                   if value is not None and name not in self._non_persistent_buffers_set)
        problems = []
        for name, current in own.items():
            if prefix + name in state_dict:
                problem = _entry_problem(name, state_dict[prefix + name], current)
                if problem:
                    problems.append(f'"{prefix}{name}": {problem}')
        return problems

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
        reference = self.running_mean
        if reference is None:
            reference = self.weight
        if reference is not None and reference.device != input.device:
            raise ValueError(f"input is on {input.device} but {type(self).__name__}'s "
                             f"parameters and buffers are on {reference.device}")
        self._check_batch_size(input)

    def _check_batch_size(self, input: torch.Tensor) -> None:
        if self._uses_batch_stats() and input.numel() // input.shape[1] < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"input size {tuple(input.shape)}")

    def _uses_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalize ``input``.  ``mask`` (boolean, broadcastable to ``input``, True where
        an element counts), as in ``flax.linen.BatchNorm``: in training only the counted
        elements enter the batch statistics, r, d and the update; every element is
        transformed alike (inference ignores it)."""
        if torch.jit.is_scripting():
            return self._scripted_inference(input)
        return self._forward(input, mask)

    def _scripted_inference(self, input: torch.Tensor) -> torch.Tensor:
        """What ``torch.jit.script`` compiles: inference with the running statistics."""
        mean, std = self.running_mean, self.running_std
        if self.training or mean is None or std is None:
            raise RuntimeError(  # a literal: TorchScript reads no global strings
                "a BatchRenorm layer under torch.jit.script runs inference only (eval mode "
                "with track_running_stats=True): TorchScript cannot run its training step. "
                "Train eagerly or under torch.compile; for a graph of the model use "
                "torch.jit.trace or torch.export.export")
        return F.batch_norm(input, mean, std * std, self.weight, self.bias, False, 0.0, 0.0)

    @torch.jit.unused
    def _forward(self, input: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        self._check_input(input)
        if mask is None and not self._uses_batch_stats():  # inference: one kernel
            return _infer(input, self.weight, self.bias, self.running_mean, self.running_std)
        state = None
        if self.track_running_stats:
            state = RenormState(self.running_mean, self.running_std, self.num_batches_tracked)
        return _batch_renorm(input, state, self.weight, self.bias, self._uses_batch_stats(),
                             self.config, finite_out=self.last_finite, mask=mask)

    def extra_repr(self) -> str:
        c = self.config
        parts = [f"{self.num_features}", f"eps={c.eps}", f"momentum={self.momentum}",
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
        return torch_options(self.config)


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


class SyncBatchRenorm(_BatchRenorm):
    """Batch renormalization whose batch statistics span every process of ``process_group``
    (default: the world), like ``torch.nn.SyncBatchNorm``, for inputs ``(N, C, ...)``.

    The statistics are exactly those of the concatenated batch, whatever each process's
    share of it (an empty local batch included), and every process ends the step with
    the same running statistics.  Float32/float64 inputs of the layer's dtype without
    ``micro_batch`` or ``output_clip`` run on native kernels with one all_reduce in the
    forward (count, sums) and one in the backward (the two per-feature gradient sums),
    as ``SyncBatchNorm``; the one-value-per-channel check reads the global count, so every
    process computes the global result or raises the same error.  The other
    configurations take the core's generic path (a few more all_reduces), which needs a
    usable local batch on every process, and otherwise raises on every process.  With
    ``micro_batch`` each micro-batch stays on its process and only the state update is
    averaged.  Parameter gradients stay local, as with ``SyncBatchNorm``: DDP sums them.
    Outside training, or when ``torch.distributed`` is not initialized or has one
    process, it is an ordinary ``BatchRenorm``.  See ``adapters/torch/sync.py``.
    """

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float | None = 0.01,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Any = None, device: Any = None,
                 dtype: torch.dtype | None = None, **renorm_options: Any) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device, dtype, **renorm_options)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _sync_group(self) -> Any:
        """Whether this call synchronises: the process group (None: the world) or False."""
        if (self._uses_batch_stats() and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1):
            return self.process_group
        return False

    def _check_batch_size(self, input: torch.Tensor) -> None:
        if self._sync_group() is False:  # synchronised: the global count, after the all_reduce
            super()._check_batch_size(input)

    @torch.jit.unused
    def _forward(self, input: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        group = self._sync_group()
        if group is False:
            return super()._forward(input, mask)
        self._check_input(input)
        state = None if not self.track_running_stats else RenormState(
            self.running_mean, self.running_std, self.num_batches_tracked)
        return sync_step(input, self.weight, self.bias, state, self.config, group,
                         finite_out=self.last_finite, mask=mask)
