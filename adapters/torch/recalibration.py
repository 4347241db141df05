"""Exact recalibration of the running statistics over a data set (specification section 3; patent
claims 14, 15 and 18), one layer after another in forward order, across processes for
``SyncBatchRenorm``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from portable_brn.moments import Moments, merge_moments, moments

from .modules import SyncBatchRenorm, _BatchRenorm

__all__ = ["recalibrate"]


def _gather_rows(row: torch.Tensor, group: Any) -> list[torch.Tensor]:
    """``row`` of every process of ``group``, in rank order (a collective)."""
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row, group=group)
    return rows


def _merge_across_processes(pooled: Moments | None, like: torch.Tensor,
                            group: Any) -> Moments | None:
    """The exact pooled moments of every process, merged in rank order (so identical on
    each); a process that saw nothing contributes nothing."""
    if pooled is None:
        row = torch.zeros((3, like.shape[0]), dtype=torch.float64, device=like.device)
    else:
        count = torch.full_like(pooled.mean, pooled.count, dtype=torch.float64)
        row = torch.stack([pooled.mean.double(), pooled.var.double(), count])
    rows = _gather_rows(row, group)
    parts = [Moments(r[0], r[1], float(r[2, 0])) for r in rows if float(r[2, 0]) > 0]
    return merge_moments(parts) if parts else None


def _is_distributed(layer: _BatchRenorm) -> bool:
    """Whether ``layer`` pools its statistics over more than one process."""
    return (isinstance(layer, SyncBatchRenorm) and dist.is_available()
            and dist.is_initialized() and dist.get_world_size(layer.process_group) > 1)


def _process_groups(layers: list[_BatchRenorm]) -> list[tuple[Any, torch.device]]:
    """The distinct process groups ``layers`` pool over, each with its collectives' device."""
    groups: dict[int, tuple[Any, torch.device]] = {}
    for layer in filter(_is_distributed, layers):
        groups.setdefault(id(layer.process_group),
                          (layer.process_group, layer.running_mean.device))
    return list(groups.values())


def _agree(layers: list[_BatchRenorm], order: list[_BatchRenorm],
           count: int) -> tuple[list[_BatchRenorm], int]:
    """The forward order of ``layers``, and a count of batches that is zero exactly when
    neither this process nor any process it pools with saw one: a process whose
    iterable was empty takes the order of one that was not, so that all make the same
    collectives in the same sequence."""
    for group, device in _process_groups(layers):
        position = {layer: index for index, layer in enumerate(order)}
        row = torch.tensor([count, *(position.get(layer, -1) for layer in layers)],
                           dtype=torch.float64, device=device)
        rows = _gather_rows(row, group)
        count = int(sum(float(r[0]) for r in rows))
        seen = next((r[1:].tolist() for r in rows if float(r[0]) > 0), None)
        order = order if seen is None else _by_position(layers, seen)
    return order, count


def _by_position(layers: list[_BatchRenorm], positions: list[float]) -> list[_BatchRenorm]:
    """The ``layers`` whose position is not negative, sorted by it."""
    return [layers[i] for _, i in sorted((p, i) for i, p in enumerate(positions) if p >= 0)]


def _record_moments(pooled: dict[_BatchRenorm, Moments]) -> Callable:
    """A forward hook adding the moments of a layer's input to ``pooled`` (keys in the
    order the layers first ran), exactly, after the forward so that the layer's own checks
    of the input come first."""

    def hook(layer: _BatchRenorm, args: tuple, output: Any) -> None:
        part = moments(args[0].detach(), 1)
        previous = pooled.get(layer)
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


def _measure(model: nn.Module, batches: Iterable[Any], layers: list[_BatchRenorm],
             device: Any) -> tuple[dict[_BatchRenorm, Moments], int]:
    """One pass over ``batches``: the pooled moments of the input of each of ``layers``
    that ran (in the order they first ran) and the number of batches."""
    pooled: dict[_BatchRenorm, Moments] = {}
    hooks = [layer.register_forward_hook(_record_moments(pooled)) for layer in layers]
    try:
        count = _run(model, batches, device)
    finally:
        for hook in hooks:
            hook.remove()
    return pooled, count


def _commit(layer: _BatchRenorm, pooled: Moments | None) -> None:
    """Write the pooled moments into ``layer``'s running statistics (pooled over every
    process first for a distributed ``SyncBatchRenorm``: a collective)."""
    if _is_distributed(layer):
        pooled = _merge_across_processes(pooled, layer.running_mean, layer.process_group)
    if pooled is None:
        return
    with torch.no_grad():
        layer.running_mean.copy_(pooled.mean)
        layer.running_std.copy_(torch.sqrt(pooled.var + layer.eps))


def _recalibrate_in_order(model: nn.Module, layers: list[_BatchRenorm], batches: Iterable[Any],
                          device: Any) -> None:
    """Commit each layer's statistics in forward order, one pass per layer, so that every
    layer is measured on its input under the new statistics of the layers before it."""
    pooled, seen = _measure(model, batches, layers, device)
    order, total = _agree(layers, list(pooled), seen)
    if not total:
        raise ValueError("batches must yield at least one batch, got none")
    for index, layer in enumerate(order):
        if index:
            pooled, again = _measure(model, batches, [layer], device)
            if again != seen:
                raise ValueError(f"batches yielded {seen} batches on the first pass but "
                                 f"{again} on pass {index + 1}: recalibrating several layers "
                                 f"needs an iterable that yields the same batches each time")
        _commit(layer, pooled.get(layer))


def _restore(layers: list[_BatchRenorm], saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put back the running statistics ``saved`` from ``layers``."""
    with torch.no_grad():
        for layer, (mean, std) in zip(layers, saved, strict=True):
            layer.running_mean.copy_(mean)
            layer.running_std.copy_(std)


def recalibrate(model: nn.Module, batches: Iterable[Any], *, device: Any = None) -> nn.Module:
    """Set every renorm layer's running mean and std to the exact population statistics
    of its input over ``batches`` (specification section 3; patent claims 14, 15 and 18) under the
    final network in inference mode, like ``torch.optim.swa_utils.update_bn``; returns the
    model, its train/eval modes and ``num_batches_tracked`` as they were.

    Layers are recalibrated one after another in the order the forward runs them, each
    from one eval-mode pass over ``batches`` made after the layers before it got their new
    statistics, so a deeper layer is measured on exactly the input it will see: one pass
    per layer.  ``batches`` must therefore be re-iterable and yield the same data each
    time (a list, a tuple, a ``DataLoader`` without random augmentation); a one-shot
    iterator (a generator) is refused with a ``TypeError`` when the model has more than
    one layer: pass ``list(batches)``.  A batch may be a tensor or a tuple/list whose
    first element is the input.  Per-batch moments are merged exactly (Chan et al.), then
    ``running_std = sqrt(pooled biased variance + eps)``.  A layer the forward applies
    more than once pools all its inputs, the later ones computed with its old statistics.

    ``SyncBatchRenorm`` layers pool over all processes of their group (collectives: every
    process must call this; one whose ``batches`` is empty contributes nothing and gets
    the others' statistics; if no process saw a batch, all raise).  Layers that saw no
    input keep their statistics, and if anything fails every layer keeps its old ones.
    """
    layers = [m for m in model.modules()
              if isinstance(m, _BatchRenorm) and m.track_running_stats]
    if len(layers) > 1 and isinstance(batches, Iterator):
        raise TypeError(f"batches must be re-iterable (a list, tuple or DataLoader) to "
                        f"recalibrate {len(layers)} layers one after another, got a one-shot "
                        f"{type(batches).__name__}: pass list(batches)")
    modes = {m: m.training for m in model.modules()}
    saved = [(layer.running_mean.clone(), layer.running_std.clone()) for layer in layers]
    try:
        model.eval()
        _recalibrate_in_order(model, layers, batches, device)
    except BaseException:
        _restore(layers, saved)
        raise
    finally:
        for module, training in modes.items():
            module.training = training
    return model
