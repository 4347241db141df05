"""The backend-by-check matrix: run everything, then print it or write it as JSON.

One row per backend and input dtype.  Columns: the four checks against the reference
(``forward``, ``inference``, ``gradients``, ``state``), ``pairwise`` (float64 rows:
the largest relative error against any other backend over the cases both ran) and
``properties`` (float64 rows of namespace backends: the checks of ``properties``).  A
cell holds the status and the largest error; ``where`` names the worst output.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import properties
from .backends import Backend
from .cases import Case, Outputs
from .checks import CHECKS, TOLERANCE, Worst, compare_runs, compare_to_expected

__all__ = ["COLUMNS", "Cell", "Matrix", "Row", "build"]

COLUMNS = (*CHECKS, "pairwise", "properties")


@dataclass(frozen=True)
class Cell:
    """``status`` is ``pass``, ``fail`` or ``n/a``; ``error`` the largest error seen."""

    status: str
    error: float | None = None
    where: str = ""

    @classmethod
    def of(cls, worst: Worst, bound: float) -> Cell:
        return cls("pass" if worst.passes(bound) else "fail", worst.error, worst.where)

    def text(self) -> str:
        if self.status == "n/a":
            return "-"
        return f"{'ok' if self.status == 'pass' else 'FAIL'} {self.error:.1e}"


@dataclass
class Row:
    """One backend at one input dtype."""

    backend: str
    dtype: str
    about: str
    skip: str | None = None
    cases_run: int = 0
    cases_total: int = 0
    cells: dict[str, Cell] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(cell.status == "fail" for cell in self.cells.values())


@dataclass
class Matrix:
    """All rows, with the bounds they were held to."""

    rows: list[Row]

    @property
    def failed(self) -> bool:
        return any(row.failed for row in self.rows)

    def render(self) -> str:
        """The matrix as a fixed-width table, then the worst output of every failure."""
        name_width = max([len(r.backend) for r in self.rows] + [7])
        header = (f"{'backend':<{name_width}}  {'dtype':<8}  {'cases':>5}  "
                  + "  ".join(f"{c:<10}" for c in COLUMNS))
        lines = [header, "-" * len(header)]
        failures = []
        for row in self.rows:
            start = f"{row.backend:<{name_width}}  {row.dtype:<8}  "
            if row.skip:
                lines.append(f"{start}skipped: {row.skip}")
                continue
            cells = "  ".join(f"{row.cells.get(c, Cell('n/a')).text():<10}" for c in COLUMNS)
            lines.append(f"{start}{row.cases_run:>2}/{row.cases_total:<2}  {cells}".rstrip())
            failures += [f"  {row.backend} {row.dtype} {name}: {cell.where}"
                         for name, cell in row.cells.items() if cell.status == "fail"]
        bounds = ", ".join(f"{d} {b:g}" for d, b in TOLERANCE.items())
        lines.append(f"\nrelative error bounds: {bounds}; pairwise float64 "
                     f"{TOLERANCE['float64']:g}; properties: see properties.TOLERANCE")
        if failures:
            lines += ["", "failures (worst output):", *failures]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite errors become the strings "nan" and "inf"."""
        def number(value: float | None) -> Any:
            return value if value is None or math.isfinite(value) else str(value)

        return {
            "failed": self.failed,
            "tolerance": TOLERANCE,
            "property_tolerance": properties.TOLERANCE,
            "rows": [{
                "backend": r.backend, "dtype": r.dtype, "about": r.about, "skip": r.skip,
                "cases_run": r.cases_run, "cases_total": r.cases_total,
                "cells": {name: {"status": c.status, "error": number(c.error),
                                 "where": c.where} for name, c in r.cells.items()},
            } for r in self.rows],
        }


def _crash(case: Case, error: Exception) -> Worst:
    """A run that raised: NaN error, the exception as the place."""
    last = traceback.extract_tb(error.__traceback__)[-1]
    return Worst(math.nan, f"{case.name} raised {type(error).__name__}: {error} "
                           f"({last.filename}:{last.lineno})")


def _run_row(backend: Backend, dtype: str, cases: Sequence[Case], all_cases: bool,
             float64_runs: dict[str, dict[str, Outputs]]) -> Row:
    row = Row(backend.name, dtype, backend.about, cases_total=len(cases))
    worst: dict[str, Worst] = {}
    for case in cases:
        if backend.applies(case, dtype, all_cases=all_cases):
            continue
        row.cases_run += 1
        try:
            outputs = backend.run(case, dtype)
        except Exception as error:  # a crash is a failed cell, not an aborted matrix
            for check in CHECKS:
                worst[check] = worst.get(check, Worst()) | _crash(case, error)
            continue
        if dtype == "float64":
            float64_runs.setdefault(backend.name, {})[case.name] = outputs
        for check, found in compare_to_expected(case, outputs).items():
            worst[check] = worst.get(check, Worst()) | found
    row.cells = {check: Cell.of(w, TOLERANCE[dtype]) for check, w in worst.items()}
    return row


def _pairwise(name: str, cases: Sequence[Case],
              float64_runs: dict[str, dict[str, Outputs]]) -> Cell:
    mine = float64_runs.get(name, {})
    worst, compared = Worst(), False
    for other, theirs in float64_runs.items():
        for case in cases:
            if other != name and case.name in mine and case.name in theirs:
                found = compare_runs(case, mine[case.name], theirs[case.name])
                worst |= Worst(found.error, f"vs {other}: {found.where}")
                compared = True
    return Cell.of(worst, TOLERANCE["float64"]) if compared else Cell("n/a")


def _properties(backend: Backend) -> Cell:
    """All property checks on the backend's namespace; the cell shows the property
    whose error is largest against its own bound."""
    xp, device = backend.namespace()
    try:
        with backend.context():
            errors = properties.run_all(xp, device)
    except Exception as error:  # the property run crashed on this namespace
        return Cell("fail", math.nan, f"raised {type(error).__name__}: {error}")
    ratios = {name: e / properties.TOLERANCE[name] for name, e in errors.items()}
    name = max(ratios, key=lambda n: math.inf if math.isnan(ratios[n]) else ratios[n])
    status = "pass" if all(r <= 1.0 for r in ratios.values()) else "fail"
    return Cell(status, errors[name], name)


def build(backends: Sequence[Backend], cases: Sequence[Case], *, all_cases: bool = False,
          with_properties: bool = True,
          progress: Callable[[str], None] | None = None) -> Matrix:
    """Run every case on every backend and dtype, then the pairwise and property checks.

    ``all_cases`` lifts the low-precision quick subsets of slow backends; ``progress`` is told the
    name of each backend and dtype as it starts.
    """
    rows: list[Row] = []
    float64_runs: dict[str, dict[str, Outputs]] = {}
    for backend in backends:
        if backend.skip_reason:
            rows.append(Row(backend.name, "-", backend.about, skip=backend.skip_reason))
            continue
        for dtype in backend.available_dtypes():
            if progress:
                progress(f"{backend.name} {dtype}")
            rows.append(_run_row(backend, dtype, cases, all_cases, float64_runs))
    namespaces = {b.name: b for b in backends if not b.skip_reason and b.namespace()}
    for row in rows:
        if row.skip or row.dtype != "float64":
            continue
        row.cells["pairwise"] = _pairwise(row.backend, cases, float64_runs)
        if with_properties and row.backend in namespaces:
            row.cells["properties"] = _properties(namespaces[row.backend])
    return Matrix(rows)
