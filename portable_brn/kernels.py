"""The passes over full-size arrays, behind a per-namespace dispatch.

The renormalization algebra (r, d, schedules, state) is per-feature and lives in
``renorm``; the few operations that touch every element live here.  ``GenericKernel``
is written against the Array API standard and is the reference.  The faster built-in
kernels (``numpy_kernel``, ``numba_kernel``, ``xla_kernel``) are picked from the array
namespace alone, their modules imported on first use, so a call runs the same code
whatever was imported before it; a third party may register its own kernel for a
namespace, which then wins over the built-in one.  The conformance suite runs each
built-in kernel under its own backend name.

Conventions: ``view`` is the input reshaped to ``layout.view_shape``; per-feature
arrays have ``layout.batch_stat_shape`` (or broadcast against it) in the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from array_api_compat import is_jax_namespace, is_numpy_namespace

from .layout import Layout
from .moments import ReplicaMean, accumulator_dtype, as_compute, reduce_sum, view_moments

__all__ = ["GenericKernel", "Kernel", "builtin_kernel", "fast_kernels_disabled", "kernel_for",
           "kernel_forced", "register_kernel"]


class Kernel(Protocol):
    """The full-size passes of one training step."""

    def moments(self, xp: Any, view: Any, layout: Layout,
                replica_mean: ReplicaMean) -> tuple[Any, Any]:
        """Per-feature mean and biased variance (keepdims, compute dtype)."""

    def affine(self, xp: Any, view: Any, scale: Any, shift: Any, dtype: Any,
               layout: Layout) -> Any:
        """``view * scale + shift`` in ``dtype``."""

    def grad_sums(self, xp: Any, grad: Any, view: Any, mean: Any, inv_std: Any,
                  layout: Layout) -> tuple[Any, Any]:
        """Per-feature ``sum(grad)`` and ``sum(grad * (view - mean))``; ``inv_std`` is
        ``1 / sigma_B``, for kernels whose precision depends on the conditioning."""

    def grad_input(self, xp: Any, grad: Any, view: Any, mean: Any, inv_std: Any, scale: Any,
                   x_scale: Any, shift: Any, dtype: Any, layout: Layout) -> Any:
        """``grad * scale + (view - mean) * x_scale + shift`` in ``dtype``; ``inv_std`` as
        for ``grad_sums``."""


class GenericKernel:
    """Every pass in plain Array API operations: runs on any conforming library.

    Sums of float32 data accumulate in float64 where the namespace has it
    (``wide_sums``); a subclass for a library whose reductions are already accurate
    (tree-shaped) and whose float64 is slow or absent may turn that off.
    """

    wide_sums = True

    def _accumulator(self, xp: Any, dtype: Any) -> Any:
        """The dtype sums of ``dtype`` data run in (wide only with ``wide_sums``)."""
        return accumulator_dtype(xp, dtype) if self.wide_sums else dtype

    def moments(self, xp: Any, view: Any, layout: Layout,
                replica_mean: ReplicaMean) -> tuple[Any, Any]:
        view = as_compute(xp, view)
        return view_moments(xp, view, layout, replica_mean,
                            self._accumulator(xp, view.dtype))

    def affine(self, xp: Any, view: Any, scale: Any, shift: Any, dtype: Any,
               layout: Layout) -> Any:
        y = as_compute(xp, view) * scale + shift
        return y if y.dtype == dtype else xp.astype(y, dtype)

    def grad_sums(self, xp: Any, grad: Any, view: Any, mean: Any, inv_std: Any,
                  layout: Layout) -> tuple[Any, Any]:
        grad = as_compute(xp, grad)
        axes, accumulator = layout.reduce_axes, self._accumulator(xp, grad.dtype)
        centered = as_compute(xp, view) - mean
        return (reduce_sum(xp, grad, axes, accumulator),
                reduce_sum(xp, grad * centered, axes, accumulator))

    def grad_input(self, xp: Any, grad: Any, view: Any, mean: Any, inv_std: Any, scale: Any,
                   x_scale: Any, shift: Any, dtype: Any, layout: Layout) -> Any:
        # centered: x * x_scale and mean * x_scale would cancel when |mean| >> std
        dx = as_compute(xp, grad) * scale + ((as_compute(xp, view) - mean) * x_scale + shift)
        return dx if dx.dtype == dtype else xp.astype(dx, dtype)


_GENERIC = GenericKernel()
_REGISTRY: list[tuple[Callable[[Any], bool], Kernel]] = []
_builtins_off = 0  # depth of nested ``fast_kernels_disabled`` blocks


def register_kernel(matches: Callable[[Any], bool], kernel: Kernel) -> None:
    """Use ``kernel`` for every namespace ``xp`` with ``matches(xp)``, in place of the
    built-in one (a third party may replace the NumPy kernel too); last wins."""
    _REGISTRY.insert(0, (matches, kernel))


def kernel_for(xp: Any, replica_mean: ReplicaMean | None = None) -> Kernel:
    """The kernel for namespace ``xp``: a registered one that matches, else the built-in
    one (chosen from ``xp`` alone, never from what was imported before), else the
    generic one, which also serves every call with replicas."""
    if replica_mean is not None:
        return _GENERIC
    for matches, kernel in _REGISTRY:
        if matches(xp):
            return kernel
    return _GENERIC if _builtins_off else builtin_kernel(xp)


def builtin_kernel(xp: Any) -> Kernel:
    """The kernel this package ships for ``xp``, its module imported on first use: Numba
    (when it imports) or ufuncs for NumPy, XLA hints for JAX, generic for the rest."""
    if is_numpy_namespace(xp):
        from .numba_kernel import numba_kernel
        from .numpy_kernel import NUMPY_KERNEL
        return numba_kernel() or NUMPY_KERNEL
    if is_jax_namespace(xp):
        from .xla_kernel import XLA_KERNEL
        return XLA_KERNEL
    return _GENERIC


@contextmanager
def fast_kernels_disabled() -> Iterator[None]:
    """Within the block every namespace uses the generic kernel (to compare or time the
    reference path against the fast ones); ``kernel_forced`` still applies inside.
    Process-wide, not per thread: for tests and benchmarks, not for concurrent use."""
    global _builtins_off
    saved = list(_REGISTRY)
    _REGISTRY.clear()
    _builtins_off += 1
    try:
        yield
    finally:
        _builtins_off -= 1
        _REGISTRY[:0] = saved


@contextmanager
def kernel_forced(matches: Callable[[Any], bool], kernel: Kernel) -> Iterator[None]:
    """Within the block ``kernel`` serves every namespace ``xp`` with ``matches(xp)``
    (to time or test one kernel where another is built in or registered).  Process-wide, not
    per thread: for tests and benchmarks, not for concurrent use."""
    entry = (matches, kernel)
    _REGISTRY.insert(0, entry)
    try:
        yield
    finally:
        _REGISTRY.remove(entry)
