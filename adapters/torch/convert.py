"""Whole-model conversion: batch norm layers to batch renorm and back, renorm to
synchronised renorm."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    SyncBatchRenorm,
    _BatchRenorm,
    std_from_batchnorm_var,
)

__all__ = ["convert_batchnorm", "convert_sync_batchrenorm", "to_batchnorm"]

_RENORM_OF = ((nn.SyncBatchNorm, SyncBatchRenorm), (nn.BatchNorm3d, BatchRenorm3d),
              (nn.BatchNorm2d, BatchRenorm2d), (nn.BatchNorm1d, BatchRenorm1d))


def _replace_modules(module: nn.Module, matches: Callable[[nn.Module], bool],
                     make: Callable[[Any], nn.Module]) -> nn.Module:
    """``module`` with every submodule that ``matches`` (itself included) replaced by
    ``make(submodule)``, in place where it is a child."""
    if matches(module):
        return make(module)
    for name, child in module.named_children():
        new = _replace_modules(child, matches, make)
        if new is not child:
            setattr(module, name, new)
    return module


def _like(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` with ``old``'s train/eval mode and parameter ``requires_grad`` flags."""
    for (_, new_param), (_, old_param) in zip(new.named_parameters(), old.named_parameters(),
                                              strict=True):
        new_param.requires_grad_(old_param.requires_grad)
    return new.train(old.training)


def _factory(module: nn.Module) -> dict[str, Any]:
    """The device and dtype of a layer's parameters or buffers."""
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = getattr(module, "running_mean", None)
    return {} if tensor is None else {"device": tensor.device, "dtype": tensor.dtype}


def _from_batchnorm(bn: _BatchNorm, options: dict[str, Any]) -> _BatchRenorm:
    """The renorm layer that continues ``bn``: same parameters, running mean,
    ``running_std = sqrt(running_var + bn.eps)`` (batch norm's inference std) and step."""
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in bn.parameters()):
        raise ValueError(f"{type(bn).__name__} is not initialized yet: run one batch through "
                         "the model before converting it")
    renorm_class = next((r for b, r in _RENORM_OF if isinstance(bn, b)), None)
    if renorm_class is None:
        raise TypeError(f"convert_batchnorm does not know {type(bn).__name__}")
    kwargs = {"eps": bn.eps, "momentum": bn.momentum,
              **options, **_factory(bn)}
    if renorm_class is SyncBatchRenorm:
        kwargs["process_group"] = bn.process_group
    renorm = renorm_class(bn.num_features, affine=bn.affine,
                          track_running_stats=bn.track_running_stats, **kwargs)
    with torch.no_grad():
        if bn.affine:
            renorm.weight.copy_(bn.weight)
            renorm.bias.copy_(bn.bias)
        if bn.track_running_stats:
            renorm.running_mean.copy_(bn.running_mean)
            renorm.running_std.copy_(std_from_batchnorm_var(bn.running_var, bn.eps))
            renorm.num_batches_tracked.copy_(bn.num_batches_tracked)
    return _like(renorm, bn)


def convert_batchnorm(module: nn.Module, **renorm_options: Any) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` in ``module`` by the
    matching ``BatchRenorm1d/2d/3d`` or ``SyncBatchRenorm``; returns the model.

    Each carries its weight, bias, running mean, ``sqrt(running_var + eps)`` as running
    std (so inference is unchanged), ``num_batches_tracked``, eps, momentum (``None``, the
    cumulative moving average, included) and train/eval mode.  ``renorm_options`` (``r_max``,
    ``d_max``, ``warmup_steps``, ``momentum``, ...) apply to every new layer.
    """
    return _replace_modules(module, lambda m: isinstance(m, _BatchNorm),
                            lambda bn: _from_batchnorm(bn, renorm_options))


def _to_sync(layer: _BatchRenorm, process_group: Any) -> SyncBatchRenorm:
    """A ``SyncBatchRenorm`` over ``process_group`` that continues ``layer``."""
    sync = SyncBatchRenorm(layer.num_features, affine=layer.affine,
                           track_running_stats=layer.track_running_stats,
                           process_group=process_group, **_factory(layer),
                           **layer._renorm_options())
    sync.load_state_dict(layer.state_dict())
    return _like(sync, layer)


def convert_sync_batchrenorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every ``BatchRenorm1d/2d/3d`` in ``module`` by a ``SyncBatchRenorm`` over
    ``process_group`` with the same options, parameters and state; returns the model."""
    return _replace_modules(
        module, lambda m: isinstance(m, _BatchRenorm) and not isinstance(m, SyncBatchRenorm),
        lambda layer: _to_sync(layer, process_group))


def _to_batchnorm(layer: _BatchRenorm) -> _BatchNorm:
    """The batch norm layer with ``layer``'s inference: same parameters, running mean and
    ``running_var = running_std**2 - eps`` (computed in float64, so batch norm's
    ``sqrt(running_var + eps)`` gives back ``running_std`` to rounding)."""
    bn_class = next((b for b, r in _RENORM_OF if isinstance(layer, r)), None)
    if bn_class is None:
        raise TypeError(f"to_batchnorm does not know {type(layer).__name__}")
    momentum = layer.momentum
    if callable(momentum):
        raise ValueError(f"to_batchnorm: {type(layer).__name__} has the momentum schedule "
                         f"{momentum!r}, which batch norm cannot hold (a number or None)")
    kwargs = {"eps": layer.eps, "momentum": momentum, **_factory(layer)}
    if bn_class is nn.SyncBatchNorm:
        kwargs["process_group"] = layer.process_group
    bn = bn_class(layer.num_features, affine=layer.affine,
                  track_running_stats=layer.track_running_stats, **kwargs)
    with torch.no_grad():
        if layer.affine:
            bn.weight.copy_(layer.weight)
            bn.bias.copy_(layer.bias)
        if layer.track_running_stats:
            bn.running_mean.copy_(layer.running_mean)
            bn.running_var.copy_(layer.running_std.double().square() - layer.eps)
            bn.num_batches_tracked.copy_(layer.num_batches_tracked)
    return _like(bn, layer)


def to_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchRenorm1d/2d/3d`` and ``SyncBatchRenorm`` in ``module`` by the
    matching ``nn.BatchNorm1d/2d/3d`` or ``nn.SyncBatchNorm`` with the same inference
    output; returns the model, ready for tooling that knows batch norm (conv-BN folding,
    ONNX optimizers, quantization).

    Each carries weight, bias, running mean, ``running_std**2 - eps`` as running variance,
    ``num_batches_tracked``, eps, momentum (None included), ``affine``,
    ``track_running_stats``, device, dtype, train/eval mode and ``requires_grad``.
    Renorm options (``r_max``, ``d_max``, ...) have no batch norm counterpart and are
    dropped: training the result further is plain batch norm.
    """
    return _replace_modules(module, lambda m: isinstance(m, _BatchRenorm), _to_batchnorm)
