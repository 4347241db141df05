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
    return _rebuilt(bn, renorm_class, {"momentum": bn.momentum, **options}, "running_std",
                    lambda: std_from_batchnorm_var(bn.running_var, bn.eps))


def _rebuilt(source: nn.Module, cls: type, options: dict[str, Any], spread: str,
             spread_value: Callable[[], torch.Tensor]) -> nn.Module:
    """A ``cls`` layer continuing ``source`` (batch norm or renorm, either way): its
    features, ``eps``, device, dtype, process group, parameters, running mean and step,
    ``options``, and the running buffer ``spread`` (``running_std`` or ``running_var``)
    set to ``spread_value()``; ``source``'s modes carried over."""
    kwargs = {"eps": source.eps, **options, **_factory(source)}
    if cls in (SyncBatchRenorm, nn.SyncBatchNorm):
        kwargs["process_group"] = source.process_group
    layer = cls(source.num_features, affine=source.affine,
                track_running_stats=source.track_running_stats, **kwargs)
    with torch.no_grad():
        if source.affine:
            layer.weight.copy_(source.weight)
            layer.bias.copy_(source.bias)
        if source.track_running_stats:
            layer.running_mean.copy_(source.running_mean)
            getattr(layer, spread).copy_(spread_value())
            layer.num_batches_tracked.copy_(source.num_batches_tracked)
    return _like(layer, source)


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
    return _rebuilt(layer, bn_class, {"momentum": momentum}, "running_var",
                    lambda: layer.running_std.double().square() - layer.eps)


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
