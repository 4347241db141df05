"""Backends behind one small interface, so the experiment loop is written once.

A backend is a ``build(spec) -> Network`` function: ``spec`` fixes the architecture, the
initial weights, the normalization options and the optimizer; the ``Network`` trains
on one batch at a time and predicts in inference mode.  Inputs and outputs are NumPy
arrays, so batches, initial weights and evaluation are shared by every backend.

Each backend lives in its own module, imported only when chosen, and imports its
framework only when it builds a network: the core and the other backends never load
torch or jax.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import ReproduceError, require

__all__ = ["BACKENDS", "Builder", "Network", "NetworkSpec", "load_backend"]


@dataclass(frozen=True)
class NetworkSpec:
    """The network every backend builds.

    Dense layers with the given initial ``weights`` (each of shape ``(fan_in, fan_out)``):
    every hidden layer is Linear without bias -> normalization -> ReLU, and the last is
    Linear with ``output_bias``.  ``norm`` holds the keyword options of the core's
    ``RenormConfig`` (``eps``, ``momentum`` as the paper's alpha, ``r_max``, ``d_max``,
    ``micro_batch``); normalization scale and shift start at 1 and 0.  Training is SGD
    with ``sgd_momentum`` (``v = m v + g``, ``p -= lr v``) on the mean cross-entropy.
    """

    weights: tuple[np.ndarray, ...]
    output_bias: np.ndarray
    norm: dict[str, Any]
    learning_rate: float
    sgd_momentum: float


class Network(Protocol):
    """A network under training."""

    def sgd_step(self, x: np.ndarray, y: np.ndarray) -> None:
        """One optimizer step on a batch (normalization in training mode)."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted labels, normalization in inference mode (moving statistics)."""


Builder = Callable[[NetworkSpec], Network]


@dataclass(frozen=True)
class _Requirement:
    frameworks: tuple[str, ...]
    extra: str
    adapter: str


_REQUIREMENTS = {
    "numpy": _Requirement((), "", "portable_brn.adapters.array"),
    "torch": _Requirement(("torch",), "torch", "portable_brn.adapters.torch"),
    "jax": _Requirement(("jax", "flax", "optax"), "jax", "portable_brn.adapters.flax"),
}
BACKENDS = tuple(_REQUIREMENTS)


def load_backend(name: str) -> Builder:
    """The ``build`` function of backend ``name``, after checking that its frameworks are
    installed (a ``ReproduceError`` with the fix otherwise) and that its adapter imports
    (an error there is a bug, raised as it is)."""
    if name not in _REQUIREMENTS:
        raise ReproduceError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    need = _REQUIREMENTS[name]
    for framework in need.frameworks:
        require(framework, needed_by=f"backend {name}", extra=need.extra)
    importlib.import_module(need.adapter)
    return importlib.import_module(f"{__name__}.{name}").build
