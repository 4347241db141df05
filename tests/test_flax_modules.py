"""The Flax layers keep Flax's conventions: variables, modes, dtypes, errors.

``BatchRenorm`` (flax.linen) and ``NnxBatchRenorm`` (flax.nnx); their numerics against
the float64 reference are in ``test_jax_conformance.py``, training loops and
serialization in ``test_flax_training.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from portable_brn import schedules
from portable_brn.conformance import reference as ref

# A missing framework skips this file with the reason; the imports that need it follow.
jax = pytest.importorskip("jax")
pytest.importorskip("flax")

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from portable_brn.adapters.flax import BatchRenorm, NnxBatchRenorm  # noqa: E402

X = 1.5 * jax.random.normal(jax.random.key(0), (8, 5, 3)) + 0.7


def _init(module: nn.Module, x: jax.Array = X) -> dict:
    return jax.jit(module.init)(jax.random.key(1), x)


def test_linen_variables_and_no_update_during_init() -> None:
    variables = _init(BatchRenorm(use_running_average=False))
    stats, params = variables["batch_stats"], variables["params"]
    assert set(stats) == {"mean", "std", "step"} and set(params) == {"scale", "bias"}
    np.testing.assert_array_equal(stats["mean"], np.zeros(3))
    np.testing.assert_array_equal(stats["std"], np.ones(3))
    assert int(stats["step"]) == 0 and stats["mean"].dtype == jnp.float32
    bare = _init(BatchRenorm(use_running_average=False, use_scale=False, use_bias=False))
    assert "params" not in bare


def test_linen_tuple_axis_keeps_one_statistic_per_element() -> None:
    variables = _init(BatchRenorm(use_running_average=False, axis=(1, 2)))
    assert variables["params"]["scale"].shape == variables["batch_stats"]["std"].shape == (5, 3)


def test_linen_use_running_average_at_construction_or_call() -> None:
    module = BatchRenorm(momentum=0.9)
    variables = _init(BatchRenorm(use_running_average=True))
    _, updates = module.apply(variables, X, use_running_average=False, mutable=["batch_stats"])
    stats = updates["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.1 * X.mean(axis=(0, 1)), rtol=1e-5)
    assert int(stats["step"]) == 1
    y_eval = BatchRenorm(use_running_average=True).apply({**variables, "batch_stats": stats}, X)
    np.testing.assert_allclose(y_eval, ref.infer(X, stats["mean"], stats["std"], feature_axis=-1),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="use_running_average"):
        BatchRenorm(use_running_average=True).apply(variables, X, use_running_average=False)


def test_linen_dtype_follows_flax_and_statistics_stay_float32() -> None:
    x16 = X.astype(jnp.bfloat16)
    module = BatchRenorm(use_running_average=False)
    variables = _init(module, x16)
    y, updates = module.apply(variables, x16, mutable=["batch_stats"])
    assert y.dtype == jnp.float32  # promoted with the float32 parameters, as in Flax
    assert updates["batch_stats"]["mean"].dtype == jnp.float32
    y16, _ = BatchRenorm(use_running_average=False, dtype=jnp.bfloat16).apply(
        variables, x16, mutable=["batch_stats"])
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y, rtol=2e-2, atol=2e-2)


def test_linen_nonfinite_batch_keeps_state_and_sows_flags() -> None:
    module = BatchRenorm(use_running_average=False)
    variables = _init(module)
    x = X.at[0, 0, 2].set(jnp.nan)
    _, updates = jax.jit(lambda v, x: module.apply(v, x, mutable=["batch_stats",
                                                                  "intermediates"]))(variables, x)
    np.testing.assert_array_equal(updates["intermediates"]["finite"], [True, True, False])
    assert np.all(np.isfinite(updates["batch_stats"]["mean"]))
    assert updates["batch_stats"]["std"][2] == 1.0


@pytest.mark.parametrize("kwargs, error, text", [
    ({"momentum": 1.0}, ValueError, "momentum"),
    ({"momentum": -0.1}, ValueError, "momentum"),
    ({"epsilon": 0.0}, ValueError, "eps"),
    ({"r_max": 0.5}, ValueError, "r_max"),
    ({"d_max": -1.0}, ValueError, "d_max"),
    ({"warmup_steps": -1}, ValueError, "warmup_steps"),
    ({"micro_batch": 0}, ValueError, "micro_batch"),
    ({"r_max": schedules.linear(0.5, 3.0, 0, 10)}, ValueError, "r_max"),
])
def test_invalid_hyperparameters_fail_at_construction(kwargs: dict, error: type,
                                                       text: str) -> None:
    with pytest.raises(error, match=text):
        BatchRenorm(**kwargs)
    with pytest.raises(error, match=text):
        NnxBatchRenorm(3, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("x, error, text", [
    (X.astype(jnp.int32), TypeError, "x must have a real floating dtype"),
    (jnp.ones((1, 3)), ValueError, "more than 1 value per feature"),
    (jnp.ones((4, 4)), ValueError, "features"),
])
def test_bad_input_is_named_at_trace_time(x: jax.Array, error: type, text: str) -> None:
    linen = BatchRenorm(use_running_average=False, use_scale=False, use_bias=False)
    variables = {"batch_stats": _init(linen)["batch_stats"]}
    with pytest.raises(error, match=text):
        jax.jit(lambda v, x: linen.apply(v, x, mutable=["batch_stats"]))(variables, x)
    model = NnxBatchRenorm(3, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))
    with pytest.raises(error, match=text):
        nnx.jit(lambda m, x: m(x))(model, x)
    assert int(model.step[...]) == 0


def test_nnx_variables_and_modes() -> None:
    model = NnxBatchRenorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    assert isinstance(model.mean, nnx.BatchStat) and isinstance(model.step, nnx.BatchStat)
    assert isinstance(model.scale, nnx.Param) and isinstance(model.bias, nnx.Param)
    assert NnxBatchRenorm(3, use_scale=False, rngs=nnx.Rngs(0)).scale is None
    model(X)
    np.testing.assert_allclose(model.mean[...], 0.1 * X.mean(axis=(0, 1)), rtol=1e-5)
    model.eval()
    y = model(X)
    assert int(model.step[...]) == 1
    np.testing.assert_allclose(y, ref.infer(X, model.mean[...], model.std[...], feature_axis=-1),
                               rtol=1e-5, atol=1e-6)
    model(X, use_running_average=False)  # the call's flag wins over the module's
    model.train()
    nnx.view(model, use_running_average=True)(X)
    assert int(model.step[...]) == 2 and model.use_running_average is False
    with pytest.raises(ValueError, match="use_running_average"):
        NnxBatchRenorm(3, use_running_average=None, rngs=nnx.Rngs(0))(X)


def test_nnx_nonfinite_batch_keeps_state_and_captures_flags() -> None:
    model = NnxBatchRenorm(3, rngs=nnx.Rngs(0))

    @nnx.capture(nnx.Intermediate)
    def forward(model: NnxBatchRenorm, x: jax.Array) -> jax.Array:
        return model(x)

    _, intermediates = forward(model, X.at[1, 2, 0].set(jnp.inf))
    np.testing.assert_array_equal(intermediates["finite"][...], [False, True, True])
    assert model.std[...][0] == 1.0 and np.all(np.isfinite(model.std[...]))
    model(X)  # outside nnx.capture nothing is sown
    assert "finite" not in nnx.to_pure_dict(nnx.state(model))


def test_nnx_bfloat16_keeps_float32_statistics() -> None:
    model = NnxBatchRenorm(3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    y = model(X.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and model.mean[...].dtype == jnp.float32


def test_nnx_module_under_its_nnx_name() -> None:
    from portable_brn.adapters.nnx import BatchRenorm as NnxName

    assert NnxName is NnxBatchRenorm
    layer = NnxName(3, rngs=nnx.Rngs(0))
    y = layer(jnp.arange(12.0).reshape(4, 3))
    assert y.shape == (4, 3) and int(layer.step[...]) == 1


def test_numpy_input_is_taken_and_another_library_is_refused_naming_x() -> None:
    strict = pytest.importorskip("array_api_strict")
    linen = BatchRenorm(use_running_average=False)
    variables = _init(linen)
    y, _ = linen.apply(variables, np.asarray(X), mutable=["batch_stats"])
    np.testing.assert_array_equal(y, linen.apply(variables, X, mutable=["batch_stats"])[0])
    foreign = strict.asarray(np.asarray(X))
    message = (r"^x must be a JAX array, a NumPy array or a Python scalar, got "
               r"array_api_strict\._array_object\.Array")
    with pytest.raises(TypeError, match=message):
        linen.apply(variables, foreign, mutable=["batch_stats"])
    nnx_layer = NnxBatchRenorm(3, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=message):
        nnx_layer(foreign)
    assert int(nnx_layer.step[...]) == 0, "a refused call leaves the state alone"


def test_flax_attributes_read_with_flax_meaning_on_both_modules() -> None:
    """``momentum`` is Flax's decay on both modules (the core's alpha is 1 - it); on nnx a
    changed attribute takes effect from the next call, checked then."""
    nnx_layer = NnxBatchRenorm(3, momentum=0.9, epsilon=1e-4, axis=-1, rngs=nnx.Rngs(0))
    linen_layer = BatchRenorm(momentum=0.9, epsilon=1e-4, axis=-1)
    for layer, config in ((nnx_layer, nnx_layer.config), (linen_layer, linen_layer.config())):
        assert (layer.momentum, layer.epsilon, layer.axis) == (0.9, 1e-4, -1)
        assert abs(config.momentum - 0.1) < 1e-15 and config.eps == 1e-4
    x = jnp.asarray(np.random.default_rng(0).normal(2.0, 1.0, (16, 3)), jnp.float32)
    nnx_layer.momentum = 0.5
    nnx_layer(x)
    expected = ref.train_step(np.asarray(x, np.float64), np.zeros(3), np.ones(3), 0,
                              feature_axis=-1, eps=1e-4, momentum=0.5)
    assert np.max(np.abs(np.asarray(nnx_layer.mean[...]) - expected["mean"])) < 1e-5
    nnx_layer.momentum = 1.5
    with pytest.raises(ValueError, match="momentum"):
        nnx_layer(x)
