"""Checks of the arrays handed to the core, with errors that name the argument.

Everything here looks only at static facts (library, dtype, shape, device), so the
checks run before any arithmetic, cost nothing under ``jit``, and a failing call never
produces a new state.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace, device, is_jax_array

__all__ = ["check_floating", "check_param", "check_same_device", "namespace_of"]


def namespace_of(**arrays: Any) -> Any:
    """The one Array API namespace shared by all non-None ``arrays``."""
    present = {name: a for name, a in arrays.items() if a is not None}
    try:
        return array_namespace(*present.values())
    except TypeError as error:
        kinds = ", ".join(f"{name}: {type(a).__module__}.{type(a).__name__}"
                          for name, a in present.items())
        raise TypeError(f"arrays from different libraries (or non-arrays) in one call: "
                        f"{kinds}") from error


def check_floating(xp: Any, name: str, array: Any) -> None:
    """Reject integer, boolean and complex arrays."""
    if not xp.isdtype(array.dtype, "real floating"):
        raise TypeError(f"{name} must have a real floating dtype (float16, bfloat16, "
                        f"float32 or float64), got {array.dtype}")


def check_param(xp: Any, name: str, array: Any | None, feature_shape: tuple[int, ...]) -> None:
    """A per-feature array (moving statistic, weight, bias) must match the features."""
    if array is None:
        return
    check_floating(xp, name, array)
    if tuple(array.shape) != feature_shape:
        raise ValueError(f"{name} has shape {tuple(array.shape)} but the input has "
                         f"{feature_shape} features along feature_axis")


def _device_or_none(array: Any) -> Any:
    try:
        return device(array)
    except Exception:  # traced values under jit may not know their device
        return None


def check_same_device(**arrays: Any) -> None:
    """All non-None ``arrays`` must live on one device.  JAX arrays are exempt: JAX
    places (and shards) arrays itself and moves them as an operation needs."""
    seen = {name: _device_or_none(a) for name, a in arrays.items()
            if a is not None and not is_jax_array(a)}
    known = {name: d for name, d in seen.items() if d is not None}
    first = next(iter(known.items()), None)
    for name, dev in known.items():
        if dev != first[1]:
            raise ValueError(f"arrays on different devices in one call: {first[0]} is on "
                             f"{first[1]} but {name} is on {dev}")
