"""Property tests: the paper's identities hold for any shape, feature axis, dtype and
values hypothesis can find, on NumPy and on array-api-strict.

The checks themselves live in ``portable_brn.conformance.properties`` (the conformance
suite runs them per backend); here hypothesis drives them with many inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from portable_brn.conformance import properties

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
# float32 runs the same computation; its bound is SPEC section 6's, not rounding level,
# for inputs whose per-feature |mean| / std is moderate (float32 keeps about 7 digits).
FLOAT32_TOLERANCE = 1e-5
FLOAT32_MAX_OFFSET = 20.0


def _cast(problem: dict, dtype) -> dict:
    """The problem in ``dtype``; float32 only for moderately offset features."""
    if dtype == np.float32:
        x, axis = problem["x"], problem["axis"]
        keep = {a % x.ndim for a in np.atleast_1d(axis)}
        reduced = tuple(a for a in range(x.ndim) if a not in keep)
        assume(np.all(np.abs(x.mean(reduced)) < FLOAT32_MAX_OFFSET * x.std(reduced)))
    return {k: v.astype(dtype) if isinstance(v, np.ndarray) else v for k, v in problem.items()}


@st.composite
def problems(draw, min_batch: int = 2):
    """A random input: shape of rank 2-4, a valid feature axis (int or tuple), values
    with random offset and scale, and per-feature moving statistics and parameters."""
    rank = draw(st.integers(2, 4))
    shape = [draw(st.integers(min_batch, 6))] + [draw(st.integers(1, 4)) for _ in range(rank - 1)]
    candidates = [*range(1, rank), -1]
    axis = draw(st.sampled_from(candidates))
    if rank > 2 and draw(st.booleans()):
        axis = (1, rank - 1)
    features = [shape[a % rank] for a in sorted({a % rank for a in np.atleast_1d(axis)})]
    if np.prod(shape) // np.prod(features) < 2:
        shape[0] += 1  # at least two values per feature
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    offset, scale = draw(st.floats(-5, 5)), draw(st.floats(0.1, 10))
    x = offset + scale * rng.standard_normal(shape)
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


@SETTINGS
@given(problem=problems(), dtype=st.sampled_from([np.float64, np.float32]))
def test_rmax_one_dmax_zero_is_batch_norm(xp, problem, dtype) -> None:
    p = _cast(problem, dtype)
    error = properties.batchnorm_equivalence(xp, p["x"], p["weight"], p["bias"],
                                             feature_axis=p["axis"])
    bound = properties.TOLERANCE["batchnorm_equivalence"] if dtype == np.float64 \
        else FLOAT32_TOLERANCE
    assert error < bound


@SETTINGS
@given(problem=problems(), dtype=st.sampled_from([np.float64, np.float32]))
def test_train_equals_inference_when_no_clip_binds(xp, problem, dtype) -> None:
    p = _cast(problem, dtype)
    error = properties.train_matches_inference(xp, p["x"], p["mean"], p["std"], p["weight"],
                                               p["bias"], feature_axis=p["axis"])
    bound = properties.TOLERANCE["train_matches_inference"] if dtype == np.float64 \
        else FLOAT32_TOLERANCE
    assert error < bound


@SETTINGS
@given(problem=problems(min_batch=3), eps=st.sampled_from([1e-3, 1e-5]))
def test_dx_orthogonal_to_ones_and_x(xp, problem, eps) -> None:
    p = problem
    error = properties.dx_orthogonality(xp, p["x"], p["dy"], p["mean"], p["std"], p["weight"],
                                        feature_axis=p["axis"], eps=eps)
    assert error < properties.TOLERANCE["dx_orthogonality"]


@SETTINGS
@given(problem=problems(min_batch=3))  # m = 2 makes dx tiny: see README, Numerics
def test_backward_matches_finite_differences(problem) -> None:
    import array_api_compat.numpy as xp
    p = problem
    error = properties.finite_difference(xp, p["x"], p["dy"], p["weight"], p["bias"],
                                         feature_axis=p["axis"], directions=2)
    assert error < properties.TOLERANCE["finite_difference"]


@SETTINGS
@given(problem=problems(), groups=st.integers(2, 4), size=st.integers(2, 3))
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
@given(problem=problems(), sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_recalibration_equals_concatenated_statistics(xp, problem, sizes) -> None:
    p = problem
    batches = [p["rng"].normal(p["mean"].mean(), 2.0, (n, *p["x"].shape[1:])) for n in sizes]
    error = properties.recalibration_equivalence(xp, batches, feature_axis=p["axis"])
    assert error < properties.TOLERANCE["recalibration_equivalence"]
