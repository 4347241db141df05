"""The conformance checks as tests: ``pytest --pyargs portable_brn.conformance``.

``test_case`` runs one case on one backend at one input dtype and holds forward,
inference, gradients and state to the reference within specification section 6;
``test_pairwise`` holds every pair of backends to each other at float64;
``test_properties`` runs the property checks on every namespace backend;
``test_backend_available`` skips, with the reason, each backend that cannot run here
(fails, under ``CI``, where the reason is a missing framework CI must have: see ``ci``).

Only the combinations that apply are collected: every backend runs every case it
supports at float64; below float64 slow backends keep to their quick subset (see
``backends.QUICK_CASES``).  Runs are cached per process and the tests of one
case share an xdist group, so under ``--dist loadgroup`` the pairwise test reuses the
float64 runs of its case.
"""

from __future__ import annotations

from functools import cache
from itertools import combinations

import pytest

from portable_brn.conformance import golden, properties
from portable_brn.conformance.cases import Outputs
from portable_brn.conformance.checks import TOLERANCE, compare_runs, compare_to_expected
from portable_brn.conformance.ci import required_here
from portable_brn.conformance.registry import all_backends

BACKENDS = {backend.name: backend for backend in all_backends()}
AVAILABLE = [b for b in BACKENDS.values() if not b.skip_reason]
CASES = {case.name: case for case in golden.all_cases()}

@cache
def _outputs(backend: str, case: str, dtype: str) -> tuple[Outputs, ...]:
    return BACKENDS[backend].run(CASES[case], dtype)


def _case_param(backend: str, dtype: str, case: str) -> object:
    return pytest.param(backend, dtype, case, id=f"{backend}-{dtype}-{case}",
                        marks=[pytest.mark.xdist_group(case)])


def _case_params() -> list:
    return [_case_param(b.name, dtype, case.name)
            for b in AVAILABLE for dtype in b.available_dtypes()
            for case in CASES.values() if b.applies(case, dtype) is None]


@pytest.mark.parametrize("name", list(BACKENDS))
def test_backend_available(name: str) -> None:
    unavailable = BACKENDS[name].unavailable
    if unavailable is None:
        return
    if required_here(unavailable.missing):
        pytest.fail(f"{name}: {unavailable} (CI is set, and CI must have {unavailable.missing})")
    pytest.skip(f"{name}: {unavailable}")


@pytest.mark.parametrize(("backend", "dtype", "case"), _case_params())
def test_case(backend: str, dtype: str, case: str) -> None:
    worst = compare_to_expected(CASES[case], _outputs(backend, case, dtype))
    bound = TOLERANCE[dtype]
    failures = {check: f"{w.error:.3g} at {w.where}" for check, w in worst.items()
                if not w.passes(bound)}
    assert not failures, f"relative error above {bound:g}: {failures}"


@pytest.mark.parametrize("case", [pytest.param(name, marks=pytest.mark.xdist_group(name))
                                  for name in CASES])
def test_pairwise(case: str) -> None:
    names = [b.name for b in AVAILABLE if b.applies(CASES[case], "float64") is None]
    if len(names) < 2:
        pytest.skip(f"fewer than two backends run {case} at float64")
    failures = []
    for a, b in combinations(names, 2):
        worst = compare_runs(CASES[case], _outputs(a, case, "float64"),
                             _outputs(b, case, "float64"))
        if not worst.passes(TOLERANCE["float64"]):
            failures.append(f"{a} vs {b}: {worst.error:.3g} at {worst.where}")
    assert not failures, failures


@pytest.mark.parametrize("name", [b.name for b in AVAILABLE if b.namespace()])
def test_properties(name: str) -> None:
    backend = BACKENDS[name]
    xp, device = backend.namespace()
    with backend.context():
        errors = properties.run_all(xp, device)
    failures = {p: e for p, e in errors.items() if not e <= properties.TOLERANCE[p]}
    assert not failures, failures
