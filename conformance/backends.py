"""Backends: the ways a case can be run, behind one small interface.

A ``Backend`` has a ``name``, the input ``dtypes`` it runs, a ``skip_reason`` (None when
it can run here), ``supports(case)`` (None, or why the case does not apply) and
``run(case, dtype)`` returning one dict of host NumPy outputs per op, named as in
``expected``.  ``CoreBackend`` runs the core on one Array API namespace; its subclasses
only say how arrays enter the library (read-only, chunked, on a device) and whether the
step functions are compiled.  Adapter backends live in ``adapter_backends``.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from functools import cached_property
from types import ModuleType
from typing import Any

import numpy as np
from array_api_compat import array_namespace, is_numpy_namespace

from portable_brn.kernels import Kernel, kernel_forced

from .arrays import DTYPE_NAMES, from_numpy, to_numpy
from .cases import Case, Outputs
from .runner import run_core

__all__ = ["QUICK_CASES", "Backend", "CoreBackend", "DaskBackend", "JaxBackend",
           "NumpyKernelBackend", "ReadOnlyNumpyBackend", "StrictBackend", "Unavailable",
           "cupy_backend", "module_backend", "namespace_of_module", "numpy_backend",
           "quiet_nonfinite", "torch_backend"]


# What slow backends (a jit compile per case, a task graph per call) run by default
# below float64: output clipping, micro-batches with binding clips, the multi-step run,
# a long reduction in float32.  float64 is not listed, so every backend runs every case there
# (measured on 2 CPU cores: all cases at float64 cost the JAX and dask backends about a
# minute more than a subset; all cases at every dtype about three).
QUICK_CASES = {
    "float32": frozenset({"output_clip", "micro_batch_rank4", "long_run",
                          "large_channels_last"}),
    "bfloat16": frozenset({"output_clip", "micro_batch_rank4", "long_run"}),
}


class Unavailable(Exception):
    """Raised while loading a backend that cannot run here; the message says why, and
    ``missing`` names the top-level module that is not installed, if that is the reason."""

    def __init__(self, reason: str, *, missing: str | None = None) -> None:
        super().__init__(reason)
        self.missing = missing


class Backend(ABC):
    """One way of running cases; see the module docstring.

    ``quick_cases`` (dtype -> case names), when set, is the subset run at that dtype
    unless every case is asked for; a dtype it does not list runs every case.
    """

    name: str
    about: str
    dtypes: tuple[str, ...]
    quick_cases: Mapping[str, frozenset[str]] | None = None

    @cached_property
    def unavailable(self) -> Unavailable | None:
        """None when the backend can run here, else the ``Unavailable`` that says why
        (computed once).  Any other error while loading, an ``ImportError`` inside the
        project's own code included, is a bug and propagates."""
        try:
            self.load()
        except Unavailable as error:
            return error
        return None

    @property
    def skip_reason(self) -> str | None:
        """None when the backend can run here, else why not."""
        return None if self.unavailable is None else str(self.unavailable)

    @abstractmethod
    def load(self) -> None:
        """Import what the backend needs; raise ``Unavailable`` when it cannot run here."""

    def supports(self, case: Case) -> str | None:
        """None when ``case`` can be expressed with this backend, else why not."""
        return None

    def applies(self, case: Case, dtype: str, *, all_cases: bool = False) -> str | None:
        """None when ``case`` runs at ``dtype``, else why not: unsupported, or outside
        the ``quick_cases`` of ``dtype`` while ``all_cases`` is False."""
        reason = self.supports(case)
        subset = None if all_cases else (self.quick_cases or {}).get(dtype)
        if reason is None and subset is not None and case.name not in subset:
            reason = f"outside the {dtype} quick subset of {self.name} (see --all-cases)"
        return reason

    def available_dtypes(self) -> tuple[str, ...]:
        """The declared dtypes this installation has (all of them when skipped)."""
        return self.dtypes

    def namespace(self) -> tuple[Any, Any] | None:
        """``(xp, device)`` when the backend is a plain namespace (property checks)."""
        return None

    def context(self) -> contextlib.AbstractContextManager:
        """Settings every run of this backend happens under (none here)."""
        return contextlib.nullcontext()

    @abstractmethod
    def run(self, case: Case, dtype: str) -> tuple[Outputs, ...]:
        """The outputs of every op of ``case`` with inputs in ``dtype``."""


@contextlib.contextmanager
def quiet_nonfinite(case: Case) -> Iterator[None]:
    """Silence floating-point warnings for cases fed NaN or Inf on purpose (specification
    section 7: the output is whatever the arithmetic gives); other cases run with warnings
    as set."""
    if not case.has_nonfinite:
        yield
        return
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


class CoreBackend(Backend):
    """The core on one Array API namespace, eagerly.

    ``loader`` returns ``(xp, device)`` or raises ``ImportError``/``Unavailable``.
    """

    stop_gradient: Callable[[Any], Any] | None = None

    def __init__(self, name: str, about: str, dtypes: tuple[str, ...],
                 loader: Callable[[], tuple[Any, Any]]):
        self.name, self.about, self.dtypes, self._loader = name, about, dtypes, loader

    def load(self) -> None:
        self.xp, self.device = self._loader()

    def available_dtypes(self) -> tuple[str, ...]:
        if self.skip_reason:
            return self.dtypes
        return tuple(d for d in self.dtypes if hasattr(self.xp, d))

    def namespace(self) -> tuple[Any, Any]:
        return self.xp, self.device

    def asarray(self, array: np.ndarray | None, dtype: Any) -> Any:
        """A host array in this library, on this backend's device."""
        return from_numpy(self.xp, array, dtype, self.device)

    def carry(self, array: Any) -> Any:
        """A state array the core returned, made ready to go back in (unchanged here)."""
        return array

    def to_host(self, arrays: dict[str, Any]) -> Outputs:
        """Host NumPy copies of one op's outputs."""
        return {name: to_numpy(a) for name, a in arrays.items()}

    def compile(self, fn: Callable) -> Callable:
        """The step function as this backend runs it (unchanged here)."""
        return fn

    def run(self, case: Case, dtype: str) -> tuple[Outputs, ...]:
        with self.context(), quiet_nonfinite(case):
            return run_core(case, dtype, self)


class ReadOnlyNumpyBackend(CoreBackend):
    """NumPy with every array the core receives marked read-only: an in-place write in
    the core raises ``ValueError`` instead of silently corrupting the caller's data."""

    def __init__(self) -> None:
        super().__init__("numpy-readonly", "NumPy, every input read-only",
                         ("float64", "float32"), lambda: (np, None))

    def asarray(self, array: np.ndarray | None, dtype: Any) -> Any:
        return self.carry(super().asarray(array, dtype))

    def carry(self, array: Any) -> Any:
        if array is not None:
            array = np.asarray(array)
            array.flags.writeable = False
        return array


class NumpyKernelBackend(CoreBackend):
    """NumPy through one built-in NumPy kernel, whichever NumPy arrays get by default:
    ``numpy-ufuncs`` (``NumpyKernel``, what serves NumPy without Numba) and
    ``numpy-numba`` (``NumbaKernel``, skipped where Numba does not import); the
    ``numpy`` backend runs the default choice."""

    def __init__(self, kernel: str) -> None:
        about = {"ufuncs": "NumPy through its ufunc kernel, Numba or not",
                 "numba": "NumPy through its Numba kernel"}[kernel]
        self.kernel_name = kernel
        super().__init__(f"numpy-{kernel}", about, ("float64", "float32"), lambda: (np, None))

    def load(self) -> None:
        super().load()
        self.kernel = self._kernel()

    def _kernel(self) -> Kernel:
        """The kernel this backend forces; ``Unavailable`` when it cannot run here."""
        if self.kernel_name == "ufuncs":
            from portable_brn.numpy_kernel import NUMPY_KERNEL
            return NUMPY_KERNEL
        _import("numba", "numba")()
        from portable_brn.numba_kernel import numba_kernel
        return numba_kernel()

    def context(self) -> contextlib.AbstractContextManager:
        return kernel_forced(is_numpy_namespace, self.kernel)


class StrictBackend(CoreBackend):
    """array-api-strict, pinned to API version 2024.12, on its default device or another.

    Registered as ``strict`` and ``strict-device1``, not under the module's name, so
    ``--backend array_api_strict`` takes the generic module plug-in path.
    """

    API_VERSION = "2024.12"

    def __init__(self, device_name: str | None = None):
        name = "strict" + (f"-{device_name}" if device_name else "")
        about = f"array-api-strict {self.API_VERSION}" + (
            f" on Device({device_name!r})" if device_name else "")

        def loader() -> tuple[Any, Any]:
            xp, _ = _import("array_api_strict", "array_api_strict")()
            return xp, (xp.Device(device_name) if device_name else None)

        super().__init__(name, about, ("float64", "float32"), loader)

    def context(self) -> contextlib.AbstractContextManager:
        return self.xp.ArrayAPIStrictFlags(api_version=self.API_VERSION)


class DaskBackend(CoreBackend):
    """dask.array through array-api-compat, inputs split in two chunks along axis 0,
    computed synchronously; the state is computed after each op so graphs stay small.
    Below float64 the 110-op ``long_run`` is left out of the quick subset (a graph per
    op makes it the slowest case here)."""

    def __init__(self) -> None:
        super().__init__("dask", "dask.array via array-api-compat, 2 chunks",
                         ("float64", "float32"), _import("array_api_compat.dask.array", "dask"))
        self.quick_cases = {dtype: names - {"long_run"} for dtype, names in QUICK_CASES.items()}

    def asarray(self, array: np.ndarray | None, dtype: Any) -> Any:
        import dask.array as da
        if array is None:
            return None
        host = np.asarray(array, dtype=dtype)
        chunks = (max(1, host.shape[0] // 2), *host.shape[1:]) if host.ndim else ()
        return da.from_array(host, chunks=chunks)

    def carry(self, array: Any) -> Any:
        return self.asarray(np.asarray(array.compute()), array.dtype)

    def to_host(self, arrays: dict[str, Any]) -> Outputs:
        import dask
        computed = dask.compute(*arrays.values())
        return {name: to_numpy(a) for name, a in zip(arrays, computed, strict=True)}

    def context(self) -> contextlib.AbstractContextManager:
        import dask
        return dask.config.set(scheduler="synchronous")


class JaxBackend(CoreBackend):
    """JAX with every step function under ``jax.jit``, 64-bit types enabled for the run
    only (``jax.enable_x64``), so other JAX users in the process are not affected."""

    def __init__(self) -> None:
        super().__init__("jax", "JAX core path (its XLA kernel) under jax.jit, x64",
                         ("float64", "float32", "bfloat16"), _import("jax.numpy", "jax"))
        self.quick_cases = QUICK_CASES

    def load(self) -> None:
        super().load()
        import jax
        self.jax, self.stop_gradient = jax, jax.lax.stop_gradient

    def compile(self, fn: Callable) -> Callable:
        return self.jax.jit(fn)

    def context(self) -> contextlib.AbstractContextManager:
        return self.jax.enable_x64(True)


def _cupy() -> tuple[Any, Any]:
    """CuPy through array-api-compat, when a GPU is there."""
    cupy, _ = _import("cupy", "cupy")()
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDA runtime missing or broken: no GPU to use
        raise Unavailable(f"no GPU: {error}") from error
    if not count:
        raise Unavailable("no GPU")
    import array_api_compat.cupy as xp
    return xp, None


def _import(module: str, package: str) -> Callable[[], tuple[Any, Any]]:
    """A loader for an installed namespace module, with a clear reason when missing."""
    def loader() -> tuple[Any, Any]:
        try:
            return importlib.import_module(module), None
        except ModuleNotFoundError as error:
            if (error.name or "").partition(".")[0] != package:
                raise
            raise Unavailable(f"{package} is not installed", missing=package) from error
    return loader


def numpy_backend() -> CoreBackend:
    return CoreBackend("numpy", "NumPy, its default kernel (Numba, else ufuncs)",
                       ("float64", "float32", "float16"), lambda: (np, None))


def torch_backend() -> CoreBackend:
    return CoreBackend("torch", "PyTorch core path (CPU), eager",
                       ("float64", "float32", "float16", "bfloat16"),
                       _import("array_api_compat.torch", "torch"))


def cupy_backend() -> CoreBackend:
    return CoreBackend("cupy", "CuPy core path on the GPU", ("float64", "float32", "float16"),
                       _cupy)


def namespace_of_module(module: ModuleType) -> Any:
    """The Array API namespace a module stands for: the module itself when it declares
    ``__array_api_version__``, else the namespace of the arrays its ``asarray`` makes
    (through ``__array_namespace__`` or array-api-compat's wrappers)."""
    if hasattr(module, "__array_api_version__"):
        return module
    if not callable(getattr(module, "asarray", None)):
        raise Unavailable(f"module {module.__name__!r} is not an Array API namespace and "
                          f"has no asarray to make arrays with")
    try:
        return array_namespace(module.asarray([0.0]))
    except TypeError as error:
        raise Unavailable(f"arrays made by {module.__name__}.asarray have no Array API "
                          f"namespace: {error}") from error


def module_backend(module_name: str) -> CoreBackend:
    """The core on a third party's library, named by an importable module."""
    def loader() -> tuple[Any, Any]:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise Unavailable(f"cannot import {module_name!r}: {error}") from error
        return namespace_of_module(module), None

    return CoreBackend(module_name, f"the core on the namespace of module {module_name}",
                       DTYPE_NAMES, loader)
