"""``output_clip`` on every backend and adapter: z exactly at a bound, beyond one, and
finite differences with the clip binding.

The rule (specification section 4, ``reference.train_step``): the gradient is zeroed where the
clip binds strictly, ``z < low`` or ``z > high``; a z exactly at a bound is not clipped
and passes its gradient.  The cases below make z land exactly on both bounds in every
implementation: the batch deviations are a fixed pattern whose ``var + eps`` is 4, so
``sigma_B = 2`` and ``x_hat = pattern / 2`` exactly, and the moving statistics make r
and d clip to powers of two (or be exactly 1 and 0), so ``z = x_hat * r + d`` is exact
however a backend folds it.  Every backend of the conformance registry (the core on
NumPy with the Numba and the ufunc kernel, array-api-strict, torch and JAX; the array
layer, the torch modules, the JAX functions with either gradient, Flax linen and nnx)
runs them against the float64 reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from portable_brn.conformance import properties, registry
from portable_brn.conformance import reference as ref
from portable_brn.conformance.cases import Case, Op, representable
from portable_brn.conformance.checks import TOLERANCE, compare_to_expected
from portable_brn.conformance.expected import reference_outputs

from conftest import rel_err

PATTERN = np.array([-3.0, -2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 3.0])  # mean 0, mean square 3.5625
EPS = 4.0 - float(np.mean(PATTERN**2))  # 0.4375: sigma_B = sqrt(3.5625 + eps) = 2
LOW, HIGH = -1.5, 2.5
R_MAX, D_MAX = 2.0, 0.5
# Per feature: batch mean, moving mean, moving std, and the (r, d) they give for three
# steps at momentum 0.1 (wide margins: the raw values are 16 or 1/16 and 64 or -2).
FEATURES = [
    (0.5, 0.5 - 8.0, 0.125, (2.0, 0.5)),    # z in -2.5 .. 3.5: both bounds, both beyond
    (-1.25, 6.75, 0.125, (2.0, -0.5)),      # z in -3.5 .. 2.5: both bounds, below
    (3.0, 3.0, 2.0, (1.0, 0.0)),            # the state is the batch's: z = x_hat
    (0.25, 64.25, 32.0, (0.5, -0.5)),       # z in -1.25 .. 0.25: no clip binds
]
CONFIG = {"feature_axis": 1, "eps": EPS, "momentum": 0.1, "r_max": R_MAX, "d_max": D_MAX,
          "r_min": None, "warmup_steps": 0, "micro_batch": None, "output_clip": (LOW, HIGH)}


def _batch(rng: np.random.Generator, shape: tuple[int, ...], axis: int,
           groups: int) -> np.ndarray:
    """Every feature of every micro-batch holds its batch mean plus the pattern (tiled
    to the group's size) in a random order."""
    moved = (*np.delete(shape, axis), shape[axis])
    per_group = int(np.prod(moved[:-1])) // groups
    values = np.empty((groups, per_group, len(FEATURES)))
    for f, (mu, *_rest) in enumerate(FEATURES):
        for g in range(groups):
            values[g, :, f] = mu + rng.permutation(np.tile(PATTERN, per_group // len(PATTERN)))
    return np.moveaxis(values.reshape(moved), -1, axis)


def _z(x: np.ndarray, axis: int) -> np.ndarray:
    """The exact z of ``x`` (float64 arithmetic on these values rounds nothing)."""
    view = [1] * x.ndim
    view[axis] = -1
    mu, r, d = (np.reshape([f[0] for f in FEATURES], view),
                *(np.reshape([f[3][i] for f in FEATURES], view) for i in (0, 1)))
    return (x - mu) / 2.0 * r + d


def _case(name: str, shape: tuple[int, ...], axis: int, micro_batch: int | None) -> Case:
    """Three training steps (random dy; dy only where z is strictly beyond a bound; dy
    only where z is exactly at one), then inference; expected values from the reference."""
    rng = np.random.default_rng(len(name))
    groups = 1 if micro_batch is None else shape[0] // micro_batch
    xs = [_batch(rng, shape, axis, groups) for _ in range(3)]
    dys = [representable(rng.standard_normal(shape)) for _ in range(3)]
    beyond = [(_z(x, axis) < LOW) | (_z(x, axis) > HIGH) for x in xs]
    at_bound = [(_z(x, axis) == LOW) | (_z(x, axis) == HIGH) for x in xs]
    dys[1] = np.where(beyond[1], dys[1], 0.0)
    dys[2] = np.where(at_bound[2], dys[2], 0.0)
    ops = tuple(Op("train", (x,), (dy,)) for x, dy in zip(xs, dys, strict=True))
    ops += (Op("infer", (_batch(rng, shape, axis, 1),)),)
    weight = representable(rng.uniform(0.5, 1.5, len(FEATURES)))
    bias = representable(rng.uniform(-0.5, 0.5, len(FEATURES)))
    case = Case(name, f"z exactly at output_clip bounds, {shape}", dict(
        CONFIG, feature_axis=axis, micro_batch=micro_batch),
        np.array([f[1] for f in FEATURES]), np.array([f[2] for f in FEATURES]), 0,
        weight, bias, ops)
    return case.with_expected(reference_outputs(case))


CASES = {case.name: case for case in (
    _case("clip_rows", (8, 4), 1, None),
    _case("clip_nchw_micro_batch", (16, 4, 2, 1), 1, 8),
    _case("clip_channels_last", (2, 4, 4), -1, None),
)}
BACKENDS = {backend.name: backend for backend in registry.all_backends()}


@pytest.mark.parametrize("name", CASES)
def test_z_lands_exactly_on_both_bounds(name: str) -> None:
    """The reference's unclipped z (no affine, no clip) is the exact z of the design,
    and it sits on each bound and strictly beyond one at every training step."""
    case = CASES[name]
    options = dict(case.config, output_clip=None)
    mean, std = case.mean, case.std
    for op in case.ops[:3]:
        out = ref.train_step(op.xs[0], mean, std, 0, **options)
        z = _z(op.xs[0], case.config["feature_axis"])
        np.testing.assert_array_equal(out["y"], z)
        assert np.any(z == LOW) and np.any(z == HIGH) and np.any(z < LOW) and np.any(z > HIGH)
        mean, std = out["mean"], out["std"]


@pytest.mark.parametrize("name", CASES)
def test_the_at_bound_rule_shows_in_dx(name: str) -> None:
    """Counting z == bound as clipped (the bounds moved inward by one ulp) changes dx far
    beyond the float64 bound, so a backend with that rule fails the tests below; dy only
    beyond the bounds gives dx = 0."""
    case = CASES[name]
    inward = (np.nextafter(LOW, np.inf), np.nextafter(HIGH, -np.inf))
    options = dict(case.config, output_clip=inward)
    mean, std = case.mean, case.std
    for i, op in enumerate(case.ops[:3]):
        other = ref.train_step(op.xs[0], mean, std, i, case.weight, case.bias, op.dys[0],
                               **options)
        dx = op.expected["dx"]
        assert (rel_err(other["dx"], dx) > 1e-3) == (i != 1), i
        mean, std = op.expected["mean"], op.expected["std"]
    assert not np.any(case.ops[1].expected["dx"])
    assert np.all(case.ops[1].expected["dweight"][:2] != 0)  # y = weight * bound there


def _runs() -> list:
    return [pytest.param(b, c, d, id=f"{b}-{c}-{d}") for b in BACKENDS for c in CASES
            for d in ("float64", "float32") if d in BACKENDS[b].dtypes]


@pytest.mark.parametrize(("backend", "case", "dtype"), _runs())
def test_backend_matches_reference_at_the_bounds(backend: str, case: str, dtype: str) -> None:
    runner = BACKENDS[backend]
    if runner.skip_reason:
        pytest.skip(f"{backend}: {runner.skip_reason}")
    if reason := runner.supports(CASES[case]):
        pytest.skip(f"{backend}: {reason}")
    worst = compare_to_expected(CASES[case], runner.run(CASES[case], dtype))
    failures = {check: f"{w.error:.3g} at {w.where}" for check, w in worst.items()
                if not w.passes(TOLERANCE[dtype])}
    assert not failures, failures


def _clip_away_from(z: np.ndarray, margin: float) -> tuple[float, float]:
    """Bounds near the 20% and 80% quantiles of ``z`` with no z within ``margin``."""
    values = np.sort(z.ravel())
    gaps = [(values[i] + values[i + 1]) / 2 for i in range(len(values) - 1)
            if values[i + 1] - values[i] > 2 * margin]
    low = min(gaps, key=lambda b: abs(b - np.quantile(values, 0.2)))
    high = min(gaps, key=lambda b: abs(b - np.quantile(values, 0.8)))
    return float(low), float(high)


NAMESPACES = ["numpy", "numpy-ufuncs", "strict", "torch", "jax"]


@pytest.mark.parametrize("name", NAMESPACES)
@pytest.mark.parametrize(("shape", "axis"), [((10, 3, 4), 1), ((6, 2, 5), (1, -1))],
                         ids=["rank3", "tuple-axes"])
def test_finite_differences_with_the_clip_binding(name: str, shape: tuple[int, ...],
                                                  axis: Any) -> None:
    backend = BACKENDS[name]
    if backend.skip_reason:
        pytest.skip(f"{name}: {backend.skip_reason}")
    rng = np.random.default_rng(11)
    x, dy = rng.normal(0.5, 2.0, shape), rng.standard_normal(shape)
    kept = {a % x.ndim for a in np.atleast_1d(axis)}
    reduced = tuple(a for a in range(x.ndim) if a not in kept)
    features = tuple(x.shape[a] for a in sorted(kept))
    weight, bias = rng.uniform(0.5, 1.5, features), rng.normal(0.0, 0.5, features)
    mean, var = x.mean(reduced, keepdims=True), x.var(reduced, keepdims=True)
    z = (x - mean) / np.sqrt(var + 1e-3) * 2.0 - 0.5  # finite_difference: r = r_max, d = -d_max
    low, high = _clip_away_from(z, 1e-3)
    assert 0.1 < np.mean((z < low) | (z > high)) < 0.6
    xp, device = backend.namespace()
    with backend.context():
        error = properties.finite_difference(xp, x, dy, weight, bias, feature_axis=axis,
                                             r_max=2.0, d_max=0.5, directions=2,
                                             device=device, output_clip=(low, high))
    assert error < properties.TOLERANCE["finite_difference"]
