"""What the tests share: the core's backends, the tolerance table, and CI strictness.

The backends are the conformance registry's own (``portable_brn.conformance.registry``),
so a test written once runs on NumPy, on a read-only NumPy (any in-place write into an
input raises), and on array-api-strict on its default device and on ``device1``, the
same code the conformance suite runs.  The tolerances are the suite's (specification section 6).

Under ``CI`` (``.ci/run`` sets it) hypothesis replays a fixed set of examples, and a
missing torch, JAX, Flax, Numba or array-api-strict fails the run where a local run
skips (``portable_brn.conformance.ci``).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import settings

from portable_brn.conformance import checks
from portable_brn.conformance.backends import CoreBackend
from portable_brn.conformance.checks import relative_error as rel_err  # noqa: F401  (shared)
from portable_brn.conformance.ci import in_ci, required_here
from portable_brn.conformance.registry import resolve
from portable_brn.host import to_host

# CI (CI=true) replays the same examples every run; local runs keep exploring.
settings.register_profile("ci", derandomize=True, print_blob=True)
if in_ci():
    settings.load_profile("ci")

BACKEND_NAMES = ["numpy", "numpy-readonly", "strict", "strict-device1"]
_CORE_BACKENDS = {core.name: core for core in resolve(BACKEND_NAMES)}
_importorskip = pytest.importorskip


def _importorskip_in_ci(modname: str, *args: Any, **kwargs: Any) -> ModuleType:
    """``pytest.importorskip``, except that a module CI must have is imported outright:
    missing, it fails the test (or the module) instead of skipping it."""
    if required_here(modname):
        importlib.import_module(modname)
    return _importorskip(modname, *args, **kwargs)


def pytest_configure(config: pytest.Config) -> None:
    if in_ci():
        pytest.importorskip = _importorskip_in_ci


def pytest_unconfigure(config: pytest.Config) -> None:
    pytest.importorskip = _importorskip


def skip_unless_loaded(backend: Any) -> None:
    """Skip a test on a conformance backend that cannot run here, with the reason; under
    CI, fail instead when the reason is a framework CI must have."""
    unavailable = backend.unavailable
    if unavailable is None:
        return
    if required_here(unavailable.missing):
        pytest.fail(f"{backend.name}: {unavailable} (CI is set, and CI must have "
                    f"{unavailable.missing})")
    pytest.skip(f"{backend.name}: {unavailable}")


@dataclass(frozen=True)
class Backend:
    """The conformance backend called ``name`` as the tests use it: NumPy data in,
    keeping its dtype, and host NumPy copies out in theirs."""

    name: str

    @property
    def core(self) -> CoreBackend:
        return _CORE_BACKENDS[self.name]

    @property
    def xp(self) -> Any:
        return self.core.xp

    def put(self, *arrays: Any) -> Any:
        moved = tuple(None if a is None else self.core.asarray(np.asarray(a), None)
                      for a in arrays)
        return moved if len(moved) > 1 else moved[0]

    def get(self, array: Any) -> np.ndarray | None:
        return to_host(array)




@pytest.fixture(params=BACKEND_NAMES)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Every backend the core must run on unchanged, under its settings (the strict
    backends pin array-api-strict's API version)."""
    backend = Backend(request.param)
    skip_unless_loaded(backend.core)
    with backend.core.context():
        yield backend


# specification section 6's bounds by input dtype, as NumPy types: the conformance suite's table.
TOLERANCE = {np.dtype(name).type: bound for name, bound in checks.TOLERANCE.items()
             if name != "bfloat16"}
