"""Training loops with optax under ``jit``, serialization and replica sync of the Flax layers.

The models put the renorm layer first, so its state depends on the data alone and can
be followed step by step with the float64 reference while the optimizer trains the
rest; the final state must match it (specification section 6, float32) and the loss must fall.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from portable_brn.conformance import reference as ref

from conftest import rel_err

# A missing framework skips this file with the reason; the imports that need it follow.
jax = pytest.importorskip("jax")
pytest.importorskip("flax")
optax = pytest.importorskip("optax")

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx, serialization  # noqa: E402

from portable_brn.adapters.flax import BatchRenorm, NnxBatchRenorm  # noqa: E402

STEPS = 80
FEATURES = 6
OPTIONS = {"r_max": 1.5, "d_max": 0.5, "warmup_steps": 10, "momentum": 0.9}


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Batches whose statistics drift (so the clips bind) and a linear target."""
    rng = np.random.default_rng(seed)
    t = np.arange(STEPS)[:, None, None]
    xs = 2.0 * np.sin(t / 9.0) + np.exp(0.5 * np.cos(t / 7.0)) * rng.standard_normal(
        (STEPS, 32, FEATURES))
    w = rng.standard_normal((FEATURES, 1))
    xs = xs.astype(np.float32)
    targets = ((xs - xs.mean(axis=1, keepdims=True)) @ w).astype(np.float32)
    return xs, targets


def _reference_state(xs: np.ndarray) -> dict:
    """The renorm state after every batch of ``xs``, by the float64 reference."""
    state = {"mean": np.zeros(FEATURES), "std": np.ones(FEATURES), "step": 0}
    for x in xs:
        out = ref.train_step(x, state["mean"], state["std"], state["step"], feature_axis=-1,
                             r_max=OPTIONS["r_max"], d_max=OPTIONS["d_max"],
                             warmup_steps=OPTIONS["warmup_steps"],
                             momentum=1.0 - OPTIONS["momentum"])
        state = {k: out[k] for k in state}
    return state


def _check(losses: list[float], stats: dict, xs: np.ndarray) -> None:
    expected = _reference_state(xs)
    assert int(stats["step"]) == expected["step"] == STEPS
    for key in ("mean", "std"):
        assert rel_err(np.asarray(stats[key], np.float64), expected[key]) <= 1e-5
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = BatchRenorm(use_running_average=not train, **OPTIONS)(x)
        return nn.Dense(1)(x)


class NnxModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.norm = NnxBatchRenorm(FEATURES, rngs=rngs, **OPTIONS)
        self.head = nnx.Linear(FEATURES, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.norm(x))


def _linen_training() -> tuple[dict, list[float], np.ndarray]:
    xs, targets = _data()
    model, tx = LinenModel(), optax.adam(3e-2)
    variables = jax.jit(model.init, static_argnums=2)(jax.random.key(0), xs[0], False)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params: Any, stats: Any, opt_state: Any, x: jax.Array, target: jax.Array):
        def loss_fn(params: Any) -> tuple:
            y, updates = model.apply({"params": params, "batch_stats": stats}, x, True,
                                     mutable=["batch_stats"])
            return jnp.mean((y - target) ** 2), updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    losses = []
    for x, target in zip(xs, targets, strict=True):
        params, stats, opt_state, loss = step(params, stats, opt_state, x, target)
        losses.append(float(loss))
    return {"params": params, "batch_stats": stats}, losses, xs


def test_linen_trains_with_optax_under_jit() -> None:
    variables, losses, xs = _linen_training()
    _check(losses, variables["batch_stats"]["BatchRenorm_0"], xs)


def test_linen_state_round_trips_through_serialization() -> None:
    variables, _, xs = _linen_training()
    template = jax.tree.map(jnp.zeros_like, variables)
    restored = serialization.from_bytes(template, serialization.to_bytes(variables))
    jax.tree.map(np.testing.assert_array_equal, restored, variables)
    model = LinenModel()
    np.testing.assert_array_equal(model.apply(restored, xs[0], False),
                                  model.apply(variables, xs[0], False))


def _nnx_training() -> tuple[NnxModel, list[float], np.ndarray]:
    xs, targets = _data()
    model = NnxModel(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model: NnxModel, optimizer: nnx.Optimizer, x: jax.Array, target: jax.Array):
        def loss_fn(model: NnxModel) -> jax.Array:
            return jnp.mean((model(x) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, x, target))
              for x, target in zip(xs, targets, strict=True)]
    return model, losses, xs


def test_nnx_trains_with_optax_under_jit() -> None:
    model, losses, xs = _nnx_training()
    _check(losses, nnx.to_pure_dict(nnx.state(model.norm, nnx.BatchStat)), xs)


def test_nnx_state_round_trips_through_serialization() -> None:
    model, _, xs = _nnx_training()
    saved = serialization.to_bytes(nnx.to_pure_dict(nnx.state(model)))
    fresh = NnxModel(nnx.Rngs(1))
    state = nnx.state(fresh)
    nnx.replace_by_pure_dict(state, serialization.from_bytes(nnx.to_pure_dict(state), saved))
    nnx.update(fresh, state)
    assert int(fresh.norm.step[...]) == STEPS
    model.eval()
    fresh.eval()
    np.testing.assert_array_equal(fresh(xs[0]), model(xs[0]))


@pytest.mark.parametrize("use_custom_vjp", [True, False], ids=["custom-vjp", "autodiff"])
def test_linen_axis_name_syncs_replicas(use_custom_vjp: bool) -> None:
    """Replicas under ``vmap(axis_name=...)`` hold the state of the whole batch."""
    xs, _ = _data()
    module = BatchRenorm(use_running_average=False, axis_name="batch",
                         use_custom_vjp=use_custom_vjp, **OPTIONS)
    variables = jax.jit(module.init)(jax.random.key(0), xs[0])  # no axis needed at init

    def apply(x: jax.Array) -> tuple:
        return module.apply(variables, x, mutable=["batch_stats"])

    y, updates = jax.jit(jax.vmap(apply, axis_name="batch"))(xs[0].reshape(4, 8, FEATURES))
    whole = BatchRenorm(use_running_average=False, use_custom_vjp=use_custom_vjp, **OPTIONS)
    y_whole, updates_whole = whole.apply(variables, xs[0], mutable=["batch_stats"])
    np.testing.assert_allclose(y.reshape(y_whole.shape), y_whole, rtol=1e-5, atol=1e-5)
    for replica in range(4):
        jax.tree.map(lambda a, b, i=replica: np.testing.assert_allclose(a[i], b, rtol=1e-6),
                     updates["batch_stats"], updates_whole["batch_stats"])
