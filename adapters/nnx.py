"""``flax.nnx`` Batch Renormalization under the name nnx users look for.

``from portable_brn.adapters.nnx import BatchRenorm`` mirrors
``from flax.nnx import BatchNorm``; the class is ``portable_brn.adapters.flax``'s
``NnxBatchRenorm`` (one module holds both Flax APIs, which share their helpers).
"""

from __future__ import annotations

from .flax import NnxBatchRenorm as BatchRenorm

__all__ = ["BatchRenorm"]
