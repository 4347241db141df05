"""Infinite limits mean no clipping (issue 13, item 7): ``r_max`` and ``d_max`` of inf, as
constants and as schedule ends, on every backend and under ``jax.jit`` and
``torch.compile``, against the float64 reference, with no NaN from ``inf * 0``.

The conformance cases ``infinite_limits`` and ``infinite_schedules`` run the same
through every conformance backend and adapter; here each piece is pinned on its own."""

from __future__ import annotations

import math

import numpy as np
import pytest

import portable_brn as pb
from portable_brn import schedules
from portable_brn.conformance import reference as ref
from portable_brn.renorm import clip_limits

from conftest import rel_err

INF = math.inf
# (start, end, start step, end step) of ramps with an infinite end, and steps around them.
RAMPS = [(1.0, INF, 2, 4), (0.0, INF, 0, 3), (INF, 3.0, 1, 5), (INF, INF, 1, 2)]
STEPS = range(8)


def _spec(start: float, end: float, first: int, last: int) -> dict:
    return {"kind": "linear", "start_value": start, "end_value": end, "start_step": first,
            "end_step": last}


def test_config_takes_infinite_limits() -> None:
    config = pb.RenormConfig(r_max=INF, d_max=INF)
    assert clip_limits(config, np.asarray(0), np.float64) == (0.0, INF, INF)
    pb.RenormConfig(r_max=schedules.linear(1.0, INF, 0, 10), d_max=schedules.constant(INF))


@pytest.mark.parametrize(("option", "value", "message"), [
    ("r_max", math.nan, r"^r_max must be in \[1\.0, inf\], got nan"),
    ("d_max", math.nan, r"^d_max must be in \[0\.0, inf\], got nan"),
    ("r_max", -INF, r"^r_max must be in \[1\.0, inf\]"),
    ("eps", INF, r"^eps must be in \(0\.0, inf\), got inf"),
    ("momentum", INF, r"^momentum must be in \(0\.0, 1\.0\]"),
    ("r_min", INF, r"^r_min must be in \(0\.0, 1\.0\]"),
    ("d_max", schedules.linear(-INF, 2.0, 0, 2), r"^d_max \(schedule value\) must be"),
])
def test_nan_and_other_infinities_are_refused(option, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        pb.RenormConfig(**{option: value})


def test_schedules_refuse_nan() -> None:
    with pytest.raises(ValueError, match=r"^Linear schedule values must not be NaN"):
        schedules.linear(1.0, math.nan, 0, 2)


@pytest.mark.parametrize("ramp", RAMPS, ids=str)
def test_ramps_with_an_infinite_end_match_the_reference(backend, ramp) -> None:
    """Exactly the reference's value at every step, never NaN: the start value up to the
    first step, inf strictly inside, the end value from the last step on."""
    schedule = schedules.linear(*ramp)
    for step in STEPS:
        value = float(backend.get(schedule(backend.put(np.asarray(float(step))))))
        expected = ref.evaluate_schedule(_spec(*ramp), step)
        assert value == expected, (step, value, expected)
    assert ref.evaluate_schedule(_spec(*ramp), ramp[2]) == ramp[0]
    assert ref.evaluate_schedule(_spec(*ramp), ramp[2] + 1) == INF


def test_warm_up_gives_exactly_r_1_and_d_0(backend) -> None:
    """With infinite limits (constant and ramped), warm-up still clips r to [1, 1] and d
    to [0, 0] exactly; afterwards r and d are the unclipped ratios of the reference."""
    rng = np.random.default_rng(4)
    ramps = {"r_max": (1.0, INF, 1, 2), "d_max": (0.0, INF, 1, 2)}
    limits = [({"r_max": INF, "d_max": INF},) * 2,
              ({k: schedules.linear(*v) for k, v in ramps.items()},
               {k: _spec(*v) for k, v in ramps.items()})]
    for core_limits, ref_limits in limits:
        config = pb.RenormConfig(warmup_steps=2, **core_limits)
        mean, std = np.array([0.5, -0.5, 0.0]), np.array([1.0, 1.0, 3.0])
        for step in range(4):
            x = rng.normal([4.0, -9.0, 0.0], [5.0, 0.1, 20.0], (8, 3))
            state = pb.RenormState(*backend.put(mean, std, np.asarray(step)))
            _, new, residuals = pb.forward_train(backend.put(x), state, None, None, config)
            r, d = (backend.get(a).reshape(3) for a in (residuals.r, residuals.d))
            expected = ref.train_step(x, mean, std, step, warmup_steps=2, **ref_limits)
            if step < 2:
                np.testing.assert_array_equal(r, 1.0)
                np.testing.assert_array_equal(d, 0.0)
            else:
                assert np.any(np.abs(d) > 5.0) and np.any(r > 3.0) and np.any(r < 1 / 3)
            assert rel_err(r, expected["r"]) < 1e-15 and rel_err(d, expected["d"]) < 1e-15
            mean, std = backend.get(new.mean), backend.get(new.std)


def _unclipped_batches(steps: int, shape: tuple[int, ...]) -> list[np.ndarray]:
    """Batches far from the state (r and d well beyond the default limits)."""
    rng = np.random.default_rng(5)
    return [rng.normal([6.0, -8.0, 0.5, 1.0], [9.0, 0.05, 1.0, 4.0], shape)
            for _ in range(steps)]


def _reference_steps(xs: list[np.ndarray], dys: list[np.ndarray], weight: np.ndarray,
                     bias: np.ndarray, **options) -> list[dict]:
    mean, std, step, results = np.zeros(4), np.ones(4), 0, []
    for x, dy in zip(xs, dys, strict=True):
        out = ref.train_step(x, mean, std, step, weight, bias, dy, **options)
        mean, std, step = out["mean"], out["std"], out["step"]
        results.append(out)
    return results


def _worst(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """The largest relative error; NaN (a non-finite output) fails the comparison."""
    errors = [rel_err(a, b) for a, b in pairs]
    assert not any(math.isnan(e) for e in errors), errors
    return max(errors)


OPTIONS = {"momentum": 0.2, "warmup_steps": 1}
SCHEDULED = {"r_max": (1.0, INF, 1, 3), "d_max": (0.0, INF, 1, 3)}


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch")
@pytest.mark.parametrize("scheduled", [False, True], ids=["constant", "ramp"])
def test_torch_eager_and_compiled_match_the_reference(scheduled) -> None:
    torch = pytest.importorskip("torch")
    from portable_brn.adapters.torch import BatchRenorm1d

    limits = ({k: schedules.linear(*v) for k, v in SCHEDULED.items()} if scheduled
              else {"r_max": INF, "d_max": INF})
    ref_limits = ({k: _spec(*v) for k, v in SCHEDULED.items()} if scheduled
                  else {"r_max": INF, "d_max": INF})
    xs = _unclipped_batches(5, (16, 4))
    dys = [np.cos(x) for x in xs]
    weight, bias = np.array([1.5, 0.5, 1.0, 2.0]), np.array([0.1, -0.2, 0.0, 0.3])
    expected = _reference_steps(xs, dys, weight, bias, **OPTIONS, **ref_limits)
    for compiled in (False, True):
        layer = BatchRenorm1d(4, dtype=torch.float64, **OPTIONS, **limits)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(weight))
            layer.bias.copy_(torch.from_numpy(bias))
        run = torch.compile(layer, fullgraph=True) if compiled else layer
        for x, dy, want in zip(xs, dys, expected, strict=True):
            xt = torch.tensor(x, requires_grad=True)
            layer.weight.grad = layer.bias.grad = None
            y = run(xt)
            y.backward(torch.from_numpy(dy))
            assert _worst([(y.detach().numpy(), want["y"]), (xt.grad.numpy(), want["dx"]),
                           (layer.weight.grad.numpy(), want["dweight"]),
                           (layer.bias.grad.numpy(), want["dbias"]),
                           (layer.running_mean.numpy(), want["mean"]),
                           (layer.running_std.numpy(), want["std"])]) < 1e-12, compiled


@pytest.mark.parametrize("scheduled", [False, True], ids=["constant", "ramp"])
def test_jax_under_jit_matches_the_reference(scheduled) -> None:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from portable_brn.adapters.jax import renorm_train

    limits = ({k: schedules.linear(*v) for k, v in SCHEDULED.items()} if scheduled
              else {"r_max": INF, "d_max": INF})
    ref_limits = ({k: _spec(*v) for k, v in SCHEDULED.items()} if scheduled
                  else {"r_max": INF, "d_max": INF})
    config = pb.RenormConfig(**OPTIONS, **limits)
    xs = _unclipped_batches(5, (16, 4))
    dys = [np.cos(x) for x in xs]
    weight, bias = np.array([1.5, 0.5, 1.0, 2.0]), np.array([0.1, -0.2, 0.0, 0.3])
    expected = _reference_steps(xs, dys, weight, bias, **OPTIONS, **ref_limits)
    with jax.enable_x64(True):

        @jax.jit
        def step(x, state, dy):
            out, vjp = jax.vjp(lambda x, w, b: renorm_train(x, state, w, b, config), x,
                               jnp.asarray(weight), jnp.asarray(bias))
            cotangent = out._replace(y=dy, state=jax.tree.map(jnp.zeros_like, out.state),
                                     finite=np.zeros(out.finite.shape, jax.dtypes.float0))
            return out, vjp(cotangent)

        state = pb.RenormState(jnp.zeros(4), jnp.ones(4), jnp.asarray(0))
        for x, dy, want in zip(xs, dys, expected, strict=True):
            out, (dx, dw, db) = step(jnp.asarray(x), state, jnp.asarray(dy))
            state = out.state
            assert _worst([(out.y, want["y"]), (dx, want["dx"]), (dw, want["dweight"]),
                           (db, want["dbias"]), (state.mean, want["mean"]),
                           (state.std, want["std"])]) < 1e-12
