"""Comparing a backend's outputs with the expected values and with another backend's.

The measure is specification section 6's relative error ``||out - ref|| / ||ref||`` per output
array, with the bound set by the input dtype.  Outputs are grouped into four checks:
``forward`` (training ``y``, recurrent ``y``), ``inference`` (inference ``y``),
``gradients`` (``dx``, ``dweight``, ``dbias``) and ``state`` (``mean``, ``std``,
``step``, ``finite``).  ``step`` and ``finite`` must match exactly.

A wrong output never passes: an output of another shape, or NaN or Inf where the
expected value is finite (or finite where it is not), has error Inf, never NaN, so any
aggregate (Python's ``max`` included, for which ``max(0.0, nan)`` is 0.0) fails too.  Where the
expected value itself is not finite (a NaN batch, specification section 7: "whatever the
arithmetic gives") only the positions of the non-finite entries must agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .cases import Case

__all__ = ["CHECKS", "TOLERANCE", "Worst", "check_name", "compare_runs",
           "compare_to_expected", "relative_error"]

TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}
CHECKS = ("forward", "inference", "gradients", "state")
_EXACT = ("step", "finite")
_GROUPS = {"y": "forward", "dx": "gradients", "dweight": "gradients", "dbias": "gradients",
           "mean": "state", "std": "state", "step": "state", "finite": "state"}


def check_name(kind: str, output: str) -> str:
    """The check an output of an op of ``kind`` belongs to."""
    return "inference" if kind == "infer" else _GROUPS[output]


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    """``||out - ref|| / ||ref||`` over the entries where ``ref`` is finite; 0 when both
    are zero; Inf, never NaN, when the shapes differ or the non-finite entries do (their
    positions, or NaN against an infinity, or the infinity's sign), so that ``max`` and
    ``<=`` over errors cannot let a wrong output through."""
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        return math.inf
    finite = np.isfinite(ref)
    if not np.array_equal(finite, np.isfinite(out)) or not np.array_equal(
            out[~finite], ref[~finite], equal_nan=True):
        return math.inf
    out, ref = out[finite], ref[finite]
    # scaled by the largest magnitude first, so that norms of values near float64's
    # range neither overflow nor underflow (the ratio is unchanged)
    scale = max(float(np.max(np.abs(ref), initial=0.0)), float(np.max(np.abs(out), initial=0.0)))
    if scale == 0.0:
        return 0.0
    diff = float(np.linalg.norm(out / scale - ref / scale))
    norm = float(np.linalg.norm(ref / scale))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    error = diff / norm
    return math.inf if not math.isfinite(error) else error


def _error(name: str, out: np.ndarray, ref: np.ndarray) -> float:
    if name in _EXACT:
        return 0.0 if np.array_equal(np.asarray(out), np.asarray(ref)) else math.inf
    return relative_error(out, ref)


@dataclass(frozen=True)
class Worst:
    """The largest error seen and where; NaN counts as larger than anything."""

    error: float = 0.0
    where: str = ""

    def passes(self, bound: float) -> bool:
        return self.error <= bound

    def __or__(self, other: Worst) -> Worst:
        def key(w: Worst) -> float:
            return math.inf if math.isnan(w.error) else w.error
        return other if key(other) > key(self) else self


def compare_to_expected(case: Case, outputs: Sequence[Mapping[str, np.ndarray]]
                        ) -> dict[str, Worst]:
    """The worst error per check of one run of ``case``.  Checks with nothing to compare
    are left out; an expected output the backend does not report fails its check."""
    worst: dict[str, Worst] = {}
    for i, (op, out) in enumerate(zip(case.ops, outputs, strict=True)):
        for name, ref in op.expected.items():
            where = f"{case.name} op {i} {name}"
            found = (Worst(_error(name, out[name], ref), where) if name in out
                     else Worst(math.nan, f"{where} not reported"))
            check = check_name(op.kind, name)
            worst[check] = worst.get(check, Worst()) | found
    return worst


def compare_runs(case: Case, a: Sequence[Mapping[str, np.ndarray]],
                 b: Sequence[Mapping[str, np.ndarray]]) -> Worst:
    """The worst error of run ``a`` relative to run ``b`` over the outputs both report."""
    worst = Worst()
    for i, (out_a, out_b) in enumerate(zip(a, b, strict=True)):
        for name in out_a.keys() & out_b.keys():
            worst |= Worst(_error(name, out_a[name], out_b[name]),
                           f"{case.name} op {i} {name}")
    return worst
