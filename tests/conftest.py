"""Array backends the core is tested on, as one fixture.

Each backend moves NumPy test data in and results back out, so a test is written
once and runs on NumPy, on a read-only NumPy (any in-place write into an input
raises), and on array-api-strict on its default device and on ``device1``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import settings

from portable_brn.conformance.checks import relative_error as rel_err  # noqa: F401  (shared)

# CI (CI=true) replays the same examples every run; local runs keep exploring.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@dataclass(frozen=True)
class Backend:
    """How to put NumPy data into a library and take it back out."""

    name: str
    to_backend: Callable[[np.ndarray], Any]
    to_numpy: Callable[[Any], np.ndarray]
    xp: Any

    def put(self, *arrays: Any) -> Any:
        moved = tuple(None if a is None else self.to_backend(np.asarray(a)) for a in arrays)
        return moved if len(moved) > 1 else moved[0]

    def get(self, array: Any) -> np.ndarray | None:
        return None if array is None else np.asarray(self.to_numpy(array))


def _read_only(array: np.ndarray) -> np.ndarray:
    copy = np.array(array, copy=True)
    copy.flags.writeable = False
    return copy


def _numpy_backends() -> list[Backend]:
    import array_api_compat.numpy as xp
    return [Backend("numpy", np.array, np.asarray, xp),
            Backend("numpy-readonly", _read_only, np.asarray, xp)]


def _strict_backends() -> list[Backend]:
    strict = pytest.importorskip("array_api_strict")
    strict.set_array_api_strict_flags(api_version="2024.12")

    def maker(device: Any) -> Callable[[np.ndarray], Any]:
        return lambda a: strict.asarray(a, device=device)

    def to_numpy(a: Any) -> np.ndarray:
        return np.from_dlpack(strict.asarray(a, device=strict.Device("CPU_DEVICE")))
    return [Backend("strict", maker(strict.Device("CPU_DEVICE")), to_numpy, strict),
            Backend("strict-device1", maker(strict.Device("device1")), to_numpy, strict)]


BACKEND_NAMES = ["numpy", "numpy-readonly", "strict", "strict-device1"]


@pytest.fixture(params=BACKEND_NAMES)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Every backend the core must run on unchanged."""
    name = request.param
    pool = _numpy_backends() if name.startswith("numpy") else _strict_backends()
    return next(b for b in pool if b.name == name)


TOLERANCE = {np.float64: 1e-12, np.float32: 1e-5, np.float16: 1e-2}
