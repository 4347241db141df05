"""The JAX functional API and both Flax modules against the float64 reference.

Each case trains for 50 steps on drifting data, so the r and d clips bind, and compares
y, dx, dweight, dbias and the state at every step with ``conformance/reference.py``,
within specification section 6 (relative error 1e-12 in float64, 1e-5 in float32).  float64
runs inside ``jax.enable_x64``, which ends with the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pytest

from portable_brn import RenormConfig, RenormState, schedules
from portable_brn.conformance import reference as ref
from portable_brn.conventions import flax_options

from conftest import rel_err

# A missing framework skips this file with the reason; the imports that need it follow.
jax = pytest.importorskip("jax")
pytest.importorskip("flax")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from portable_brn.adapters.flax import BatchRenorm, NnxBatchRenorm  # noqa: E402
from portable_brn.adapters.jax import batch_renorm, init  # noqa: E402

STEPS = 50
BOUND = {"float64": 1e-12, "float32": 1e-5}


class Schedule(NamedTuple):
    """One schedule in both spellings: a ``portable_brn.schedules`` object and the
    reference's spec dict."""

    core: Any
    reference: dict


def _ramp(start: float, end: float, first: int, last: int) -> Schedule:
    """A linear ramp from ``start`` at step ``first`` to ``end`` at step ``last``."""
    return Schedule(schedules.linear(start, end, first, last),
                    {"kind": "linear", "start_value": start, "end_value": end,
                     "start_step": first, "end_step": last})


@dataclass(frozen=True)
class Case:
    """One scenario: input shape, feature axis, Flax momentum (decay) and the options
    shared by the core and the reference."""

    shape: tuple[int, ...]
    axis: int
    decay: float
    options: dict = field(default_factory=dict)
    affine: bool = True

    def core_options(self) -> dict:
        """The options as the core and the Flax layers take them."""
        return {k: v.core if isinstance(v, Schedule) else v for k, v in self.options.items()}

    def reference_options(self) -> dict:
        """The options as ``reference.train_step`` takes them (momentum is alpha)."""
        options = {k: v.reference if isinstance(v, Schedule) else v
                   for k, v in self.options.items()}
        return {**options, "feature_axis": self.axis, "momentum": 1.0 - self.decay}

    def config(self) -> RenormConfig:
        """The core's configuration for the functional API."""
        return RenormConfig(feature_axis=self.axis, momentum=1.0 - self.decay,
                            **self.core_options())

    def module_options(self) -> dict:
        """Keyword arguments of both Flax layers."""
        return {"use_scale": self.affine, "use_bias": self.affine,
                **flax_options(self.config())}


CASES = {
    "clip-channels-last": Case((16, 5, 4), -1, 0.9, {"r_max": 1.3, "d_max": 0.3}),
    "warmup-microbatch-ramp-nchw": Case(
        (16, 3, 2, 2), 1, 0.8,
        {"micro_batch": 4, "warmup_steps": 8, "r_max": _ramp(1.0, 2.0, 8, 30),
         "d_max": _ramp(0.0, 1.0, 8, 30), "r_min": 0.7}),
    "output-clip-no-affine": Case((12, 4), -1, 0.95,
                                  {"r_max": 1.5, "d_max": 0.5, "output_clip": (-1.2, 1.2)},
                                  affine=False),
}

# apply(params, stats, x) -> (y, new_stats); params {"scale", "bias"}, stats
# {"mean", "std", "step"}, as Flax names them.
Apply = Callable[[dict, dict, jax.Array], tuple[jax.Array, dict]]


def _functional(case: Case, use_custom_vjp: bool) -> Apply:
    """``batch_renorm`` in training, with the Flax names for parameters and state."""
    config = case.config()

    def apply(params: dict, stats: dict, x: jax.Array) -> tuple[jax.Array, dict]:
        y, state = batch_renorm(x, RenormState(**stats), params.get("scale"),
                                params.get("bias"), config, training=True,
                                use_custom_vjp=use_custom_vjp)
        return y, state._asdict()

    return apply


def _linen(case: Case, dtype: Any, x: jax.Array) -> tuple[Apply, dict]:
    """The linen layer in training, and its fresh ``batch_stats``."""
    module = BatchRenorm(use_running_average=False, param_dtype=dtype,
                         **case.module_options())
    variables = jax.jit(module.init)(jax.random.key(0), x)

    def apply(params: dict, stats: dict, x: jax.Array) -> tuple[jax.Array, dict]:
        y, updates = module.apply({"params": params, "batch_stats": stats}, x,
                                  mutable=["batch_stats"])
        return y, updates["batch_stats"]

    return apply, variables["batch_stats"]


def _nnx(case: Case, dtype: Any, x: jax.Array) -> tuple[Apply, dict]:
    """The nnx layer in training, split into a pure function, and its fresh state."""
    model = NnxBatchRenorm(x.shape[case.axis], param_dtype=dtype, rngs=nnx.Rngs(0),
                           **case.module_options())
    graphdef, _, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def apply(params: dict, stats: dict, x: jax.Array) -> tuple[jax.Array, dict]:
        merged = nnx.merge(graphdef, nnx.State({k: nnx.Param(v) for k, v in params.items()}),
                           nnx.State(stats))
        y = merged(x)
        return y, nnx.to_pure_dict(nnx.state(merged, nnx.BatchStat))

    return apply, nnx.to_pure_dict(stats)


def _train_step(apply: Apply) -> Callable:
    """A jitted step: y and new state, and dx, dweight, dbias for cotangent dy."""

    def train(params: dict, stats: dict, x: jax.Array, dy: jax.Array) -> tuple[dict, dict]:
        y, vjp, new_stats = jax.vjp(lambda x, p: apply(p, stats, x), x, params, has_aux=True)
        dx, dparams = vjp(dy)
        return new_stats, {"y": y, "dx": dx, "dweight": dparams.get("scale"),
                           "dbias": dparams.get("bias")}

    return jax.jit(train)


def _batch(rng: np.random.Generator, shape: tuple[int, ...], step: int) -> np.ndarray:
    """Data whose mean and scale drift, so the r and d clips bind."""
    return 1.5 * np.sin(step / 6.0) + np.exp(0.8 * np.cos(step / 5.0)) * rng.standard_normal(shape)


@pytest.fixture(params=["float32", "float64"])
def dtype_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """The dtype under test; float64 runs with x64 enabled for this test only."""
    with jax.enable_x64(request.param == "float64"):
        yield request.param


def _limits_hit(expected: dict, options: dict, step: int) -> int:
    """How many features had r or d at a clip limit in this reference step."""
    r_max = ref.evaluate_schedule(options["r_max"], step)
    d_max = ref.evaluate_schedule(options["d_max"], step)
    r_min = 1.0 / r_max if options.get("r_min") is None else options["r_min"]
    at_r = (r_max > 1.0) & (np.isclose(expected["r"], r_max) | np.isclose(expected["r"], r_min))
    at_d = (d_max > 0.0) & np.isclose(np.abs(expected["d"]), d_max)
    return int(np.sum(at_r) + np.sum(at_d))


def _start(impl: str, case: Case, dtype: Any, x0: jax.Array) -> tuple[Apply, dict]:
    """The implementation's apply function and its fresh state."""
    if impl == "linen":
        return _linen(case, dtype, x0)
    if impl == "nnx":
        return _nnx(case, dtype, x0)
    state, _, _ = init(x0.shape[case.axis], dtype=dtype)
    return _functional(case, impl == "custom-vjp"), state._asdict()


@pytest.mark.parametrize("impl", ["custom-vjp", "autodiff", "linen", "nnx"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_over_many_steps(name: str, impl: str, dtype_name: str) -> None:
    case, dtype = CASES[name], jnp.dtype(dtype_name)
    rng = np.random.default_rng(3)
    features = case.shape[case.axis]
    weight = 1.0 + 0.3 * rng.standard_normal(features) if case.affine else None
    bias = 0.2 * rng.standard_normal(features) if case.affine else None
    params = {} if not case.affine else {"scale": jnp.asarray(weight, dtype),
                                         "bias": jnp.asarray(bias, dtype)}
    apply, stats = _start(impl, case, dtype, jnp.zeros(case.shape, dtype))
    step = _train_step(apply)
    options = case.reference_options()
    expected = {"mean": np.zeros(features), "std": np.ones(features), "step": 0}
    worst: dict[str, float] = {}
    limits_hit = 0
    for t in range(STEPS):
        x = np.asarray(jnp.asarray(_batch(rng, case.shape, t), dtype))
        dy = np.asarray(jnp.asarray(rng.standard_normal(case.shape), dtype))
        expected = ref.train_step(x, expected["mean"], expected["std"], expected["step"],
                                  weight, bias, dy, **options)
        stats, out = step(params, stats, jnp.asarray(x), jnp.asarray(dy))
        assert out["y"].dtype == dtype and stats["mean"].dtype == dtype
        assert int(stats["step"]) == expected["step"]
        out.update(mean=stats["mean"], std=stats["std"])
        for key in ("y", "dx", "dweight", "dbias", "mean", "std"):
            if expected[key] is None:
                assert out[key] is None
            else:
                worst[key] = max(worst.get(key, 0.0), rel_err(out[key], expected[key]))
        limits_hit += _limits_hit(expected, options, t)
    assert limits_hit > STEPS, "the r and d clips hardly bound"
    assert all(err <= BOUND[dtype_name] for err in worst.values()), worst
