"""Property tests: the paper's identities hold for any shape, feature axis (axis 0
included), dtype (float16 included) and values (constant features included) hypothesis
can find, on NumPy and on array-api-strict.

The checks themselves live in ``portable_brn.conformance.properties`` (the conformance
suite runs them per backend); here hypothesis drives them with many inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import portable_brn as pb
from portable_brn.conformance import properties
from portable_brn.conformance import reference as ref

from conftest import TOLERANCE, rel_err

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
FLOAT32_MAX_OFFSET = 20.0


def _bound(dtype, check: str) -> float:
    """The bound of ``check`` at ``dtype``: rounding level at float64, specification section 6's
    below it (float32 keeps about 7 digits, for moderately offset features; 16-bit
    inputs are computed in float32 and rounded on output)."""
    return properties.TOLERANCE[check] if dtype == np.float64 else TOLERANCE[dtype]


def _cast(xp, problem: dict, dtype) -> dict:
    """The problem in ``dtype``: float32 only for features whose |mean| is moderate
    against sigma_B = sqrt(var + eps) (the scale rounding errors are divided by; eps is
    the checks' default) and that vary (in the folded ``x * a + b`` a constant feature's
    output is a difference of two terms about |mean| / sqrt(eps) times larger, so its
    float32 rounding is not small against it), float16 only where the namespace has it."""
    assume(dtype != np.float16 or hasattr(xp, "float16"))
    if dtype == np.float32:
        x, axis = problem["x"], problem["axis"]
        keep = {a % x.ndim for a in np.atleast_1d(axis)}
        reduced = tuple(a for a in range(x.ndim) if a not in keep)
        sigma = np.sqrt(x.var(reduced) + 1e-3)
        assume(np.all(np.abs(x.mean(reduced)) < FLOAT32_MAX_OFFSET * sigma))
        assume(np.all(x.max(reduced) > x.min(reduced)))
    return {k: v.astype(dtype) if isinstance(v, np.ndarray) else v for k, v in problem.items()}


SOMETIMES = st.booleans()


@st.composite
def problems(draw, min_count: int = 2, axis_zero: bool = True,
             constant: st.SearchStrategy[bool] = SOMETIMES):
    """A random input: shape of rank 2-4, a valid feature axis (an int, axis 0 too when
    ``axis_zero``, or a tuple), at least ``min_count`` values per feature, values with
    random offset and scale (the first feature constant, zero variance, when ``constant``
    draws True), and per-feature moving statistics and parameters."""
    rank = draw(st.integers(2, 4))
    shape = [draw(st.integers(2, 6))] + [draw(st.integers(1, 4)) for _ in range(rank - 1)]
    axis = draw(st.sampled_from([*range(0 if axis_zero else 1, rank), -1]))
    if rank > 2 and draw(st.booleans()):
        axis = (1, rank - 1)
    feature_axes = {a % rank for a in np.atleast_1d(axis)}
    reduced = [a for a in range(rank) if a not in feature_axes]
    features = [shape[a] for a in sorted(feature_axes)]
    while np.prod(shape) // np.prod(features) < min_count:
        shape[reduced[0]] += 1
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    offset, scale = draw(st.floats(-5, 5)), draw(st.floats(0.1, 10))
    x = offset + scale * rng.standard_normal(shape)
    if draw(constant):
        x[tuple(0 if a in feature_axes else slice(None) for a in range(rank))] = offset
    return {
        "x": x, "dy": rng.standard_normal(shape), "axis": axis,
        "mean": offset + rng.normal(0, scale, features),
        "std": scale * rng.uniform(0.3, 3.0, features),
        "weight": rng.uniform(0.5, 2.0, features), "bias": rng.normal(0, 1, features),
        "rng": rng,
    }


@pytest.fixture(params=["numpy", "strict"])
def xp(request):
    if request.param == "numpy":
        import array_api_compat.numpy as namespace
        return namespace
    strict = pytest.importorskip("array_api_strict")
    strict.set_array_api_strict_flags(api_version="2024.12")
    return strict


DTYPES = st.sampled_from([np.float64, np.float32, np.float16])


@SETTINGS
@given(problem=problems(), dtype=DTYPES)
def test_rmax_one_dmax_zero_is_batch_norm(xp, problem, dtype) -> None:
    p = _cast(xp, problem, dtype)
    error = properties.batchnorm_equivalence(xp, p["x"], p["weight"], p["bias"],
                                             feature_axis=p["axis"])
    assert error < _bound(dtype, "batchnorm_equivalence")


@SETTINGS
@given(problem=problems(), dtype=DTYPES)
def test_train_equals_inference_when_no_clip_binds(xp, problem, dtype) -> None:
    p = _cast(xp, problem, dtype)
    error = properties.train_matches_inference(xp, p["x"], p["mean"], p["std"], p["weight"],
                                               p["bias"], feature_axis=p["axis"])
    assert error < _bound(dtype, "train_matches_inference")


@SETTINGS
@given(problem=problems(min_count=3, constant=st.just(False)),
       eps=st.sampled_from([1e-3, 1e-5]))
def test_dx_orthogonal_to_ones_and_x(xp, problem, eps) -> None:
    # a constant feature has no direction x - mean(x) to be orthogonal to: see below
    p = problem
    error = properties.dx_orthogonality(xp, p["x"], p["dy"], p["mean"], p["std"], p["weight"],
                                        feature_axis=p["axis"], eps=eps)
    assert error < properties.TOLERANCE["dx_orthogonality"]


@SETTINGS
@given(problem=problems(min_count=3))  # m = 2 makes dx tiny: see README, Numerics
def test_backward_matches_finite_differences(problem) -> None:
    import array_api_compat.numpy as xp
    p = problem
    error = properties.finite_difference(xp, p["x"], p["dy"], p["weight"], p["bias"],
                                         feature_axis=p["axis"], directions=2)
    assert error < properties.TOLERANCE["finite_difference"]


def _step_against_reference(p: dict, dtype) -> dict[str, float]:
    """One NumPy training step and backward on ``p`` with ``x`` and ``dy`` in ``dtype``
    (state and parameters in float32 below 32 bits, specification section 5): the relative error of
    each output against the float64 reference, and whether every output is finite."""
    x, dy = p["x"].astype(dtype), p["dy"].astype(dtype)
    param_dtype = np.float32 if np.finfo(dtype).bits < 32 else dtype
    mean, std, weight, bias = (p[k].astype(param_dtype) for k in ("mean", "std", "weight",
                                                                   "bias"))
    y, state, residuals = pb.forward_train(x, pb.RenormState(mean, std, np.asarray(0)), weight,
                                           bias, pb.RenormConfig(feature_axis=p["axis"]))
    dx, dweight, dbias = pb.backward(residuals, dy)
    assert y.dtype == dx.dtype == dtype and state.mean.dtype == param_dtype
    expected = ref.train_step(x, mean, std, 0, weight, bias, dy, feature_axis=p["axis"])
    outputs = {"y": y, "dx": dx, "dweight": dweight, "dbias": dbias, "mean": state.mean,
               "std": state.std}
    assert all(np.all(np.isfinite(a)) for a in outputs.values())
    return {k: rel_err(a, expected[k]) for k, a in outputs.items()}


@SETTINGS
@given(problem=problems(min_count=3))
def test_float16_step_matches_reference(problem) -> None:
    """Any shape, axis and offset in float16 (NumPy: the only namespace here with it)."""
    errors = _step_against_reference(problem, np.float16)
    assert max(errors.values()) < TOLERANCE[np.float16], errors


@SETTINGS
@given(problem=problems(min_count=3, constant=st.just(True)))
def test_constant_feature_has_finite_dx(problem) -> None:
    """A zero-variance feature: sigma_B = sqrt(eps), x_hat = 0, and dx finite and equal to
    the reference's, like every other output."""
    errors = _step_against_reference(problem, np.float64)
    assert max(errors.values()) < TOLERANCE[np.float64], errors


@SETTINGS
@given(problem=problems(axis_zero=False), groups=st.integers(2, 4), size=st.integers(2, 3))
def test_micro_batches_equal_separate_calls(xp, problem, groups, size) -> None:
    p = problem
    rows = groups * size
    x = np.resize(p["x"], (rows, *p["x"].shape[1:])) + p["rng"].standard_normal(
        (rows, *p["x"].shape[1:]))
    dy = p["rng"].standard_normal(x.shape)
    error = properties.micro_batch_equivalence(xp, x, dy, p["mean"], p["std"], p["weight"],
                                               p["bias"], micro_batch=size,
                                               feature_axis=p["axis"])
    assert error < properties.TOLERANCE["micro_batch_equivalence"]


@SETTINGS
@given(problem=problems(axis_zero=False), sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_recalibration_equals_concatenated_statistics(xp, problem, sizes) -> None:
    p = problem
    batches = [p["rng"].normal(p["mean"].mean(), 2.0, (n, *p["x"].shape[1:])) for n in sizes]
    error = properties.recalibration_equivalence(xp, batches, feature_axis=p["axis"])
    assert error < properties.TOLERANCE["recalibration_equivalence"]
