"""The step counter advances on every training call, a non-finite batch included (issue
13, item 8): only the moving statistics of the non-finite features stay.  The counted
step then drives warm-up and the schedules of the next call, as in the reference.

Checked on the array layer, the JAX functional API (under ``jit``) and both Flax
modules; the torch modules are tested with the torch adapter."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest

import portable_brn as pb
from portable_brn.adapters.array import BatchRenorm
from portable_brn.conformance import reference as ref

from conftest import rel_err

OPTIONS = {"warmup_steps": 2, "r_max": 1.5, "d_max": 0.5}
RNG = np.random.default_rng(11)
BAD = RNG.normal(3.0, 0.2, (8, 3))
BAD[0, 0], BAD[3, 2] = np.nan, np.inf          # features 0 and 2 non-finite, 1 finite
GOOD = RNG.normal(3.0, 0.2, (8, 3))             # far from the fresh state: the clips bind
ALL_BAD = np.full((8, 3), np.nan)


def _expected() -> list[dict]:
    """The reference over ALL_BAD, BAD, GOOD from a fresh state (no weight or bias)."""
    mean, std, step, results = np.zeros(3), np.ones(3), 0, []
    for x in (ALL_BAD, BAD, GOOD):
        out = ref.train_step(x, mean, std, step, **OPTIONS)
        mean, std, step = out["mean"], out["std"], out["step"]
        results.append(out)
    return results


# Each runner trains on one batch and returns (y, mean, std, step) as host arrays.
Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray, int]]


def _check(train: Runner, bound: float) -> None:
    expected = _expected()
    assert [e["step"] for e in expected] == [1, 2, 3]
    np.testing.assert_array_equal(expected[0]["mean"], np.zeros(3))
    np.testing.assert_array_equal(expected[1]["finite"], [False, True, False])
    for x, want in zip((ALL_BAD, BAD, GOOD), expected, strict=True):
        y, mean, std, step = train(x)
        assert step == want["step"]
        assert rel_err(mean, want["mean"]) <= bound and rel_err(std, want["std"]) <= bound
    # The last call is at step 2, just past warm-up (had the non-finite calls not been
    # counted, it would be in warm-up, d = 0): d clipped at d_max.
    assert np.all(np.abs(expected[2]["d"]) == OPTIONS["d_max"])
    assert rel_err(y, want["y"]) <= bound


def test_array_layer() -> None:
    layer = BatchRenorm(3, affine=False, dtype=np.float64, **OPTIONS)

    def train(x: np.ndarray) -> tuple:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            y = layer.forward(x)
        return y, layer.state.mean, layer.state.std, int(layer.state.step)

    _check(train, 1e-12)
    assert layer.nonfinite_batches == 2


FLAX_OPTIONS = {"axis": -1, "momentum": 0.99, "use_scale": False, "use_bias": False,
                **OPTIONS}


@pytest.fixture
def jax():
    """JAX with float64 enabled for the test (skipped where JAX or Flax is missing)."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    with jax.enable_x64(True):
        yield jax


def test_jax_functional_under_jit(jax) -> None:
    import jax.numpy as jnp

    from portable_brn.adapters.jax import renorm_train

    config = pb.RenormConfig(**OPTIONS)
    step = jax.jit(lambda x, state: renorm_train(x, state, None, None, config))
    state = pb.init_state(3, xp=jnp, dtype=jnp.float64)

    def train(x: np.ndarray) -> tuple:
        nonlocal state
        y, state, _ = step(jnp.asarray(x), state)
        return np.asarray(y), np.asarray(state.mean), np.asarray(state.std), int(state.step)

    _check(train, 1e-12)


def test_flax_linen(jax) -> None:
    import jax.numpy as jnp

    from portable_brn.adapters.flax import BatchRenorm as LinenBatchRenorm

    module = LinenBatchRenorm(use_running_average=False, param_dtype=jnp.float64,
                              **FLAX_OPTIONS)
    stats = module.init(jax.random.key(0), jnp.asarray(GOOD))["batch_stats"]
    apply = jax.jit(lambda stats, x: module.apply({"batch_stats": stats}, x,
                                                  mutable=["batch_stats"]))

    def train(x: np.ndarray) -> tuple:
        nonlocal stats
        y, updates = apply(stats, jnp.asarray(x))
        stats = updates["batch_stats"]
        return (np.asarray(y), np.asarray(stats["mean"]), np.asarray(stats["std"]),
                int(stats["step"]))

    _check(train, 1e-12)


def test_flax_nnx(jax) -> None:
    import jax.numpy as jnp
    from flax import nnx

    from portable_brn.adapters.flax import NnxBatchRenorm

    model = NnxBatchRenorm(3, param_dtype=jnp.float64, rngs=nnx.Rngs(0), **FLAX_OPTIONS)
    step = nnx.jit(lambda model, x: model(x))

    def train(x: np.ndarray) -> tuple:
        y = step(model, jnp.asarray(x))
        return (np.asarray(y), np.asarray(model.mean[...]), np.asarray(model.std[...]),
                int(model.step[...]))

    _check(train, 1e-12)
