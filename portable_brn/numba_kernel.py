"""A fused kernel for NumPy, compiled by Numba when it is installed (``portable-brn[numba]``).

Each full-size operation of a training step is one pass over memory: the moments, ``y``,
the gradient sums and ``dx``, where ``NumpyKernel``'s ufuncs need one to four passes each.
For arrays that fit in cache (an MLP's ``(1024, 512)``) every pass costs about a copy.

It serves float32/float64 ndarrays whose feature axes are adjacent (``(N, C)`` rows,
channels-last, NCHW); ``NumpyKernel``'s checks, which it keeps, send anything else to
the generic kernel.  Sums add ``_BLOCK_ROWS`` rows at a time in the input's dtype and
the blocks in float64 (``NumpyKernel``'s BLAS sums run float32 over up to 4,096 rows);
the moments take a second pass centered on the mean in the same cases as
``NumpyKernel``.  The passes are serial, since Numba's default threading layer must not
be entered from two Python threads at once, and still beat ``NumpyKernel`` on two
threads: 4.3 against 7.3 copies for a training step at (32, 56, 56, 64).

Numba is imported, and the passes compiled (cached on disk), on the first NumPy call
(``kernels.builtin_kernel``); a Numba that does not import (say, one older than the
installed NumPy) leaves ``NumpyKernel`` in charge, with a warning.
"""

from __future__ import annotations

import importlib.util
import warnings
from functools import cache
from types import SimpleNamespace
from typing import Any

import numpy as np

from .numpy_kernel import NumpyKernel, _Canonical, as_stats, moments_from_sums

__all__ = ["NumbaKernel", "numba_kernel"]

_BLOCK_ROWS = 64  # rows summed in the input's dtype before going to float64


@cache
def _passes() -> SimpleNamespace:
    """The compiled passes, ``rows`` over ``(groups, rows, features)`` arrays and ``cols``
    over ``(groups, rows, features, cols)`` ones, with per-feature arrays
    ``(groups, features)``.  Compiled on first call, one version per dtype and
    writability of the arguments, and cached on disk (no closure over anything but
    constants, which Numba's cache needs)."""
    from numba import njit

    jit = njit(cache=True, nogil=True)

    @jit
    def rows_sums(a, b, first_center, center, squares):
        """Per-feature float64 ``sum(u)`` and ``sum(u * (b - center))`` with
        ``u = a - first_center``: with ``squares`` the moments (``a = b = x``, both centers
        the same, and ``u * u`` taken for the products), else the gradient sums
        (``a = grad``, ``b = x``, ``first_center`` 0).  Four rows at a time, so the block
        totals are read and written once per four elements."""
        groups, rows, features = a.shape
        total, total_second = np.zeros((groups, features)), np.zeros((groups, features))
        block, block_second = np.empty(features, a.dtype), np.empty(features, a.dtype)
        for g in range(groups):
            c1, c = first_center[g], center[g]
            for start in range(0, rows, _BLOCK_ROWS):
                stop = min(start + _BLOCK_ROWS, rows)
                block[:] = 0
                block_second[:] = 0
                r = start
                while r + 4 <= stop:  # then the last rows one by one
                    a0, a1, a2, a3 = a[g, r], a[g, r + 1], a[g, r + 2], a[g, r + 3]
                    b0, b1, b2, b3 = b[g, r], b[g, r + 1], b[g, r + 2], b[g, r + 3]
                    for f in range(features):
                        u0, u1, u2, u3 = a0[f] - c1[f], a1[f] - c1[f], a2[f] - c1[f], a3[f] - c1[f]
                        block[f] += (u0 + u1) + (u2 + u3)
                        if squares:
                            block_second[f] += (u0 * u0 + u1 * u1) + (u2 * u2 + u3 * u3)
                        else:
                            block_second[f] += ((u0 * (b0[f] - c[f]) + u1 * (b1[f] - c[f]))
                                                + (u2 * (b2[f] - c[f]) + u3 * (b3[f] - c[f])))
                    r += 4
                for rest in range(r, stop):
                    for f in range(features):
                        u = a[g, rest, f] - c1[f]
                        block[f] += u
                        block_second[f] += u * u if squares else u * (b[g, rest, f] - c[f])
                total[g] += block
                total_second[g] += block_second
        return total, total_second

    @jit
    def rows_affine(x, scale, shift, out):
        """``out = x * scale + shift``."""
        groups, rows, features = x.shape
        for g in range(groups):
            a, b = scale[g], shift[g]
            for r in range(rows):
                x_row, out_row = x[g, r], out[g, r]
                for f in range(features):
                    out_row[f] = x_row[f] * a[f] + b[f]

    @jit
    def rows_grad_input(grad, x, mean, scale, x_scale, shift, out):
        """``out = grad * scale + (x - mean) * x_scale + shift``."""
        groups, rows, features = x.shape
        for g in range(groups):
            m, a, b, c = mean[g], scale[g], x_scale[g], shift[g]
            for r in range(rows):
                g_row, x_row, out_row = grad[g, r], x[g, r], out[g, r]
                for f in range(features):
                    out_row[f] = g_row[f] * a[f] + (x_row[f] - m[f]) * b[f] + c[f]

    @jit
    def cols_sums(a, b, first_center, center, squares):
        """``rows_sums`` for ``(groups, rows, features, cols)`` arrays: each feature's rows
        of ``cols`` values summed lane by lane."""
        groups, rows, features, cols = a.shape
        total, total_second = np.zeros((groups, features)), np.zeros((groups, features))
        lane, lane_second = np.empty(cols, a.dtype), np.empty(cols, a.dtype)
        for g in range(groups):
            for f in range(features):
                c1, c = first_center[g, f], center[g, f]
                for start in range(0, rows, _BLOCK_ROWS):
                    lane[:] = 0
                    lane_second[:] = 0
                    for r in range(start, min(start + _BLOCK_ROWS, rows)):
                        a_row, b_row = a[g, r, f], b[g, r, f]
                        for k in range(cols):
                            u = a_row[k] - c1
                            lane[k] += u
                            lane_second[k] += u * u if squares else u * (b_row[k] - c)
                    for k in range(cols):
                        total[g, f] += lane[k]
                        total_second[g, f] += lane_second[k]
        return total, total_second

    @jit
    def cols_affine(x, scale, shift, out):
        """``affine`` for ``(groups, rows, features, cols)`` arrays."""
        groups, rows, features, cols = x.shape
        for g in range(groups):
            for r in range(rows):
                for f in range(features):
                    a, b, x_row, out_row = scale[g, f], shift[g, f], x[g, r, f], out[g, r, f]
                    for k in range(cols):
                        out_row[k] = x_row[k] * a + b

    @jit
    def cols_grad_input(grad, x, mean, scale, x_scale, shift, out):
        """``grad_input`` for ``(groups, rows, features, cols)`` arrays."""
        groups, rows, features, cols = x.shape
        for g in range(groups):
            for r in range(rows):
                for f in range(features):
                    m, a, b, c = mean[g, f], scale[g, f], x_scale[g, f], shift[g, f]
                    g_row, x_row, out_row = grad[g, r, f], x[g, r, f], out[g, r, f]
                    for k in range(cols):
                        out_row[k] = g_row[k] * a + (x_row[k] - m) * b + c

    return SimpleNamespace(
        rows=SimpleNamespace(sums=rows_sums, affine=rows_affine, grad_input=rows_grad_input),
        cols=SimpleNamespace(sums=cols_sums, affine=cols_affine, grad_input=cols_grad_input))


class NumbaKernel(NumpyKernel):
    """``NumpyKernel``'s contract (and its checks) with one compiled pass per operation."""

    @staticmethod
    def _passes(canon: _Canonical) -> SimpleNamespace:
        """The passes for features innermost (``cols == 1``) or not."""
        return _passes().rows if canon.shape[3] == 1 else _passes().cols

    @staticmethod
    def _full(canon: _Canonical, a: np.ndarray) -> np.ndarray:
        """A full-size array, C-contiguous, as ``(groups, rows, features)`` when features
        are innermost, else as ``(groups, rows, features, cols)``."""
        shape = canon.shape
        return np.ascontiguousarray(a.reshape(shape[:3] if shape[3] == 1 else shape))

    @staticmethod
    def _per_feature(canon: _Canonical, a: np.ndarray) -> np.ndarray:
        """A per-feature (or per-group) array as C-contiguous ``(groups, features)``."""
        return np.ascontiguousarray(canon.stat_rows(a))

    @staticmethod
    def _zeros(canon: _Canonical, dtype: Any) -> np.ndarray:
        """A per-feature array of zeros (no centering)."""
        return np.zeros((canon.shape[0], canon.shape[2]), dtype)

    def _moments_on(self, canon: _Canonical, view: np.ndarray) -> tuple[Any, Any]:
        x, sums = self._full(canon, view), self._passes(canon).sums

        def centered_sums(center: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
            c = self._zeros(canon, view.dtype) if center is None else self._per_feature(
                canon, center)
            return sums(x, x, c, c, True)
        return moments_from_sums(centered_sums, canon.layout, view.dtype)

    def _affine_on(self, canon: _Canonical, view: np.ndarray, scale: np.ndarray,
                   shift: np.ndarray) -> np.ndarray:
        x = self._full(canon, view)
        y = np.empty_like(x)
        self._passes(canon).affine(x, self._per_feature(canon, scale),
                                   self._per_feature(canon, shift), y)
        return y.reshape(view.shape)

    def _grad_sums_on(self, canon: _Canonical, grad: np.ndarray, view: np.ndarray,
                      mean: np.ndarray, inv_std: np.ndarray) -> tuple[Any, Any]:
        sums = self._passes(canon).sums(self._full(canon, grad), self._full(canon, view),
                                        self._zeros(canon, view.dtype),
                                        self._per_feature(canon, mean), False)
        return as_stats(canon.layout, view.dtype, *sums)

    def _grad_input_on(self, canon: _Canonical, grad: np.ndarray, view: np.ndarray,
                       mean: np.ndarray, inv_std: np.ndarray, scale: np.ndarray,
                       x_scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
        x = self._full(canon, view)
        dx = np.empty_like(x)
        self._passes(canon).grad_input(
            self._full(canon, grad), x,
            *(self._per_feature(canon, p) for p in (mean, scale, x_scale, shift)), dx)
        return dx.reshape(view.shape)


@cache
def _numba_import_error() -> str | None:
    """Why Numba does not import here, or None when it does.  Tried on the first NumPy
    call rather than at import, which it would slow by about 0.3 s."""
    try:
        import numba  # noqa: F401
    except (ImportError, OSError) as error:  # e.g. too old for NumPy; a broken llvmlite
        return f"{type(error).__name__}: {error}"
    return None


_WARNED: set[str] = set()  # import errors already warned about
_NUMBA_KERNEL = NumbaKernel()


def numba_kernel() -> NumbaKernel | None:
    """The kernel for NumPy arrays when Numba is installed and imports, else None (with
    a warning, once per error, when it is installed but does not import: then
    ``NumpyKernel`` serves NumPy)."""
    if not _numba_installed():
        return None
    error = _numba_import_error()
    if error is not None and error not in _WARNED:
        _WARNED.add(error)
        warnings.warn(f"Numba is installed but does not import ({error}); NumPy arrays use "
                      f"portable_brn's ufunc kernel instead", RuntimeWarning, stacklevel=5)
    return _NUMBA_KERNEL if error is None else None


@cache
def _numba_installed() -> bool:
    """Whether a Numba is installed (without importing it; looked up once)."""
    try:
        return importlib.util.find_spec("numba") is not None
    except ValueError:  # a stand-in module without a spec: let the import decide
        return True
