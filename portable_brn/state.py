"""The moving statistics and the step counter, as an immutable container.

A ``NamedTuple`` is a JAX pytree and a plain tuple everywhere else, so the same state
flows through ``jax.jit``, ``torch.compile`` and NumPy code unchanged.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from array_api_compat import array_namespace

from .inputs import as_namespace
from .moments import compute_dtype

__all__ = ["RenormState", "init_params", "init_state", "zero_step"]


class RenormState(NamedTuple):
    """Moving mean, moving standard deviation (a std, not a variance) and step ``t``."""

    mean: Any
    std: Any
    step: Any


def init_state(num_features: int | tuple[int, ...], *, xp: Any,
               dtype: Any | None = None, device: Any | None = None) -> RenormState:
    """Fresh state: mean 0, std 1, step 0.

    ``num_features`` is the size of the feature axis, or a tuple of sizes when the
    normalization keeps one statistic per element of several axes.  ``xp`` is an Array
    API namespace or a framework module (``torch`` means ``array_api_compat.torch``).
    ``dtype`` defaults to float32, and a 16-bit float dtype gives float32 statistics (as
    the core computes them); the step uses the namespace's default integer dtype.  The
    one place a fresh state is made: every adapter calls it.
    """
    xp = as_namespace(xp)
    shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
    if not shape or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
        raise ValueError(f"num_features must be a positive int or a tuple of them, "
                         f"got {num_features!r}")
    if dtype is None:
        dtype = xp.float32
    elif xp.isdtype(dtype, "real floating"):
        dtype = compute_dtype(xp, dtype)
    return RenormState(
        mean=xp.zeros(shape, dtype=dtype, device=device),
        std=xp.ones(shape, dtype=dtype, device=device),
        step=zero_step(xp, device),
    )


def zero_step(xp: Any, device: Any | None = None) -> Any:
    """A step counter at 0 on ``device``, in the namespace's default integer dtype."""
    xp = as_namespace(xp)
    integral = xp.__array_namespace_info__().default_dtypes(device=device)["integral"]
    return xp.zeros((), dtype=integral, device=device)


def init_params(state: RenormState, *, dtype: Any | None = None) -> tuple[Any, Any]:
    """Fresh ``(weight, bias)`` for ``state``: ones and zeros of its shape, namespace and
    device, in ``dtype`` (default: the statistics' dtype)."""
    xp = array_namespace(state.mean)
    return xp.ones_like(state.mean, dtype=dtype), xp.zeros_like(state.mean, dtype=dtype)
