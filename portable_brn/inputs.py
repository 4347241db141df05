"""Checks of the arrays handed to the core, with errors that name the argument.

Everything here looks only at static facts (library, dtype, shape, device), so the
checks run before any arithmetic, cost nothing under ``jit``, and a failing call never
produces a new state.
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType
from typing import Any

from array_api_compat import array_namespace, device, is_jax_array

__all__ = ["as_namespace", "check_floating", "check_param", "check_same_device",
           "floating_namespace", "namespace_of", "per_feature_namespace"]


def _kind(array: Any) -> str:
    """The qualified type name of ``array``, for messages."""
    return f"{type(array).__module__}.{type(array).__name__}"


def as_namespace(xp: Any, name: str = "xp") -> Any:
    """``xp`` as an Array API namespace: a namespace is returned as it is; a framework
    module that is not one (``torch``) is mapped to the namespace of its arrays
    (``array_api_compat.torch``); anything else is a ``TypeError`` naming ``name``."""
    if hasattr(xp, "__array_namespace_info__"):
        return xp
    asarray = getattr(xp, "asarray", None)
    if isinstance(xp, ModuleType) and callable(asarray):
        try:
            return array_namespace(asarray(0))
        except Exception:  # not an array library: refused below
            pass
    raise TypeError(f"{name} must be an Array API namespace (numpy, jax.numpy, "
                    f"array_api_strict, array_api_compat.torch, ...) or a module whose "
                    f"arrays have one (torch, cupy), got {xp!r}")


_NAMESPACES: dict[tuple[type, ...], Any] = {}  # array types -> their one namespace


def namespace_of(**arrays: Any) -> Any:
    """The one Array API namespace shared by all non-None ``arrays`` (remembered per
    combination of array types: the namespace is a property of the types, and finding it
    costs more than a small step's arithmetic)."""
    present = {name: a for name, a in arrays.items() if a is not None}
    types = tuple(type(a) for a in present.values())
    known = _NAMESPACES.get(types)
    if known is not None:
        return known
    try:
        xp = _NAMESPACES[types] = array_namespace(*present.values())
        return xp
    except TypeError as error:
        if len(present) == 1:
            name, array = next(iter(present.items()))
            raise TypeError(f"{name} must be an array of an Array API library, got "
                            f"{_kind(array)}") from error
        kinds = ", ".join(f"{name}: {_kind(a)}" for name, a in present.items())
        raise TypeError(f"arrays from different libraries (or non-arrays) in one call: "
                        f"{kinds}") from error


def floating_namespace(name: str, array: Any) -> Any:
    """The namespace of one input ``array`` called ``name``, after checking it is a real
    floating array."""
    xp = namespace_of(**{name: array})
    check_floating(xp, name, array)
    return xp


@lru_cache(maxsize=64)
def _real_floating(xp: Any, dtype: Any) -> bool:
    return xp.isdtype(dtype, "real floating")


def check_floating(xp: Any, name: str, array: Any) -> None:
    """Reject integer, boolean and complex arrays."""
    if not _real_floating(xp, array.dtype):
        raise TypeError(f"{name} must have a real floating dtype (float16, bfloat16, "
                        f"float32 or float64), got {array.dtype}")


def check_param(xp: Any, name: str, array: Any | None, feature_shape: tuple[int, ...], *,
                source: str = "x") -> None:
    """A per-feature array (moving statistic, weight, bias) must match the features of
    ``source`` (named in the message)."""
    if array is None:
        return
    check_floating(xp, name, array)
    if tuple(array.shape) != feature_shape:
        raise ValueError(f"{name} has shape {tuple(array.shape)} but {source} has "
                         f"{feature_shape} features")


def _device_or_none(array: Any) -> Any:
    """The device of ``array`` (its own ``device`` attribute where it has one, the cheap
    case), or None where it cannot tell."""
    try:
        own = getattr(array, "device", None)
        return device(array) if own is None else own
    except Exception:  # traced values under jit may not know their device
        return None


def check_same_device(**arrays: Any) -> None:
    """All non-None ``arrays`` must live on one device.  JAX arrays are exempt: JAX
    places (and shards) arrays itself and moves them as an operation needs."""
    devices = {name: _device_or_none(a) for name, a in arrays.items() if a is not None}
    values = [dev for dev in devices.values() if dev is not None]
    if all(dev == values[0] for dev in values):
        return
    known = {name: dev for name, dev in devices.items()
             if dev is not None and not is_jax_array(arrays[name])}
    first = next(iter(known.items()), None)
    for name, dev in known.items():
        if dev != first[1]:
            raise ValueError(f"arrays on different devices in one call: {first[0]} is on "
                             f"{first[1]} but {name} is on {dev}")


def per_feature_namespace(**arrays: Any) -> Any:
    """The namespace of per-feature ``arrays`` (statistics, state) after checking that they
    share one library and one device, are real floating and have the first one's shape."""
    xp = namespace_of(**arrays)
    source, first = next(iter(arrays.items()))
    for name, array in arrays.items():
        check_param(xp, name, array, tuple(first.shape), source=source)
    check_same_device(**arrays)
    return xp
