"""Masks in the JAX functional API and both Flax modules: against the float64 reference
with renorm's clips, and against ``flax.linen.BatchNorm(...)(x, mask=mask)`` (and nnx's)
in the batch-norm limit (``r_max=1``, ``d_max=0``)."""

from __future__ import annotations

import numpy as np
import pytest

from portable_brn import RenormConfig, RenormState
from portable_brn.conformance import reference as ref

from conftest import rel_err

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

import jax.numpy as jnp  # noqa: E402

from portable_brn.adapters.flax import BatchRenorm, NnxBatchRenorm  # noqa: E402
from portable_brn.adapters.jax import renorm_train  # noqa: E402


def _data(shape, mask_shape, seed=0):
    rng = np.random.default_rng(seed)
    mask = rng.random(mask_shape) < 0.6
    mask.flat[0] = True
    return 2.0 * rng.standard_normal(shape) + 1.0, rng.standard_normal(shape), mask


@pytest.mark.parametrize("use_custom_vjp", [True, False])
@pytest.mark.parametrize("micro_batch", [None, 4])
def test_functional_with_mask_matches_reference(use_custom_vjp, micro_batch) -> None:
    x, dy, mask = _data((8, 5, 3), (8, 5, 1))
    rng = np.random.default_rng(1)
    mean, std = 0.3 * rng.standard_normal(3), np.exp(0.3 * rng.standard_normal(3))
    weight, bias = 1.0 + 0.2 * rng.standard_normal(3), 0.1 * rng.standard_normal(3)
    options = dict(feature_axis=-1, momentum=0.1, r_max=1.5, d_max=0.5, micro_batch=micro_batch)
    expected = ref.train_step(x, mean, std, 3, weight, bias, dy, mask=mask, **options)
    config = RenormConfig(**options)
    with jax.enable_x64(True):
        state = RenormState(jnp.asarray(mean), jnp.asarray(std), jnp.asarray(3))

        @jax.jit
        def step(x, weight, bias):
            def loss(x, weight, bias):
                out = renorm_train(x, state, weight, bias, config, mask=jnp.asarray(mask),
                                   use_custom_vjp=use_custom_vjp)
                return jnp.sum(out.y * dy), out
            return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, weight, bias)

        (_, out), (dx, dweight, dbias) = step(jnp.asarray(x), jnp.asarray(weight),
                                              jnp.asarray(bias))
        for value, key in ((out.y, "y"), (dx, "dx"), (dweight, "dweight"), (dbias, "dbias"),
                           (out.state.mean, "mean"), (out.state.std, "std")):
            assert rel_err(value, expected[key]) <= 1e-12, key


def _linen_step(module, x, dy, mask):
    """Output, input gradient, parameter gradients and new batch_stats of one apply."""
    variables = module.init(jax.random.key(0), x, mask=mask)

    def loss(x, params):
        y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  x, mask=mask, mutable=["batch_stats"])
        return jnp.sum(y * dy), (y, updates["batch_stats"])

    (_, (y, stats)), (dx, dparams) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        x, variables["params"])
    return y, dx, dparams, stats


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_linen_batch_norm_limit_equals_flax_batchnorm_with_mask(dtype) -> None:
    x, dy, mask = _data((8, 4, 5, 3), (8, 4, 5, 1))
    bound = 1e-12 if dtype == "float64" else 1e-5
    with jax.enable_x64(dtype == "float64"):
        x, dy, mask = jnp.asarray(x, dtype), jnp.asarray(dy, dtype), jnp.asarray(mask)
        common = dict(use_running_average=False, momentum=0.9, epsilon=1e-3,
                      param_dtype=jnp.dtype(dtype))
        native = _linen_step(nn.BatchNorm(use_fast_variance=False, **common), x, dy, mask)
        ours = _linen_step(BatchRenorm(r_max=1.0, d_max=0.0, **common), x, dy, mask)
        for a, b, what in ((ours[0], native[0], "y"), (ours[1], native[1], "dx"),
                           (ours[2]["scale"], native[2]["scale"], "dscale"),
                           (ours[2]["bias"], native[2]["bias"], "dbias"),
                           (ours[3]["mean"], native[3]["mean"], "moving mean")):
            assert rel_err(a, b) <= bound, what


def test_nnx_batch_norm_limit_equals_nnx_batchnorm_with_mask() -> None:
    x, dy, mask = _data((16, 6), (16, 1))
    with jax.enable_x64(True):
        x, dy, mask = jnp.asarray(x), jnp.asarray(dy), jnp.asarray(mask)
        common = dict(momentum=0.9, epsilon=1e-3, param_dtype=jnp.float64,
                      rngs=nnx.Rngs(0))
        native = nnx.BatchNorm(6, use_fast_variance=False, use_running_average=False, **common)
        # nnx keeps its statistics in float32 whatever param_dtype says: widen them here
        native.mean, native.var = nnx.BatchStat(jnp.zeros(6)), nnx.BatchStat(jnp.ones(6))
        ours = NnxBatchRenorm(6, r_max=1.0, d_max=0.0, **common)
        results = []
        for module in (native, ours):  # the same two training calls on each
            def loss(module, x):
                return jnp.sum(module(x, mask=mask) * dy)
            results.append((module(x, mask=mask), nnx.grad(loss, argnums=1)(module, x)))
        assert rel_err(results[1][0], results[0][0]) <= 1e-12
        assert rel_err(results[1][1], results[0][1]) <= 1e-12
        assert rel_err(ours.mean[...], native.mean[...]) <= 1e-12


def test_functional_mask_over_replicas_is_the_global_batch() -> None:
    """Under ``vmap(axis_name=...)`` masked sums and counts are averaged over replicas,
    so two replicas with different counted rows give the concatenated batch's result."""
    x, dy, mask = _data((2, 6, 3), (2, 6, 1), seed=4)
    mask[1, :5] = False  # the second replica counts one row, the first about four
    config = RenormConfig(feature_axis=-1, momentum=0.1, r_max=1.5, d_max=0.5)
    mean, std = np.full(3, 0.2), np.full(3, 1.3)
    expected = ref.train_step(x.reshape(12, 3), mean, std, 0, None, None, dy.reshape(12, 3),
                              mask=mask.reshape(12, 1), feature_axis=-1, momentum=0.1,
                              r_max=1.5, d_max=0.5)
    with jax.enable_x64(True):
        state = RenormState(jnp.asarray(mean), jnp.asarray(std), jnp.asarray(0))

        def replica(x, mask, dy):
            def loss(x):
                out = renorm_train(x, state, None, None, config, mask=mask, axis_name="r")
                return jnp.sum(out.y * dy), out
            (_, out), dx = jax.value_and_grad(loss, has_aux=True)(x)
            return out.y, dx, out.state.mean

        y, dx, new_mean = jax.vmap(replica, axis_name="r")(
            jnp.asarray(x), jnp.asarray(mask), jnp.asarray(dy))
    assert rel_err(y.reshape(12, 3), expected["y"]) <= 1e-12
    assert rel_err(dx.reshape(12, 3), expected["dx"]) <= 1e-12
    assert rel_err(new_mean[0], expected["mean"]) <= 1e-12
    assert rel_err(new_mean[1], expected["mean"]) <= 1e-12
