"""What a CI run must have: there a missing framework fails the run instead of skipping.

Locally, tests and conformance backends whose framework is not installed skip with the
reason; with the ``CI`` environment variable set (``.ci/run`` sets it) these modules
are required.
"""

from __future__ import annotations

import os

__all__ = ["REQUIRED_IN_CI", "in_ci", "required_here"]

REQUIRED_IN_CI = frozenset({"torch", "jax", "flax", "numba", "array_api_strict", "onnx",
                            "onnxruntime"})


def in_ci() -> bool:
    """Whether the ``CI`` environment variable is set (to anything but "", "0", "false")."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def required_here(module: str | None) -> bool:
    """Whether a missing ``module`` (any submodule names its top-level package) must fail
    this run rather than skip."""
    return bool(module) and in_ci() and module.partition(".")[0] in REQUIRED_IN_CI
