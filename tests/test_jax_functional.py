"""The functional JAX API: transforms, gradients, replicas, low precision, bad input.

Numerical agreement with the float64 reference over many steps is in
``test_jax_conformance.py``; here each test checks one property of the wiring.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from portable_brn import RenormConfig, RenormState, backward, forward_train
from portable_brn.conformance import reference as ref

from conftest import rel_err

# A missing framework skips this file with the reason; the imports that need it follow.
jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

from portable_brn.adapters.jax import batch_renorm, init, renorm_infer, renorm_train  # noqa: E402

CONFIGS = {
    "plain": RenormConfig(feature_axis=-1, r_max=1.5, d_max=0.5),
    "nchw-microbatch": RenormConfig(feature_axis=1, r_max=1.2, d_max=0.2, micro_batch=2),
    "output-clip": RenormConfig(feature_axis=-1, r_max=1.5, d_max=0.5, output_clip=(-1.0, 1.0)),
}


def _setup(shape: tuple[int, ...], config: RenormConfig, seed: int = 0) -> tuple:
    """Input, cotangent, a state away from (0, 1) and non-trivial parameters."""
    keys = jax.random.split(jax.random.key(seed), 5)
    x = 2.0 * jax.random.normal(keys[0], shape) + 0.5
    c = jax.random.normal(keys[1], shape)
    features = shape[config.feature_axis]
    state, weight, bias = init(features)
    state = state._replace(mean=0.3 * jax.random.normal(keys[2], (features,)),
                           std=jnp.exp(0.3 * jax.random.normal(keys[3], (features,))))
    weight = weight + 0.2 * jax.random.normal(keys[4], (features,))
    return x, c, state, weight, bias + 0.1


def _loss(config: RenormConfig, use_custom_vjp: bool, **kwargs: Any):
    """sum(y * c) + sum(y**2) / 2, so the cotangent of y depends on y, and the state."""

    def loss(x, weight, bias, state, c):
        y, new_state = batch_renorm(x, state, weight, bias, config, training=True,
                                    use_custom_vjp=use_custom_vjp, **kwargs)
        return jnp.sum(y * c) + 0.5 * jnp.sum(y * y), new_state

    return loss


def _close(a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_custom_vjp_autodiff_and_core_backward_agree(name: str) -> None:
    config = CONFIGS[name]
    x, c, state, weight, bias = _setup((8, 3, 5) if config.feature_axis == 1 else (8, 5, 3),
                                       config)
    grads = {}
    for use_custom_vjp in (True, False):
        grad = jax.jit(jax.grad(_loss(config, use_custom_vjp), argnums=(0, 1, 2, 3),
                                has_aux=True, allow_int=True))
        grads[use_custom_vjp], _ = grad(x, weight, bias, state, c)
    y, _, residuals = forward_train(x, state, weight, bias, config)
    core = backward(residuals, c + y)
    _close(grads[True][:3], core)
    _close(grads[False][:3], core)
    for use_custom_vjp in (True, False):  # the state enters through stop_gradient only
        state_grad = grads[use_custom_vjp][3]
        assert not np.any(state_grad.mean) and not np.any(state_grad.std)


def test_jit_matches_eager_and_inference_keeps_the_state() -> None:
    config = CONFIGS["plain"]
    x, _, state, weight, bias = _setup((6, 4, 3), config)
    eager = batch_renorm(x, state, weight, bias, config, training=True)
    jitted = jax.jit(batch_renorm, static_argnames=("config", "training"))(
        x, state, weight, bias, config=config, training=True)
    _close(eager, jitted)
    assert int(jitted[1].step) == 1
    y, same = batch_renorm(x, state, weight, bias, config, training=False)
    assert same is state
    expected = ref.infer(x, state.mean, state.std, weight, bias, feature_axis=-1)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_training_output_equals_inference_when_no_clip_binds() -> None:
    """The paper's central property, through the adapter."""
    config = RenormConfig(feature_axis=-1, r_max=100.0, d_max=100.0)
    x, _, state, weight, bias = _setup((16, 3), config)
    y_train, _ = batch_renorm(x, state, weight, bias, config, training=True)
    y_infer = renorm_infer(x, state, weight, bias, config)
    np.testing.assert_allclose(y_train, y_infer, rtol=1e-4, atol=1e-5)


def test_scan_over_steps_matches_a_python_loop() -> None:
    config = CONFIGS["nchw-microbatch"]
    xs = jax.random.normal(jax.random.key(1), (7, 4, 3, 5)) * 1.5 + 0.2
    _, _, state, weight, bias = _setup((4, 3, 5), config)

    def body(carry: RenormState, x: jax.Array) -> tuple[RenormState, jax.Array]:
        y, carry = batch_renorm(x, carry, weight, bias, config, training=True)
        return carry, y

    final, ys = jax.jit(lambda s: jax.lax.scan(body, s, xs))(state)
    step = jax.jit(body)
    for t in range(xs.shape[0]):
        state, y = step(state, xs[t])
        _close(ys[t], y)
    _close(final, state)
    assert int(final.step) == xs.shape[0]


@pytest.mark.parametrize("use_custom_vjp", [True, False], ids=["custom-vjp", "autodiff"])
def test_vmap_over_independent_layers(use_custom_vjp: bool) -> None:
    """A stack of layers (each its own input, state and parameters) under vmap."""
    config = CONFIGS["plain"]
    layers = [_setup((6, 3), config, seed) for seed in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    grad = jax.grad(_loss(config, use_custom_vjp), argnums=(0, 1, 2), has_aux=True)
    x, c, state, weight, bias = stacked
    grads, states = jax.jit(jax.vmap(grad))(x, weight, bias, state, c)
    for i, (x, c, state, weight, bias) in enumerate(layers):
        one, one_state = jax.jit(grad)(x, weight, bias, state, c)
        _close(jax.tree.map(lambda a, i=i: a[i], (grads, states)), (one, one_state))


@pytest.mark.parametrize("use_custom_vjp", [True, False], ids=["custom-vjp", "autodiff"])
def test_vmap_axis_name_matches_the_concatenated_batch(use_custom_vjp: bool) -> None:
    """Four replicas under ``vmap(axis_name=...)``, each differentiating its own loss as in
    data-parallel training, equal one call on the whole batch: the same dx, the same new
    state on every replica, and parameter gradients that sum to the whole batch's.

    (JAX traces a custom VJP's backward rule outside an enclosing ``vmap``'s axis, so
    with ``use_custom_vjp=True`` the gradient is taken inside the ``vmap``.)
    """
    config = CONFIGS["output-clip"]
    x, c, state, weight, bias = _setup((16, 2, 3), config)
    grad = jax.grad(_loss(config, use_custom_vjp, axis_name="replica"), argnums=(0, 1, 2),
                    has_aux=True)
    per_replica = jax.vmap(grad, in_axes=(0, None, None, None, 0), axis_name="replica")
    (dx, dweight, dbias), states = jax.jit(per_replica)(
        x.reshape(4, 4, 2, 3), weight, bias, state, c.reshape(4, 4, 2, 3))
    whole, whole_state = jax.jit(jax.grad(_loss(config, use_custom_vjp), argnums=(0, 1, 2),
                                          has_aux=True))(x, weight, bias, state, c)
    _close((dx.reshape(x.shape), dweight.sum(0), dbias.sum(0)), whole)
    _close(states, jax.tree.map(lambda a: jnp.stack([a] * 4), whole_state))


def test_bfloat16_input_keeps_float32_statistics() -> None:
    config = CONFIGS["plain"]
    x, c, state, weight, bias = _setup((32, 4, 3), config)
    x16 = x.astype(jnp.bfloat16)
    y, new_state, _ = jax.jit(renorm_train, static_argnames="config")(
        x16, state, weight, bias, config=config)
    assert y.dtype == jnp.bfloat16
    assert new_state.mean.dtype == new_state.std.dtype == jnp.float32
    grad = jax.jit(jax.grad(_loss(config, True), argnums=(0, 1, 2), has_aux=True))
    (dx, dweight, dbias), _ = grad(x16, weight, bias, state, c.astype(jnp.bfloat16))
    assert dx.dtype == jnp.bfloat16 and dweight.dtype == dbias.dtype == jnp.float32
    expected = ref.train_step(np.asarray(x16, np.float64), state.mean, state.std, 0, weight, bias,
                              feature_axis=-1, r_max=1.5, d_max=0.5)
    for actual, wanted in ((y, expected["y"]), (new_state.mean, expected["mean"]),
                           (new_state.std, expected["std"])):
        assert rel_err(np.asarray(actual, np.float64), wanted) <= 1e-2


@pytest.mark.parametrize("use_custom_vjp", [True, False], ids=["custom-vjp", "autodiff"])
def test_nonfinite_batch_leaves_the_state_finite(use_custom_vjp: bool) -> None:
    config = CONFIGS["plain"]
    x, _, state, weight, bias = _setup((8, 3), config)
    x = x.at[2, 1].set(jnp.nan).at[5, 2].set(jnp.inf)
    step = jax.jit(renorm_train, static_argnames=("config", "use_custom_vjp"))
    _, new_state, finite = step(x, state, weight, bias, config=config,
                                use_custom_vjp=use_custom_vjp)
    np.testing.assert_array_equal(finite, [True, False, False])
    assert np.all(np.isfinite(new_state.mean)) and np.all(np.isfinite(new_state.std))
    np.testing.assert_array_equal(new_state.mean[1:], state.mean[1:])
    assert new_state.mean[0] != state.mean[0] and int(new_state.step) == 1


def _bad_calls() -> dict[str, tuple[Any, type, str]]:
    """Each bad call, its error and a regex anchored at the message's start."""
    config = RenormConfig(feature_axis=-1)
    state, weight, bias = init(3)
    x = jnp.ones((4, 3))
    return {
        "integer x": ((x.astype(jnp.int32), state, weight, bias, config), TypeError,
                      r"^x must have a real floating dtype \(.*\), got int32"),
        "1-d x": ((jnp.ones(3), state, weight, bias, config), ValueError,
                  r"^x must have at least 2 dimensions .*, got shape \(3,\)"),
        "weight size": ((x, state, jnp.ones(4), bias, config), ValueError,
                        r"^weight has shape \(4,\) but x has \(3,\) features"),
        "state size": ((x, init(4)[0], weight, bias, config), ValueError,
                       r"^state\.mean has shape \(4,\) but x has \(3,\) features"),
        "axis out of range": ((x, state, weight, bias, RenormConfig(feature_axis=2)),
                              ValueError, r"^feature_axis 2 is out of range for an input "
                                          r"with 2 dimensions"),
        "one value per feature": ((jnp.ones((1, 3)), state, weight, bias, config),
                                  ValueError, r"^Expected more than 1 value per feature when "
                                              r"training, got x of shape \(1, 3\)"),
        "micro_batch": ((x, state, weight, bias, RenormConfig(feature_axis=-1, micro_batch=3)),
                        ValueError, r"^micro_batch=3 does not divide the batch size 4 of x"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_input_fails_at_trace_time_naming_the_argument(case: str) -> None:
    args, error, text = _bad_calls()[case]
    step = jax.jit(lambda x, s, w, b: renorm_train(x, s, w, b, args[-1])[0])
    with pytest.raises(error, match=text):
        step(*args[:-1])


def _foreign(library: str) -> tuple[Any, str]:
    """A (4, 3) float32 array of ``library`` and its type as the error names it."""
    if library == "torch":
        torch = pytest.importorskip("torch")
        return torch.ones((4, 3)), "torch.Tensor"
    strict = pytest.importorskip("array_api_strict")
    return strict.ones((4, 3)), "array_api_strict._array_object.Array"


@pytest.mark.parametrize("library", ["torch", "array_api_strict"])
@pytest.mark.parametrize("argument", ["x", "weight", "state.mean"])
def test_arrays_of_another_library_are_refused_naming_the_argument(library: str,
                                                                    argument: str) -> None:
    foreign, kind = _foreign(library)
    state, weight, bias = init(3)
    x = jnp.ones((4, 3))
    if argument == "x":
        x = foreign
    elif argument == "weight":
        weight = foreign[0, ...]
    else:
        state = state._replace(mean=foreign[0, ...])
    message = (f"^{re.escape(argument)} must be a JAX array, a NumPy array or a Python "
               f"scalar, got {re.escape(kind)}")
    config = RenormConfig(feature_axis=-1)
    with pytest.raises(TypeError, match=message):
        renorm_train(x, state, weight, bias, config)
    with pytest.raises(TypeError, match=message):
        renorm_infer(x, state, weight, bias, config)


def test_numpy_arrays_and_python_scalars_are_accepted() -> None:
    config = RenormConfig(feature_axis=-1)
    state, weight, bias = init(3)
    x = np.arange(12.0, dtype=np.float32).reshape(4, 3)
    y, new_state, _ = renorm_train(x, state._replace(step=0), np.asarray(weight),
                                   np.asarray(bias), config)
    expected = renorm_train(jnp.asarray(x), state, weight, bias, config)
    np.testing.assert_array_equal(y, expected.y)
    np.testing.assert_array_equal(new_state.std, expected.state.std)
    assert isinstance(y, jax.Array) and int(new_state.step) == 1


def test_objects_that_convert_themselves_to_jax_are_accepted() -> None:
    """Anything with ``__jax_array__`` (nnx variables, for one) is taken as JAX takes it."""

    class Wrapped:
        def __init__(self, value: jax.Array) -> None:
            self.value = value

        def __jax_array__(self) -> jax.Array:
            return self.value

    config = RenormConfig(feature_axis=-1)
    state, weight, bias = init(3)
    x = jnp.arange(12.0, dtype=jnp.float32).reshape(4, 3)
    y = renorm_train(Wrapped(x), state, Wrapped(weight), bias, config).y
    np.testing.assert_array_equal(y, renorm_train(x, state, weight, bias, config).y)
