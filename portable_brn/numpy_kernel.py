"""A faster kernel for NumPy: one-pass moments through BLAS, passes split over threads.

NumPy ufuncs run on one core and make one pass per binary operation, so the generic
kernel costs about 30 copies of the input per training step.  This kernel views the
input as ``(groups, rows, features, cols)``, takes sums and sums of products with
BLAS-backed ``matmul``/``vecdot`` (no full-size temporaries), and runs the elementwise
passes on cache-sized blocks of rows, split between threads (ufuncs release the GIL).

One-pass moments (``E[x^2] - E[x]^2``) lose digits when ``|mean|`` is large against
the std; such inputs go to the exact two-pass generic kernel, so results stay within
the SPEC's tolerances.  Anything else unusual (16-bit floats, feature axes that are not
adjacent, replicas) goes there too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from typing import Any

import numpy as np

from .kernels import GenericKernel, register_kernel
from .layout import Layout
from .moments import ReplicaMean

__all__ = ["NumpyKernel"]

_BLOCK_ELEMENTS = 1 << 17  # 512 KiB of float32: a block stays in L2 between passes
_MAX_CONDITION = 16.0  # mean**2 / var above this and one-pass sums would lose digits
_PARALLEL_ELEMENTS = 1 << 20  # below this, handing blocks to threads costs more than it saves
_THREADS = min(4, os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None

Task = tuple[int, slice, slice]  # (group, rows, features): one cache-sized block


def _canonical_shape(layout: Layout) -> tuple[int, int, int, int] | None:
    """``(groups, rows, features, cols)`` for the view, or None when the feature axes
    are not adjacent."""
    axes = layout.view_feature_axes
    if axes != tuple(range(axes[0], axes[-1] + 1)):
        return None
    shape = layout.view_shape
    first = 1 if layout.grouped else 0
    return (shape[0] if layout.grouped else 1, math.prod(shape[first:axes[0]]),
            math.prod(layout.feature_shape), math.prod(shape[axes[-1] + 1:]))


def _run(tasks: list[Task], work: Callable[[list[Task]], Any], elements: int) -> list[Any]:
    """Split ``tasks`` into contiguous shares, one per thread when the ``elements`` they
    cover are enough to pay for handing work to threads."""
    global _pool
    shares = min(_THREADS, len(tasks)) if elements >= _PARALLEL_ELEMENTS else 1
    if shares < 2:
        return [work(tasks)]
    if _pool is None:
        _pool = ThreadPoolExecutor(_THREADS, thread_name_prefix="portable_brn")
    bounds = [len(tasks) * i // shares for i in range(shares + 1)]
    return list(_pool.map(work, [tasks[a:b] for a, b in pairwise(bounds)]))


def _row_sums(block: np.ndarray) -> np.ndarray:
    """Per-feature sum over a ``(rows, features, cols)`` block, accumulated by BLAS."""
    if block.shape[2] == 1:
        return np.ones(block.shape[0], block.dtype) @ block[:, :, 0]
    return (block @ np.ones(block.shape[2], block.dtype)).sum(axis=0)


def _row_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-feature sum of ``a * b`` over a ``(rows, features, cols)`` block."""
    if a.shape[2] == 1:
        return np.einsum("pf,pf->f", a[:, :, 0], b[:, :, 0])
    return np.vecdot(a, b).sum(axis=0)


class _Canonical:
    """One call's arrays as ``(groups, rows, features, cols)`` and its blocks of work."""

    def __init__(self, layout: Layout, shape: tuple[int, int, int, int]):
        self.layout, self.shape = layout, shape

    def tasks(self, block_elements: int) -> list[Task]:
        """Blocks of about ``block_elements``: rows first, features when a row is larger."""
        groups, rows, features, cols = self.shape
        row_step = max(1, block_elements // (features * cols))
        feature_step = max(1, block_elements // cols) if row_step == 1 else features
        return [(g, slice(r, min(r + row_step, rows)), slice(f, f + feature_step))
                for g in range(groups) for r in range(0, rows, row_step)
                for f in range(0, features, feature_step)]

    def array(self, a: np.ndarray) -> np.ndarray:
        return np.reshape(a, self.shape)

    def per_feature(self, a: np.ndarray) -> np.ndarray:
        """A per-feature (or per-group-and-feature) array as ``(groups or 1, 1, F, 1)``."""
        features = self.shape[2]
        return np.reshape(a, (a.size // features, 1, features, 1))

    def _reduction_block(self) -> int:
        """Reductions need no cache reuse: one large block per thread keeps calls few."""
        return max(_BLOCK_ELEMENTS, math.prod(self.shape) // _THREADS)

    def totals(self, block_sums: Callable[[Task], tuple[np.ndarray, np.ndarray]]) -> Any:
        """Float64 per-group totals of two per-feature sums, ``(2, groups, 1, F, 1)``."""
        groups, _, features, _ = self.shape

        def work(tasks: list[Task]) -> np.ndarray:
            acc = np.zeros((2, groups, features))
            for task in tasks:
                first, second = block_sums(task)
                acc[0, task[0], task[2]] += first
                acc[1, task[0], task[2]] += second
            return acc
        total = sum(_run(self.tasks(self._reduction_block()), work, math.prod(self.shape)))
        return total.reshape(2, groups, 1, features, 1)

    def elementwise(self, out: np.ndarray,
                    fill: Callable[[Task, np.ndarray, np.ndarray], None]) -> None:
        """``fill(task, out_block, scratch_block)`` on every block, in parallel; each
        thread reuses one scratch buffer the size of a block."""
        out4 = self.array(out)
        tasks = self.tasks(_BLOCK_ELEMENTS)

        def work(share: list[Task]) -> None:
            scratch = np.empty(out4[share[0]].size, out.dtype)
            for task in share:
                block = out4[task]
                fill(task, block, scratch[:block.size].reshape(block.shape))
        _run(tasks, work, out.size)


def _at(a: np.ndarray, task: Task) -> np.ndarray:
    """The part of a per-feature array, ``(groups or 1, 1, F, 1)``, that ``task`` uses."""
    return a[task[0] if a.shape[0] > 1 else 0, :, task[2]]


class NumpyKernel(GenericKernel):
    """The generic kernel's contract, computed with fewer and cheaper passes."""

    @staticmethod
    def _canonical(layout: Layout, *arrays: Any) -> _Canonical | None:
        """The canonical view when every array is a float32/float64 ndarray of one dtype
        and the feature axes are adjacent; else None (use the generic kernel)."""
        dtype = arrays[0].dtype
        if dtype not in (np.float32, np.float64) or not all(
                isinstance(a, np.ndarray) and a.dtype == dtype for a in arrays):
            return None
        shape = _canonical_shape(layout)
        return None if shape is None else _Canonical(layout, shape)

    def moments(self, xp: Any, view: Any, layout: Layout,
                replica_mean: ReplicaMean) -> tuple[Any, Any]:
        canon = None if replica_mean is not None else self._canonical(layout, view)
        if canon is None:
            return super().moments(xp, view, layout, replica_mean)
        x4 = canon.array(view)
        sums, squares = canon.totals(lambda t: (_row_sums(x4[t]), _row_dots(x4[t], x4[t])))
        mean = sums / layout.count
        var = np.maximum(squares / layout.count - mean * mean, 0.0)
        if np.any(mean * mean > _MAX_CONDITION * var):
            return super().moments(xp, view, layout, replica_mean)
        return (mean.astype(view.dtype).reshape(layout.stat_shape),
                var.astype(view.dtype).reshape(layout.stat_shape))

    def affine(self, xp: Any, view: Any, scale: Any, shift: Any, dtype: Any,
               layout: Layout) -> Any:
        canon = self._canonical(layout, view, scale, shift)
        if canon is None or dtype != view.dtype:
            return super().affine(xp, view, scale, shift, dtype, layout)
        x4, a, b = canon.array(view), canon.per_feature(scale), canon.per_feature(shift)
        y = np.empty(view.shape, view.dtype)

        def fill(task: Task, out: np.ndarray, _: np.ndarray) -> None:
            np.multiply(x4[task], _at(a, task), out=out)
            np.add(out, _at(b, task), out=out)
        canon.elementwise(y, fill)
        return y

    def grad_sums(self, xp: Any, grad: Any, view: Any, mean: Any, inv_std: Any,
                  layout: Layout) -> tuple[Any, Any]:
        canon = self._canonical(layout, grad, view, mean, inv_std)
        if canon is None or np.any(np.square(mean * inv_std) > _MAX_CONDITION):
            return super().grad_sums(xp, grad, view, mean, inv_std, layout)
        g4, x4 = canon.array(grad), canon.array(view)
        sum_g, sum_gx = canon.totals(lambda t: (_row_sums(g4[t]), _row_dots(g4[t], x4[t])))
        sum_gc = sum_gx - canon.per_feature(mean).astype(np.float64) * sum_g
        return (sum_g.astype(view.dtype).reshape(layout.stat_shape),
                sum_gc.astype(view.dtype).reshape(layout.stat_shape))

    def grad_input(self, xp: Any, grad: Any, view: Any, mean: Any, scale: Any, x_scale: Any,
                   shift: Any, dtype: Any, layout: Layout) -> Any:
        canon = self._canonical(layout, grad, view, mean, scale, x_scale, shift)
        if canon is None or dtype != view.dtype:
            return super().grad_input(xp, grad, view, mean, scale, x_scale, shift, dtype,
                                      layout)
        g4, x4 = canon.array(grad), canon.array(view)
        m, a, b, c = (canon.per_feature(p) for p in (mean, scale, x_scale, shift))
        dx = np.empty(view.shape, view.dtype)

        def fill(task: Task, out: np.ndarray, scratch: np.ndarray) -> None:
            np.subtract(x4[task], _at(m, task), out=out)
            np.multiply(out, _at(b, task), out=out)
            np.add(out, _at(c, task), out=out)
            np.multiply(g4[task], _at(a, task), out=scratch)
            np.add(out, scratch, out=out)
        canon.elementwise(dx, fill)
        return dx


register_kernel(lambda xp: xp.__name__.endswith("numpy"), NumpyKernel())
