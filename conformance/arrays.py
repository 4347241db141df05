"""Moving test data between NumPy and any Array API library, and the dtypes a case runs in.

The suite keeps every input and every expected value as host NumPy float64; a backend
receives them through :func:`from_numpy` and hands results back through
:func:`to_numpy`.  Both work for any conforming library, so a third party's namespace
needs no code of its own here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from portable_brn.host import to_host

__all__ = ["DTYPE_NAMES", "dtype_pair", "from_numpy", "to_numpy"]

DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16")


def dtype_pair(xp: Any, name: str) -> tuple[Any, Any]:
    """``(input dtype, state and parameter dtype)`` for the input dtype called ``name``.

    16-bit inputs keep their state and parameters in float32 (specification section 5).
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
    """A host NumPy copy of an array of any library (``portable_brn.host.to_host``),
    floats as float64 (exact for every floating dtype), integers and booleans as they
    are."""
    host = to_host(array)
    if host is None:
        return None
    return host.astype(np.float64) if host.dtype.kind == "f" else host
