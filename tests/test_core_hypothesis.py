"""The core against the float64 reference over random configurations.

hypothesis draws the options that each rest on one fixed scenario elsewhere: the
warm-up boundary and schedule breakpoints (the first step drawn just before, at or
after one, then several steps chained across it), constant, linear and paper
schedules, ``r_min``, micro-batches (divisors of the batch), output clips, feature axes
(0, 1, -1 and tuples), affine on and off, eps and momentum, and the NumPy kernel (Numba
where installed, or the ufunc kernel).  Every step's ``y``, ``dx``, ``dweight``,
``dbias`` and new state, and a final inference call, are held to 1e-12.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
from array_api_compat import is_numpy_namespace
from hypothesis import given, settings
from hypothesis import strategies as st

import portable_brn as pb
from portable_brn.conformance import reference as ref
from portable_brn.conformance.runner import core_config
from portable_brn.kernels import kernel_forced
from portable_brn.numpy_kernel import NumpyKernel

from conftest import rel_err

BOUND = 1e-12
PAPER_BREAKPOINTS = (5000, 25000, 40000)


@st.composite
def schedules(draw, low: float, high: float, paper: str) -> Any:
    """A schedule spec in the reference's vocabulary: a number, a constant spec, a
    linear ramp between ``low`` and ``high`` or the paper's."""
    kind = draw(st.sampled_from(["number", "constant", "linear", "paper"]))
    if kind == "number":
        return draw(st.floats(low, high))
    if kind == "constant":
        return {"kind": "constant", "value": draw(st.floats(low, high))}
    if kind == "paper":
        return {"kind": paper}
    start = draw(st.integers(0, 6))
    return {"kind": "linear", "start_value": low, "end_value": draw(st.floats(low, high)),
            "start_step": start, "end_step": start + draw(st.integers(1, 4))}


def _breakpoints(config: dict) -> list[int]:
    """The steps where the behaviour changes: end of warm-up, schedule breakpoints."""
    points = [config["warmup_steps"]]
    for name in ("r_max", "d_max"):
        spec = config[name]
        if isinstance(spec, dict) and spec["kind"] == "linear":
            points += [spec["start_step"], spec["end_step"]]
        elif isinstance(spec, dict) and spec["kind"].startswith("paper"):
            points += PAPER_BREAKPOINTS
    return points


@st.composite
def scenarios(draw) -> dict:
    """A configuration, a shape, a first step near one of its breakpoints, and seeded
    data for a few chained steps."""
    rank = draw(st.integers(2, 4))
    axis = draw(st.sampled_from([0, 1, -1] + ([(1, -1)] if rank > 2 else [])))
    kept = {a % rank for a in np.atleast_1d(axis)}
    reduced = [a for a in range(rank) if a not in kept]
    shape = [draw(st.integers(1, 4)) for _ in range(rank)]
    micro_batch, groups = None, 1
    if 0 not in kept and draw(st.booleans()):
        micro_batch, groups = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        shape[0] = micro_batch * groups
    grow = max(reduced)  # axis 0 only when nothing else is reduced

    def per_group() -> int:
        return int(np.prod([shape[a] for a in reduced])) // groups

    while per_group() < 3:  # at least 3 values per feature and micro-batch
        if grow == 0 and micro_batch is not None:
            micro_batch += 1
            shape[0] = micro_batch * groups
        else:
            shape[grow] += 1
    config = {
        "feature_axis": axis, "eps": draw(st.sampled_from([1e-3, 1e-5])),
        "momentum": draw(st.floats(0.01, 0.5)), "r_max": draw(schedules(1.0, 3.0, "paper_r_max")),
        "d_max": draw(schedules(0.0, 2.0, "paper_d_max")),
        "r_min": draw(st.one_of(st.none(), st.floats(0.3, 1.0))),
        "warmup_steps": draw(st.integers(0, 4)), "micro_batch": micro_batch,
        "output_clip": draw(st.one_of(st.none(), st.tuples(st.floats(-3.0, -0.3),
                                                           st.floats(0.3, 3.0)))),
    }
    pivot = draw(st.sampled_from(_breakpoints(config)))
    return {
        "shape": tuple(shape), "config": config, "affine": draw(st.booleans()),
        "first_step": max(0, pivot + draw(st.integers(-2, 1))),
        "steps": draw(st.integers(1, 3)), "ufunc_kernel": draw(st.booleans()),
        "offset": draw(st.floats(-3.0, 3.0)), "scale": draw(st.floats(0.2, 5.0)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _compare(actual: dict, expected: dict, where: str) -> None:
    errors = {k: rel_err(a, expected[k]) for k, a in actual.items() if a is not None}
    assert all(e <= BOUND for e in errors.values()), (where, errors)


@settings(max_examples=60, deadline=None)
@given(scenario=scenarios())
def test_core_matches_reference_over_random_configurations(scenario: dict) -> None:
    config, shape = scenario["config"], scenario["shape"]
    rng = np.random.default_rng(scenario["seed"])
    kept = sorted({a % len(shape) for a in np.atleast_1d(config["feature_axis"])})
    features = tuple(shape[a] for a in kept)
    offset, scale = scenario["offset"], scenario["scale"]
    mean = offset + scale * rng.normal(0.0, 1.0, features)
    std = scale * rng.uniform(0.3, 3.0, features)
    weight, bias = ((rng.uniform(0.5, 2.0, features), rng.normal(0.0, 1.0, features))
                    if scenario["affine"] else (None, None))
    step = scenario["first_step"]
    state = pb.RenormState(mean, std, np.asarray(step))
    core = core_config(config)
    kernel = (kernel_forced(is_numpy_namespace, NumpyKernel()) if scenario["ufunc_kernel"]
              else contextlib.nullcontext())
    with kernel:
        for i in range(scenario["steps"]):
            x = offset + scale * rng.standard_normal(shape) * rng.uniform(0.5, 2.0)
            dy = rng.standard_normal(shape)
            expected = ref.train_step(x, mean, std, step, weight, bias, dy, **config)
            y, state, residuals = pb.forward_train(x, state, weight, bias, core)
            dx, dweight, dbias = pb.backward(residuals, dy)
            assert (dweight is None) == (weight is None) and (dbias is None) == (bias is None)
            _compare({"y": y, "dx": dx, "dweight": dweight, "dbias": dbias,
                      "mean": state.mean, "std": state.std}, expected, f"step {step} (#{i})")
            assert int(state.step) == expected["step"] == step + 1
            mean, std, step = expected["mean"], expected["std"], expected["step"]
        x = offset + scale * rng.standard_normal(shape)
        _compare({"y": pb.forward_infer(x, state, weight, bias, core)},
                 {"y": ref.infer(x, mean, std, weight, bias,
                                 feature_axis=config["feature_axis"])}, "inference")
