"""The committed golden vectors: ``golden.npz`` (arrays) and ``golden.json`` (index).

``golden.json`` lists every case with its description, config (schedules as spec
dicts), initial step, and per op its kind, how many inputs it has and which outputs are
expected.  ``golden.npz`` holds the arrays under ``<case>/<name>`` and
``<case>/<op index>/<x|dy|expected>/<name>``.  Together they are the whole test data:
a third party can read them without this package.

Regenerate with ``python -m portable_brn.conformance.golden``; ``test_golden`` fails
when a regeneration differs from the committed files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .cases import Case, Op, build_cases, build_large_cases
from .expected import reference_outputs

__all__ = ["GOLDEN_INDEX", "GOLDEN_NPZ", "all_cases", "drift", "generate", "load", "save"]

GOLDEN_NPZ = Path(__file__).with_name("golden.npz")
GOLDEN_INDEX = Path(__file__).with_name("golden.json")
FORMAT = 1
# Outputs may differ from a regeneration by rounding only (another NumPy build may sum in
# another order): far below the 1e-12 the float64 backends are held to.
DRIFT_TOLERANCE = 1e-14


def generate() -> tuple[Case, ...]:
    """Every case with its expected values, computed now by the reference."""
    return tuple(case.with_expected(reference_outputs(case)) for case in build_cases())


def _case_index(case: Case) -> dict[str, Any]:
    """A case's entry in ``golden.json`` (JSON types only: tuples become lists)."""
    return json.loads(json.dumps({
        "name": case.name, "about": case.about, "config": dict(case.config),
        "step": case.step, "affine": case.weight is not None,
        "ops": [{"kind": op.kind, "xs": len(op.xs), "dys": len(op.dys),
                 **({"masks": len(op.masks)} if op.masks else {}),
                 "expected": sorted(op.expected)} for op in case.ops],
    }))


def save(cases: tuple[Case, ...], npz: Path = GOLDEN_NPZ, index: Path = GOLDEN_INDEX) -> None:
    """Write ``cases`` to ``npz`` and ``index``."""
    arrays: dict[str, np.ndarray] = {}
    for case in cases:
        for name in ("mean", "std", "weight", "bias"):
            if getattr(case, name) is not None:
                arrays[f"{case.name}/{name}"] = getattr(case, name)
        for i, op in enumerate(case.ops):
            prefix = f"{case.name}/{i}"
            arrays.update({f"{prefix}/x/{j}": x for j, x in enumerate(op.xs)})
            arrays.update({f"{prefix}/dy/{j}": dy for j, dy in enumerate(op.dys)})
            arrays.update({f"{prefix}/mask/{j}": mask for j, mask in enumerate(op.masks)})
            arrays.update({f"{prefix}/expected/{k}": v for k, v in op.expected.items()})
    np.savez_compressed(npz, **arrays)
    document = {"format": FORMAT, "cases": [_case_index(case) for case in cases]}
    index.write_text(json.dumps(document, indent=1) + "\n")


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the configs were written with."""
    return tuple(value) if isinstance(value, list) else value


def _load_case(entry: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Case:
    name = entry["name"]

    def get(key: str) -> np.ndarray | None:
        return arrays.get(f"{name}/{key}")

    ops = tuple(
        Op(op["kind"], tuple(get(f"{i}/x/{j}") for j in range(op["xs"])),
           tuple(get(f"{i}/dy/{j}") for j in range(op["dys"])),
           {k: get(f"{i}/expected/{k}") for k in op["expected"]},
           tuple(get(f"{i}/mask/{j}") for j in range(op.get("masks", 0))))
        for i, op in enumerate(entry["ops"]))
    config = {key: _tuples(value) for key, value in entry["config"].items()}
    return Case(name, entry["about"], config, get("mean"), get("std"), entry["step"],
                get("weight"), get("bias"), ops)


@lru_cache(maxsize=1)
def load(npz: Path = GOLDEN_NPZ, index: Path = GOLDEN_INDEX) -> tuple[Case, ...]:
    """The committed cases, with their expected values."""
    document = json.loads(index.read_text())
    if document.get("format") != FORMAT:
        raise ValueError(f"{index}: format {document.get('format')!r}, expected {FORMAT}")
    with np.load(npz) as data:
        arrays = {key: data[key] for key in data.files}
    return tuple(_load_case(entry, arrays) for entry in document["cases"])


@lru_cache(maxsize=1)
def all_cases() -> tuple[Case, ...]:
    """The committed cases, then the large ones with expected values computed now by the
    reference (too big to commit; the reference itself is pinned by the committed ones)."""
    large = tuple(case.with_expected(reference_outputs(case)) for case in build_large_cases())
    return load() + large


def _array_drift(where: str, old: Any, new: Any, tolerance: float) -> list[str]:
    if old is None or new is None:
        return [] if old is None and new is None else [f"{where}: present in one only"]
    old, new = np.asarray(old), np.asarray(new)
    if old.shape != new.shape or old.dtype.kind != new.dtype.kind:
        return [f"{where}: {old.dtype}{old.shape} became {new.dtype}{new.shape}"]
    if not np.array_equal(np.isfinite(old), np.isfinite(new)):
        return [f"{where}: the non-finite entries moved"]
    old, new = old.astype(np.float64), new.astype(np.float64)
    finite = np.isfinite(old)
    scale = max(float(np.max(np.abs(old[finite]), initial=0.0)), 1.0)
    diff = float(np.max(np.abs(old[finite] - new[finite]), initial=0.0))
    return [f"{where}: changed by {diff:.3g}"] if diff > tolerance * scale else []


def drift(old: tuple[Case, ...], new: tuple[Case, ...]) -> list[str]:
    """Every difference between two sets of cases: names, configs, op kinds and inputs
    must match exactly, expected values within ``DRIFT_TOLERANCE`` (relative to the
    largest magnitude, at least 1)."""
    if [c.name for c in old] != [c.name for c in new]:
        return [f"case names {[c.name for c in old]} became {[c.name for c in new]}"]
    problems = []
    for a, b in zip(old, new, strict=True):
        if _case_index(a) != _case_index(b):
            problems.append(f"{a.name}: config, step or ops changed")
            continue
        for name in ("mean", "std", "weight", "bias"):
            problems += _array_drift(f"{a.name}/{name}", getattr(a, name), getattr(b, name),
                                     0.0)
        for i, (op_a, op_b) in enumerate(zip(a.ops, b.ops, strict=True)):
            where = f"{a.name}/{i}"
            for kind, tolerance in (("xs", 0.0), ("dys", 0.0), ("masks", 0.0)):
                for j, (u, v) in enumerate(zip(getattr(op_a, kind), getattr(op_b, kind),
                                               strict=True)):
                    problems += _array_drift(f"{where}/{kind}/{j}", u, v, tolerance)
            for key in op_a.expected:
                problems += _array_drift(f"{where}/expected/{key}", op_a.expected[key],
                                         op_b.expected[key], DRIFT_TOLERANCE)
    return problems


if __name__ == "__main__":
    save(generate())
    print(f"wrote {GOLDEN_NPZ} ({GOLDEN_NPZ.stat().st_size} bytes) and {GOLDEN_INDEX}")
