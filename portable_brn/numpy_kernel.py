"""A faster kernel for NumPy: BLAS reductions and blocked passes split over threads.

NumPy ufuncs run on one core and make one pass per binary operation, so the generic
kernel costs about 20 copies of the input per training step.  This kernel views the
input as ``(groups, rows, features, cols)``: sums and sums of products go through
BLAS-backed ``matmul``/``vecdot`` with no full-size temporaries, short float32 partial
sums accumulated in float64 (so long reductions stay within the specification's tolerances), and
the elementwise passes run on cache-sized blocks.  Blocks are split between threads
(ufuncs and BLAS release the GIL) when the array is large enough to pay for it.

One-pass sums (``E[x^2] - E[x]^2``, ``sum(g x) - mean sum(g)``) lose digits when a
feature's ``|mean|`` exceeds its std; those calls take a second pass over blocks centered
on the mean in cache, which is exact to rounding whatever the offset.

16-bit floats, empty arrays, feature axes that are not adjacent, and replicas go to the
generic kernel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from itertools import pairwise
from typing import Any

import numpy as np

from .kernels import GenericKernel
from .layout import Layout
from .moments import ReplicaMean

__all__ = ["NUMPY_KERNEL", "NumpyKernel", "as_stats", "moments_from_sums"]

_BLOCK_ELEMENTS = 1 << 17  # 512 KiB of float32: a block stays in L2 between passes
_SUM_ROWS = 4096  # at most this many rows summed in float32 before going to float64
_PARALLEL_ELEMENTS = 1 << 20  # below this, handing blocks to threads costs more than it saves
_WIDE_ROW = 1 << 13  # elementwise passes broadcast per-feature rows of about this many values
_THREADS = min(4, os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None

Task = tuple[int, slice, slice]  # (group, rows, features): one cache-sized block


@lru_cache(maxsize=256)
def _canonical_shape(layout: Layout) -> tuple[int, int, int, int] | None:
    """``(groups, rows, features, cols)`` for the view, or None when the feature axes
    are not adjacent (cached: layouts repeat every step)."""
    axes = layout.view_feature_axes
    if axes != tuple(range(axes[0], axes[-1] + 1)):
        return None
    shape = layout.view_shape
    first = 1 if layout.grouped else 0
    return (shape[0] if layout.grouped else 1, math.prod(shape[first:axes[0]]),
            math.prod(layout.feature_shape), math.prod(shape[axes[-1] + 1:]))


def _run(tasks: tuple[Task, ...], work: Callable[[tuple[Task, ...]], Any],
         elements: int) -> list[Any]:
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


@lru_cache(maxsize=16)
def _ones(size: int, dtype: np.dtype) -> np.ndarray:
    """A read-only vector of ones, the BLAS operand of a sum (cached: the few block sizes
    of a model repeat every step)."""
    ones = np.ones(size, dtype)
    ones.flags.writeable = False
    return ones


def _row_sums(block: np.ndarray) -> np.ndarray:
    """Per-feature float64 sum over a ``(rows, features, cols)`` block."""
    if block.shape[2] == 1:
        return (_ones(block.shape[0], block.dtype) @ block[:, :, 0]).astype(np.float64)
    return (block @ _ones(block.shape[2], block.dtype)).sum(axis=0, dtype=np.float64)


def _row_dots(a: np.ndarray, b: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Per-feature float64 sum of ``a * b`` over a ``(rows, features, cols)`` block
    (``scratch`` holds the products when features are innermost: BLAS then sums them with
    the blocked accumulation that keeps long float32 sums accurate)."""
    if a.shape[2] == 1:
        return _row_sums(np.multiply(a, b, out=scratch))
    return np.vecdot(a, b).sum(axis=0, dtype=np.float64)


@lru_cache(maxsize=256)
def _fold(rows: int, limit: int) -> int:
    """The largest divisor of ``rows`` that is at most ``limit`` (1 when ``limit`` < 2)."""
    return next((n for n in range(min(rows, limit), 1, -1) if rows % n == 0), 1)


def _offset(mean: np.ndarray, inv_std: np.ndarray) -> bool:
    """Whether some feature's ``|mean|`` exceeds its std: then terms in ``x`` and in the
    mean nearly cancel, and passes must work on ``x - mean`` to keep their digits."""
    return bool(np.any(np.abs(mean * inv_std) > 1.0))


def _at(a: np.ndarray, task: Task) -> np.ndarray:
    """The part of a per-feature array, ``(groups or 1, 1, F, 1)``, that ``task`` uses."""
    return a[task[0] if a.shape[0] > 1 else 0, :, task[2]]


@lru_cache(maxsize=256)
def _tasks(shape: tuple[int, int, int, int], block_elements: int,
           max_rows: int | None) -> tuple[Task, ...]:
    """``_Canonical.tasks`` for a ``(groups, rows, features, cols)`` shape (cached)."""
    groups, rows, features, cols = shape
    row_step = max(1, min(block_elements // (features * cols), max_rows or rows))
    feature_step = max(1, block_elements // cols) if row_step == 1 else features
    return tuple((g, slice(r, min(r + row_step, rows)), slice(f, f + feature_step))
                 for g in range(groups) for r in range(0, rows, row_step)
                 for f in range(0, features, feature_step))


def as_stats(layout: Layout, dtype: Any, *sums: np.ndarray) -> tuple[np.ndarray, ...]:
    """Float64 per-feature results in ``dtype``, shaped to broadcast against the view."""
    return tuple(a.astype(dtype).reshape(layout.batch_stat_shape) for a in sums)


def moments_from_sums(sums: Callable[[np.ndarray | None], Any], layout: Layout,
                      dtype: Any) -> tuple[np.ndarray, ...]:
    """Mean and biased variance from ``sums(center)``, the per-feature float64 sums of
    ``x - center`` and of its squares (``center`` None: of ``x``).  One pass, and a second
    centered on the mean where the first lost digits (some feature's ``|mean| > std``) or
    its squares overflowed though the mean is finite."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught below
        total, squares = sums(None)
        mean = total / layout.count
        var = squares / layout.count - mean * mean
        kept = (mean * mean <= var) & (var < np.inf)  # no cancellation, no overflow
    if not kept.all():  # (also for a non-finite batch: no harm, it stays non-finite)
        center = mean.astype(dtype)
        offset, squares = sums(center)
        offset = offset / layout.count
        mean, var = center + offset, squares / layout.count - offset * offset
    return as_stats(layout, dtype, mean, np.maximum(var, 0.0))


class _Canonical:
    """One call's arrays as ``(groups, rows, features, cols)`` and its blocks of work;
    ``fold`` consecutive rows may stand side by side as one (``widened``), per-feature
    arrays then repeated ``fold`` times along the features."""

    def __init__(self, layout: Layout, shape: tuple[int, int, int, int], fold: int = 1) -> None:
        self.layout, self.shape, self.fold = layout, shape, fold

    def widened(self) -> _Canonical:
        """The view for elementwise passes.  With features innermost (``cols == 1``) NumPy
        broadcasts a per-feature array with one inner-loop call per row, which for a few
        hundred features costs as much as the arithmetic: folding rows together into rows
        of about ``_WIDE_ROW`` values makes those passes up to twice as fast."""
        groups, rows, features, cols = self.shape
        fold = _fold(rows, _WIDE_ROW // features) if cols == 1 else 1
        if fold <= 1:
            return self
        return _Canonical(self.layout, (groups, rows // fold, features * fold, 1), fold)

    def tasks(self, block_elements: int = _BLOCK_ELEMENTS,
              max_rows: int | None = None) -> tuple[Task, ...]:
        """Blocks of about ``block_elements`` (and at most ``max_rows`` rows): whole rows
        when they fit, slices of features when one row is larger."""
        return _tasks(self.shape, block_elements, max_rows)

    def array(self, a: np.ndarray) -> np.ndarray:
        """A full-size array of the call viewed as ``(groups, rows, features, cols)``."""
        return np.reshape(a, self.shape)

    def stat_rows(self, a: np.ndarray) -> np.ndarray:
        """A per-group-and-feature array (any shape of ``groups * F`` values) as
        ``(groups, F)``; a smaller one that broadcasts against the layout's statistics (per
        feature, say, or per group) is broadcast first."""
        features = self.shape[2] // self.fold
        if a.size != self.shape[0] * features:
            a = np.broadcast_to(a, self.layout.batch_stat_shape)
        return a.reshape(-1, features)

    def per_feature(self, a: np.ndarray) -> np.ndarray:
        """A per-feature (or per-group-and-feature) array as ``(groups or 1, 1, F, 1)``,
        repeated ``fold`` times along F."""
        rows = self.stat_rows(a)
        if self.fold == 1:
            return rows.reshape(rows.shape[0], 1, -1, 1)
        repeated = np.empty((rows.shape[0], self.fold, rows.shape[1]), a.dtype)  # np.tile,
        repeated[...] = rows[:, None, :]                      # without its Python overhead
        return repeated.reshape(rows.shape[0], 1, -1, 1)

    def _scratch_blocks(self, share: tuple[Task, ...], like: np.ndarray,
                        ) -> Iterator[tuple[Task, np.ndarray]]:
        """Each task of ``share`` with a scratch block of its shape (one buffer reused)."""
        scratch = np.empty(like[share[0]].size, like.dtype)
        for task in share:
            size_like = like[task]
            yield task, scratch[:size_like.size].reshape(size_like.shape)

    def totals(self, like: np.ndarray,
               block_sums: Callable[[Task, np.ndarray], tuple[np.ndarray, np.ndarray]],
               *, in_cache: bool) -> Any:
        """Float64 per-group totals of two per-feature block sums, ``(2, groups, 1, F, 1)``;
        ``block_sums(task, scratch)`` gets a scratch block shaped like ``like[task]``.
        Blocks are cache-sized when ``in_cache`` (the sums make a temporary), else one
        large block per thread; float32 sums never run over more than ``_SUM_ROWS`` rows."""
        groups, _, features, _ = self.shape

        def work(share: tuple[Task, ...]) -> np.ndarray:
            acc = np.zeros((2, groups, features))
            for task, scratch in self._scratch_blocks(share, like):
                first, second = block_sums(task, scratch)
                acc[0, task[0], task[2]] += first
                acc[1, task[0], task[2]] += second
            return acc
        block = _BLOCK_ELEMENTS if in_cache else max(_BLOCK_ELEMENTS, like.size // _THREADS)
        total = sum(_run(self.tasks(block, _SUM_ROWS), work, like.size))
        return total.reshape(2, groups, 1, features, 1)

    def elementwise(self, out: np.ndarray,
                    fill: Callable[[Task, np.ndarray, np.ndarray], None]) -> None:
        """``fill(task, out_block, scratch_block)`` on every block, in parallel."""

        def work(share: tuple[Task, ...]) -> None:
            for task, scratch in self._scratch_blocks(share, out4):
                fill(task, out4[task], scratch)
        out4 = self.array(out)
        _run(self.tasks(), work, out.size)


class NumpyKernel(GenericKernel):
    """The generic kernel's contract, computed with fewer and cheaper passes."""

    @staticmethod
    def _canonical(layout: Layout, *arrays: Any) -> _Canonical | None:
        """The canonical view when every array is a float32/float64 ndarray of one dtype,
        the first is not empty and the feature axes are adjacent; else None (use the
        generic kernel)."""
        dtype = arrays[0].dtype
        if dtype not in (np.float32, np.float64) or arrays[0].size == 0 or not all(
                isinstance(a, np.ndarray) and a.dtype == dtype for a in arrays):
            return None
        shape = _canonical_shape(layout)
        return None if shape is None else _Canonical(layout, shape)

    def moments(self, xp: Any, view: Any, layout: Layout,
                replica_mean: ReplicaMean) -> tuple[Any, Any]:
        canon = None if replica_mean is not None else self._canonical(layout, view)
        if canon is None:
            return super().moments(xp, view, layout, replica_mean)
        return self._moments_on(canon, view)

    def affine(self, xp: Any, view: Any, scale: Any, shift: Any, dtype: Any,
               layout: Layout) -> Any:
        canon = self._canonical(layout, view, scale, shift)
        if canon is None or dtype != view.dtype:
            return super().affine(xp, view, scale, shift, dtype, layout)
        return self._affine_on(canon, view, scale, shift)

    def grad_sums(self, xp: Any, grad: Any, view: Any, mean: Any, inv_std: Any,
                  layout: Layout) -> tuple[Any, Any]:
        canon = self._canonical(layout, grad, view, mean, inv_std)
        if canon is None:
            return super().grad_sums(xp, grad, view, mean, inv_std, layout)
        return self._grad_sums_on(canon, grad, view, mean, inv_std)

    def grad_input(self, xp: Any, grad: Any, view: Any, mean: Any, inv_std: Any, scale: Any,
                   x_scale: Any, shift: Any, dtype: Any, layout: Layout) -> Any:
        canon = self._canonical(layout, grad, view, mean, inv_std, scale, x_scale, shift)
        if canon is None or dtype != view.dtype:
            return super().grad_input(xp, grad, view, mean, inv_std, scale, x_scale, shift,
                                      dtype, layout)
        return self._grad_input_on(canon, grad, view, mean, inv_std, scale, x_scale, shift)

    # The passes on a call that fits the canonical view (a subclass may compute them
    # differently and keep the checks above).

    def _moments_on(self, canon: _Canonical, view: np.ndarray) -> tuple[Any, Any]:
        x4 = canon.array(view)

        def sums(center: np.ndarray | None) -> Any:
            if center is None:
                return canon.totals(x4, lambda t, s: (_row_sums(x4[t]),
                                                      _row_dots(x4[t], x4[t], s)),
                                    in_cache=False)

            def centered_sums(task: Task, scratch: np.ndarray) -> tuple[Any, Any]:
                centered = np.subtract(x4[task], _at(center, task), out=scratch)
                return _row_sums(centered), _row_dots(centered, centered, centered)
            return canon.totals(x4, centered_sums, in_cache=True)
        return moments_from_sums(sums, canon.layout, view.dtype)

    def _affine_on(self, canon: _Canonical, view: np.ndarray, scale: np.ndarray,
                   shift: np.ndarray) -> np.ndarray:
        canon = canon.widened()
        x4, a, b = canon.array(view), canon.per_feature(scale), canon.per_feature(shift)
        y = np.empty(view.shape, view.dtype)

        def fill(task: Task, out: np.ndarray, _: np.ndarray) -> None:
            np.multiply(x4[task], _at(a, task), out=out)
            np.add(out, _at(b, task), out=out)
        canon.elementwise(y, fill)
        return y

    def _grad_sums_on(self, canon: _Canonical, grad: np.ndarray, view: np.ndarray,
                      mean: np.ndarray, inv_std: np.ndarray) -> tuple[Any, Any]:
        g4, x4, m = canon.array(grad), canon.array(view), canon.per_feature(mean)
        if _offset(mean, inv_std):  # sum(g x) - mean sum(g) would cancel
            def block_sums(task: Task, scratch: np.ndarray) -> tuple[Any, Any]:
                centered = np.subtract(x4[task], _at(m, task), out=scratch)
                return _row_sums(g4[task]), _row_dots(g4[task], centered, centered)
            sum_g, sum_gc = canon.totals(g4, block_sums, in_cache=True)
        else:
            sum_g, sum_gx = canon.totals(
                g4, lambda t, s: (_row_sums(g4[t]), _row_dots(g4[t], x4[t], s)),
                in_cache=False)
            sum_gc = sum_gx - m * sum_g
        return as_stats(canon.layout, view.dtype, sum_g, sum_gc)

    def _grad_input_on(self, canon: _Canonical, grad: np.ndarray, view: np.ndarray,
                       mean: np.ndarray, inv_std: np.ndarray, scale: np.ndarray,
                       x_scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
        centered = _offset(mean, inv_std)
        if not centered:  # x * x_scale + (shift - mean * x_scale): one pass fewer
            shift = shift - mean * x_scale
        canon = canon.widened()
        g4, x4 = canon.array(grad), canon.array(view)
        m, a, b, c = (canon.per_feature(p) for p in (mean, scale, x_scale, shift))
        dx = np.empty(view.shape, view.dtype)

        def fill(task: Task, out: np.ndarray, scratch: np.ndarray) -> None:
            if centered:
                np.subtract(x4[task], _at(m, task), out=out)
                np.multiply(out, _at(b, task), out=out)
            else:
                np.multiply(x4[task], _at(b, task), out=out)
            np.add(out, _at(c, task), out=out)
            np.multiply(g4[task], _at(a, task), out=scratch)
            np.add(out, scratch, out=out)
        canon.elementwise(dx, fill)
        return dx


NUMPY_KERNEL = NumpyKernel()  # what NumPy arrays get where the Numba kernel does not serve
