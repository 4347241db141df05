"""Host NumPy copies of arrays from any Array API library, written once.

The array layer's ``state_dict``, the conformance suite, ``reproduce`` and the tests all
bring results back to the host through ``to_host``.  No framework is imported: each
library is recognized from the array (array-api-compat's ``is_*_array``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import array_namespace, is_cupy_array, is_dask_array, is_torch_array

__all__ = ["to_host"]


def to_host(array: Any) -> np.ndarray | None:
    """A writable host NumPy copy of ``array`` in its own dtype (``None`` stays ``None``);
    a 16-bit float dtype NumPy lacks (bfloat16) is widened to float32 in its library
    first, which is exact."""
    if array is None:
        return None
    if isinstance(array, np.ndarray | np.generic):
        return np.array(array, copy=True)
    if is_dask_array(array):
        array = array.compute()
    if is_torch_array(array):
        array = array.detach().cpu()
    xp = array_namespace(array)
    if (xp.isdtype(array.dtype, "real floating") and xp.finfo(array.dtype).bits < 32
            and array.dtype != xp.float16):
        array = xp.astype(array, xp.float32)
    if is_cupy_array(array):
        return array.get()
    if hasattr(array, "to_device") and not isinstance(array, np.ndarray):
        array = _on_cpu(array)
    try:
        host = np.from_dlpack(array)
    except (TypeError, RuntimeError, BufferError, AttributeError):
        host = np.asarray(array)
    return np.array(host, copy=True)


def _on_cpu(array: Any) -> Any:
    """``array`` on its library's CPU device when the library names one, else as is."""
    info = getattr(array_namespace(array), "__array_namespace_info__", None)
    if info is None:
        return array
    for device in info().devices():
        if "cpu" in str(device).lower():
            return array.to_device(device)
    return array
