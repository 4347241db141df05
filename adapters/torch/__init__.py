"""PyTorch adapter: Batch Renormalization layers as drop-ins for ``torch.nn.BatchNorm*``.

- ``BatchRenorm1d``, ``BatchRenorm2d``, ``BatchRenorm3d``: batch norm's constructor,
  buffers and train/eval behaviour plus the renorm options (``r_max``, ``d_max``,
  ``r_min`` or schedules, ``warmup_steps``, ``micro_batch``, ``output_clip``).
- ``SyncBatchRenorm``: batch statistics over every process of a ``torch.distributed``
  group.
- ``convert_batchnorm(model)``: batch norm layers to renorm layers, state carried over
  (renorm layers also load batch norm state dicts); ``to_batchnorm(model)``: back to
  ``nn.BatchNorm*d`` with the same inference; ``convert_sync_batchrenorm(model)``: renorm
  layers to ``SyncBatchRenorm``.
- ``recalibrate(model, batches)``: exact population statistics after training.
- ``functional.batch_renorm``: the functional form the modules call, in the manner of
  ``torch.nn.functional.batch_norm``.

Quick start::

    from portable_brn.adapters.torch import BatchRenorm2d, convert_batchnorm
    layer = BatchRenorm2d(64)                      # paper defaults: eps 1e-3, momentum 0.01
    model = convert_batchnorm(torchvision_model, r_max=3.0, d_max=5.0)

The computation is the core's (``portable_brn.renorm``); every configuration but masks
and mixed dtypes runs on PyTorch's native batch-norm kernels, held to the core by the
tests.
"""

from __future__ import annotations

from .convert import convert_batchnorm, convert_sync_batchrenorm, to_batchnorm
from .modules import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    SyncBatchRenorm,
    _BatchRenorm,
)
from .recalibration import recalibrate

__all__ = [
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "SyncBatchRenorm", "_BatchRenorm",
    "convert_batchnorm", "convert_sync_batchrenorm", "recalibrate", "to_batchnorm",
]
