"""Moving test data between NumPy and any Array API library, and the dtypes a case runs in.

The suite keeps every input and every expected value as host NumPy float64; a backend
receives them through :func:`from_numpy` and hands results back through
:func:`to_numpy`.  Both work for any conforming library, so a third party's namespace
needs no code of its own here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import array_namespace, is_cupy_array, is_dask_array, is_torch_array

__all__ = ["DTYPE_NAMES", "dtype_pair", "from_numpy", "to_numpy"]

DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16")


def dtype_pair(xp: Any, name: str) -> tuple[Any, Any]:
    """``(input dtype, state and parameter dtype)`` for the input dtype called ``name``.

    16-bit inputs keep their state and parameters in float32 (SPEC section 5).
    """
    dtype = getattr(xp, name)
    return dtype, (dtype if name in ("float64", "float32") else xp.float32)


def from_numpy(xp: Any, array: np.ndarray | None, dtype: Any = None,
               device: Any = None) -> Any:
    """``array`` as an array of ``xp`` (``None`` stays ``None``)."""
    if array is None:
        return None
    return xp.asarray(array, dtype=dtype, device=device, copy=True)


def to_numpy(array: Any) -> np.ndarray | None:
    """A host NumPy copy of an array of any library: floats as float64 (exact for every
    floating dtype), integers and booleans as they are.  16-bit floats widen to float32
    in their own library first: NumPy has no bfloat16."""
    if array is None:
        return None
    if is_dask_array(array):
        array = array.compute()
    if is_torch_array(array):
        array = array.detach().cpu()
    xp = array_namespace(array)
    if xp.isdtype(array.dtype, "real floating") and xp.finfo(array.dtype).bits < 32:
        array = xp.astype(array, xp.float32)
    if is_cupy_array(array):
        return array.get()
    if hasattr(array, "to_device") and not isinstance(array, np.ndarray):
        array = _to_host(array)
    try:
        host = np.from_dlpack(array)
    except (TypeError, RuntimeError, BufferError, AttributeError):
        host = np.asarray(array)
    return np.array(host, dtype=np.float64 if host.dtype.kind == "f" else host.dtype)


def _to_host(array: Any) -> Any:
    """``array`` on its library's CPU device when the library names one, else as is."""
    xp = array_namespace(array)
    info = getattr(xp, "__array_namespace_info__", None)
    if info is None:
        return array
    for device in info().devices():
        if "cpu" in str(device).lower():
            return array.to_device(device)
    return array
