"""The core against the independent float64 reference over many consecutive steps.

Each scenario trains for 60 steps on drifting data (so r and d clips bind), with
inference calls interleaved, and compares y, dx, dweight, dbias, the state and the
inference output at every step, within specification section 6.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import portable_brn as pb
from portable_brn import schedules
from portable_brn.conformance import reference as ref

from conftest import TOLERANCE, rel_err

STEPS = 60

# (name, shape, core options, reference options, initial step)
SCENARIOS = [
    ("nchw-warmup-ramp", (6, 3, 4, 5),
     dict(feature_axis=1, r_max=schedules.linear(1.0, 1.6, 5, 30), d_max=0.4, warmup_steps=5,
          momentum=0.1),
     dict(feature_axis=1, r_max={"kind": "linear", "start_value": 1.0, "end_value": 1.6,
                                 "start_step": 5, "end_step": 30}, d_max=0.4, warmup_steps=5,
          momentum=0.1), 0),
    ("2d-microbatch-paper", (16, 5),
     dict(micro_batch=4, momentum=0.2, **schedules.paper()),
     dict(micro_batch=4, momentum=0.2, r_max={"kind": "paper_r_max"},
          d_max={"kind": "paper_d_max"}), 4990),
    ("channels-last-clip-rmin", (4, 6, 3),
     dict(feature_axis=-1, r_max=1.3, r_min=0.9, d_max=0.2, output_clip=(-1.5, 1.5),
          momentum=0.05),
     dict(feature_axis=-1, r_max=1.3, r_min=0.9, d_max=0.2, output_clip=(-1.5, 1.5),
          momentum=0.05), 0),
    ("rank5-tuple-axes", (3, 2, 3, 2, 4),
     dict(feature_axis=(1, 2), r_max=2.0, d_max=schedules.linear(0.0, 1.0, 0, 40),
          eps=1e-5, momentum=0.3),
     dict(feature_axis=(1, 2), r_max=2.0, d_max={"kind": "linear", "start_value": 0.0,
                                                 "end_value": 1.0, "start_step": 0,
                                                 "end_step": 40}, eps=1e-5, momentum=0.3), 0),
]


def _feature_shape(shape: tuple[int, ...], feature_axis: Any) -> tuple[int, ...]:
    axes = feature_axis if isinstance(feature_axis, tuple) else (feature_axis,)
    return tuple(shape[a % len(shape)] for a in sorted(a % len(shape) for a in axes))


def _batch(rng: np.random.Generator, shape: tuple[int, ...], step: int) -> np.ndarray:
    """Data whose mean and scale drift over the steps, so r and d clips bind."""
    drift = 1.5 * np.sin(step / 7.0)
    scale = np.exp(0.8 * np.cos(step / 5.0))
    return drift + scale * rng.standard_normal(shape)


def _scenario_data(shape: tuple[int, ...], features: tuple[int, ...]) -> tuple[Any, Any, list]:
    """Float64 weight, bias and, per step, ``(x, dy, x_eval or None)``: the same data for
    every dtype, backend and affine choice, so the clip check below sees what they see."""
    rng = np.random.default_rng(7)
    weight = 1.0 + 0.3 * rng.standard_normal(features)
    bias = 0.2 * rng.standard_normal(features)
    steps = []
    for step in range(STEPS):
        x, dy = _batch(rng, shape, step), rng.standard_normal(shape)
        x_eval = _batch(rng, (3, *shape[1:]), step) if step % 5 == 4 else None
        steps.append((x, dy, x_eval))
    return weight, bias, steps


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_matches_reference_over_many_steps(backend, scenario, dtype, affine) -> None:
    _, shape, core_options, ref_options, first_step = scenario
    features = _feature_shape(shape, core_options.get("feature_axis", 1))
    config = pb.RenormConfig(**core_options)
    weight, bias, steps = _scenario_data(shape, features)
    weight, bias = (weight, bias) if affine else (None, None)
    ref_state = {"mean": np.zeros(features), "std": np.ones(features), "step": first_step}
    state = pb.RenormState(*backend.put(np.zeros(features, dtype), np.ones(features, dtype),
                                        np.asarray(first_step)))
    w, b = backend.put(None if weight is None else weight.astype(dtype),
                       None if bias is None else bias.astype(dtype))
    worst: dict[str, float] = {}
    for x, dy, x_eval in steps:
        x, dy = x.astype(dtype), dy.astype(dtype)
        expected = ref.train_step(x, ref_state["mean"], ref_state["std"], ref_state["step"],
                                  weight, bias, dy, **ref_options)
        y, state, residuals = pb.forward_train(backend.put(x), state, w, b, config)
        dx, dweight, dbias = pb.backward(residuals, backend.put(dy))
        ref_state = {k: expected[k] for k in ("mean", "std", "step")}
        pairs = {"y": (y, expected["y"]), "dx": (dx, expected["dx"]),
                 "mean": (state.mean, expected["mean"]), "std": (state.std, expected["std"])}
        if affine:
            pairs.update(dweight=(dweight, expected["dweight"]), dbias=(dbias, expected["dbias"]))
        else:
            assert dweight is None and dbias is None
        if x_eval is not None:
            x_eval = x_eval.astype(dtype)
            pairs["infer"] = (pb.forward_infer(backend.put(x_eval), state, w, b, config),
                              ref.infer(x_eval, ref_state["mean"], ref_state["std"], weight, bias,
                                        feature_axis=config.feature_axis))
        for key, (actual, wanted) in pairs.items():
            worst[key] = max(worst.get(key, 0.0), rel_err(backend.get(actual), wanted))
        assert int(backend.get(state.step)) == expected["step"]
        assert backend.get(y).dtype == dtype
    bound = TOLERANCE[dtype]
    assert all(err <= bound for err in worst.values()), worst


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_clips_bind_in_scenarios(scenario) -> None:
    """Each scenario's data makes the clips bind for real: after warm-up, r sits at r_min
    or r_max while r_max > 1, and |d| at d_max while d_max > 0, in at least 10 (step,
    feature) pairs each (r = 1 = r_max and d = 0 = d_max are no clip)."""
    _, shape, core_options, ref_options, first = scenario
    features = _feature_shape(shape, core_options.get("feature_axis", 1))
    mean, std, hits_r, hits_d = np.zeros(features), np.ones(features), 0, 0
    for offset, (x, _, _) in enumerate(_scenario_data(shape, features)[2]):
        step = first + offset
        out = ref.train_step(x, mean, std, step, **ref_options)
        mean, std = out["mean"], out["std"]
        r_max = ref.evaluate_schedule(ref_options["r_max"], step)
        r_min = ref.evaluate_schedule(ref_options.get("r_min", 1.0 / r_max), step)
        d_max = ref.evaluate_schedule(ref_options["d_max"], step)
        if step < ref_options.get("warmup_steps", 0):
            continue
        if r_max > 1.0:
            hits_r += int(np.sum((out["r"] == r_max) | (out["r"] == r_min)))
        if d_max > 0.0:
            hits_d += int(np.sum(np.abs(out["d"]) == d_max))
    assert hits_r >= 10 and hits_d >= 10, (hits_r, hits_d)  # (step, feature) pairs
