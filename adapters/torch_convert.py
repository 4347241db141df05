"""Whole-model tools: batch norm to batch renorm, renorm to synchronised renorm, and exact
recalibration of the running statistics over a data set."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from portable_brn.moments import Moments, merge_moments, moments

from .torch_modules import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    SyncBatchRenorm,
    _BatchRenorm,
)

__all__ = ["convert_batchnorm", "convert_sync_batchrenorm", "recalibrate"]

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
    kwargs = {"eps": bn.eps, "momentum": 0.01 if bn.momentum is None else bn.momentum,
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
            renorm.running_std.copy_(torch.sqrt(bn.running_var + bn.eps))
            renorm.num_batches_tracked.copy_(bn.num_batches_tracked)
    return _like(renorm, bn)


def convert_batchnorm(module: nn.Module, **renorm_options: Any) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` in ``module`` by the
    matching ``BatchRenorm1d/2d/3d`` or ``SyncBatchRenorm``; returns the model.

    Each carries its weight, bias, running mean, ``sqrt(running_var + eps)`` as running
    std (so inference is unchanged), ``num_batches_tracked``, eps, momentum (batch norm's
    ``momentum=None`` becomes 0.01) and train/eval mode.  ``renorm_options`` (``r_max``,
    ``d_max``, ``warmup_steps``, ``momentum``, ...) apply to every new layer.
    """
    return _replace_modules(module, lambda m: isinstance(m, _BatchNorm),
                            lambda bn: _from_batchnorm(bn, renorm_options))


def _to_sync(layer: _BatchRenorm, process_group: Any) -> SyncBatchRenorm:
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


def _merge_across_processes(pooled: Moments | None, like: torch.Tensor,
                            group: Any) -> Moments | None:
    """The exact pooled moments of every process, merged in rank order (so identical on
    each); a process that saw nothing contributes nothing."""
    if pooled is None:
        row = torch.zeros((3, like.shape[0]), dtype=torch.float64, device=like.device)
    else:
        count = torch.full_like(pooled.mean, pooled.count, dtype=torch.float64)
        row = torch.stack([pooled.mean.double(), pooled.var.double(), count])
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row, group=group)
    parts = [Moments(r[0], r[1], float(r[2, 0])) for r in rows if float(r[2, 0]) > 0]
    return merge_moments(parts) if parts else None


def _is_distributed(layer: _BatchRenorm) -> bool:
    return (isinstance(layer, SyncBatchRenorm) and dist.is_available()
            and dist.is_initialized() and dist.get_world_size(layer.process_group) > 1)


def _record_moments(pooled: dict[_BatchRenorm, Moments | None]) -> Callable:
    """A forward hook adding the moments of a layer's input to ``pooled``, exactly (after
    the forward, so the layer's own checks of the input come first)."""

    def hook(layer: _BatchRenorm, args: tuple, output: Any) -> None:
        part = moments(args[0].detach(), 1)
        previous = pooled[layer]
        pooled[layer] = part if previous is None else merge_moments((previous, part))

    return hook


def _run(model: nn.Module, batches: Iterable[Any], device: Any) -> int:
    """Feed every batch (or the first element of a tuple/list batch) to ``model`` in
    inference mode; returns how many there were."""
    count = 0
    with torch.no_grad():
        for batch in batches:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(x if device is None else x.to(device))
            count += 1
    return count


def recalibrate(model: nn.Module, batches: Iterable[Any], *, device: Any = None) -> nn.Module:
    """Set every renorm layer's running mean and std to the exact population statistics
    of its inputs over ``batches`` (SPEC section 3; patent claims 14, 15 and 18), like
    ``torch.optim.swa_utils.update_bn``; returns the model, its train/eval modes as they
    were.

    One pass, with the model in eval mode: each layer's statistics are those of its input
    as the network computes it at inference with the statistics it had when the call
    began.  Per-batch moments are merged exactly (Chan et al.), then
    ``running_std = sqrt(pooled biased variance + eps)``; the step is kept.  When the new
    data moves upstream layers' statistics a lot (a new domain), a second call refines
    the deeper layers.  ``SyncBatchRenorm`` layers pool over all processes of their group
    (a collective: every process must call this).  The state changes only after the last
    batch; layers that saw no input keep theirs.
    """
    layers = [m for m in model.modules()
              if isinstance(m, _BatchRenorm) and m.track_running_stats]
    pooled: dict[_BatchRenorm, Moments | None] = dict.fromkeys(layers)
    modes = {m: m.training for m in model.modules()}
    hooks = [layer.register_forward_hook(_record_moments(pooled)) for layer in layers]
    try:
        model.eval()
        seen = _run(model, batches, device)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    if not seen:
        raise ValueError("batches must yield at least one batch, got none")
    for layer in layers:
        _commit(layer, pooled[layer])
    return model


def _commit(layer: _BatchRenorm, pooled: Moments | None) -> None:
    """Write the pooled moments into ``layer``'s running statistics."""
    if _is_distributed(layer):
        pooled = _merge_across_processes(pooled, layer.running_mean, layer.process_group)
    if pooled is None:
        return
    with torch.no_grad():
        layer.running_mean.copy_(pooled.mean)
        layer.running_std.copy_(torch.sqrt(pooled.var + layer.eps))
