"""The kernel for ``jax.numpy`` arrays: the generic passes with hints for XLA.

Chosen by ``kernels.kernel_for`` for every JAX namespace, whatever else was imported,
and imported only then: this module imports no framework itself (JAX is already loaded
when a ``jax.numpy`` namespace reaches the core).
"""

from __future__ import annotations

from typing import Any

from .kernels import GenericKernel
from .layout import Layout

__all__ = ["XLA_KERNEL", "XlaKernel"]


def _barrier(operands: tuple[Any, ...]) -> tuple[Any, ...]:
    """``jax.lax.optimization_barrier`` of ``operands`` (JAX imported on the call)."""
    from jax.lax import optimization_barrier
    return optimization_barrier(operands)


class XlaKernel(GenericKernel):
    """The generic kernel with hints that keep XLA from writing full-size temporaries.

    XLA merges equal expressions and fuses per-feature arithmetic into its consumers,
    which here backfires: ``x - mean``, needed by the variance, by the backward's sums
    and by ``dx``, would be merged into one array written out in full instead of being
    recomputed inside each pass, and a per-feature scale would be broadcast to the
    input's size and read back.  An ``optimization_barrier`` around each pass's small
    per-feature operands (a different tuple in each pass, so XLA cannot merge them)
    prevents both; the arithmetic is the generic kernel's.  Measured in
    ``benchmarks/bench_jax.py``: a training step 1.3-1.5x faster on CPU.  XLA's
    reductions are tree-shaped, accurate in float32, and float64 may be disabled, so
    sums stay in the input's dtype.
    """

    wide_sums = False

    def affine(self, xp: Any, view: Any, scale: Any, shift: Any, dtype: Any,
               layout: Layout) -> Any:
        scale, shift = _barrier((scale, shift))
        return super().affine(xp, view, scale, shift, dtype, layout)

    def grad_sums(self, xp: Any, grad: Any, view: Any, mean: Any, inv_std: Any,
                  layout: Layout) -> tuple[Any, Any]:
        mean, inv_std = _barrier((mean, inv_std))
        return super().grad_sums(xp, grad, view, mean, inv_std, layout)

    def grad_input(self, xp: Any, grad: Any, view: Any, mean: Any, inv_std: Any, scale: Any,
                   x_scale: Any, shift: Any, dtype: Any, layout: Layout) -> Any:
        mean, scale, x_scale, shift = _barrier((mean, scale, x_scale, shift))
        return super().grad_input(xp, grad, view, mean, inv_std, scale, x_scale, shift, dtype,
                                  layout)


XLA_KERNEL = XlaKernel()  # what every JAX namespace gets
