"""The known backends, in matrix order, and resolving ``--backend`` names.

A name that is not registered is taken as an importable module exposing an Array API
namespace (``module_backend``): that is how a third party plugs in its own library.
"""

from __future__ import annotations

from collections.abc import Iterable

from .adapter_backends import (
    ArrayLayerBackend,
    FlaxBackend,
    JaxFunctionalBackend,
    NnxBackend,
    TorchModulesBackend,
)
from .backends import (
    Backend,
    DaskBackend,
    JaxBackend,
    NumpyKernelBackend,
    ReadOnlyNumpyBackend,
    StrictBackend,
    cupy_backend,
    module_backend,
    numpy_backend,
    torch_backend,
)

__all__ = ["all_backends", "resolve"]


def all_backends() -> list[Backend]:
    """One fresh instance of every registered backend."""
    numpy, cupy = numpy_backend(), cupy_backend()
    return [
        numpy, NumpyKernelBackend("ufuncs"), NumpyKernelBackend("numba"),
        ReadOnlyNumpyBackend(), StrictBackend(),
        StrictBackend("device1"), DaskBackend(), torch_backend(), JaxBackend(), cupy,
        ArrayLayerBackend(numpy), ArrayLayerBackend(cupy), TorchModulesBackend(),
        JaxFunctionalBackend(use_custom_vjp=True), JaxFunctionalBackend(use_custom_vjp=False),
        FlaxBackend(), NnxBackend(),
    ]


def resolve(names: Iterable[str] | None = None) -> list[Backend]:
    """The backends called ``names`` (each name may be a comma-separated list), in the
    order given; every registered one when ``names`` is empty or None."""
    registered = all_backends()
    wanted = [n.strip() for entry in names or () for n in entry.split(",") if n.strip()]
    if not wanted:
        return registered
    by_name = {b.name: b for b in registered}
    return [by_name.get(name) or module_backend(name) for name in dict.fromkeys(wanted)]
