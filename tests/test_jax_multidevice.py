"""``axis_name`` on four devices equals one device running the concatenated batch.

JAX fixes its device count when it starts, so the check runs this file as a script in
a subprocess with ``--xla_force_host_platform_device_count=4``.  It uses
``jax.shard_map`` over a 4-device mesh, both as one global function differentiated
from outside and in the data-parallel style where every device differentiates its own
loss, for the core's backward (custom VJP) and for JAX autodiff of the forward; and
``jax.pmap`` with ``axis_index_groups`` against one device per group.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from typing import Any

import numpy as np
import pytest

from portable_brn import RenormConfig

# A missing framework skips this file with the reason; the imports that need it follow.
jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from portable_brn.adapters.jax import init, renorm_train  # noqa: E402

DEVICES = 4
CONFIGS = (RenormConfig(feature_axis=-1, r_max=1.5, d_max=0.5),
           RenormConfig(feature_axis=-1, r_max=1.5, d_max=0.5, micro_batch=2),
           RenormConfig(feature_axis=1, r_max=1.2, d_max=0.3, output_clip=(-1.0, 1.0),
                        warmup_steps=1))


def _loss(x, state, weight, bias, c, config, use_custom_vjp, axis_name=None, groups=None):
    """sum(y * c) + sum(y**2) / 2 with the new state and y as auxiliary outputs."""
    y, new_state, _ = renorm_train(x, state, weight, bias, config, axis_name=axis_name,
                                   axis_index_groups=groups, use_custom_vjp=use_custom_vjp)
    return jnp.sum(y * c) + 0.5 * jnp.sum(y * y), (y, new_state)


def _global(mesh, x, state, weight, bias, c, config, use_custom_vjp):
    """One function of the whole batch whose forward runs sharded; grad from outside."""

    def forward(x, state, weight, bias):
        def body(x, state, weight, bias):
            y, new_state, _ = renorm_train(x, state, weight, bias, config, axis_name="data",
                                           use_custom_vjp=use_custom_vjp)
            return y, new_state

        return jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P(), P(), P()),
                             out_specs=(P("data"), P()))(x, state, weight, bias)

    def loss(x, weight, bias):
        y, new_state = forward(x, state, weight, bias)
        return jnp.sum(y * c) + 0.5 * jnp.sum(y * y), (y, new_state)

    (_, (y, new_state)), grads = jax.jit(jax.value_and_grad(
        loss, argnums=(0, 1, 2), has_aux=True))(x, weight, bias)
    return y, new_state, grads


def _data_parallel(mesh, x, state, weight, bias, c, config, use_custom_vjp):
    """Each device differentiates its own loss; every device's new state is returned."""

    def body(x, state, weight, bias, c):
        grad = jax.grad(_loss, argnums=(0, 2, 3), has_aux=True)
        grads, (y, new_state) = grad(x, state, weight, bias, c, config, use_custom_vjp, "data")
        return y, jax.tree.map(lambda a: a[None], new_state), grads

    step = jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P(), P(), P(), P("data")),
                         out_specs=(P("data"), P("data"), (P("data"), P(), P())))
    y, states, grads = jax.jit(step)(x, state, weight, bias, c)
    return y, states, grads


def _close(actual: Any, expected: Any) -> None:
    jax.tree.map(partial(np.testing.assert_allclose, rtol=2e-5, atol=2e-5), actual, expected)


def _check_index_groups(x, state, weight, bias, c, config) -> None:
    """``pmap`` with ``axis_index_groups``: each pair of devices is one batch."""
    groups = ((0, 1), (2, 3))
    grad = jax.grad(_loss, argnums=(0, 2, 3), has_aux=True)
    for use_custom_vjp in (True, False):
        step = jax.pmap(lambda x, c, u=use_custom_vjp: grad(
            x, state, weight, bias, c, config, u, "data", groups), axis_name="data")
        (dx, dweight, dbias), (y, new_state) = step(x.reshape(4, -1, *x.shape[1:]),
                                                    c.reshape(4, -1, *c.shape[1:]))
        for group, members in enumerate(map(np.array, groups)):
            rows = slice(group * x.shape[0] // 2, (group + 1) * x.shape[0] // 2)
            (dx1, dweight1, dbias1), (y1, state1) = grad(x[rows], state, weight, bias,
                                                         c[rows], config, use_custom_vjp)
            _close((y[members].reshape(y1.shape), dx[members].reshape(dx1.shape)), (y1, dx1))
            _close((dweight[members].sum(0), dbias[members].sum(0)), (dweight1, dbias1))
            _close(jax.tree.map(lambda a, m=members: a[m[0]], new_state), state1)


def check_on_devices() -> None:
    """Every configuration, both gradient paths, both styles, against one device."""
    assert len(jax.devices()) == DEVICES, jax.devices()
    mesh = jax.make_mesh((DEVICES,), ("data",))
    shard = NamedSharding(mesh, P("data"))
    for config in CONFIGS:
        keys = jax.random.split(jax.random.key(0), 2)
        shape = (16, 3, 5) if config.feature_axis == 1 else (16, 5, 3)
        x = 1.7 * jax.random.normal(keys[0], shape) + 0.4
        c = jax.random.normal(keys[1], shape)
        state, weight, bias = init(shape[config.feature_axis])
        state = state._replace(mean=jnp.full(state.mean.shape, 0.3),
                               std=jnp.full(state.std.shape, 1.4))
        weight, bias = 1.2 * weight, bias - 0.1
        xs, cs = jax.device_put(x, shard), jax.device_put(c, shard)
        for use_custom_vjp in (True, False):
            grad = jax.grad(_loss, argnums=(0, 2, 3), has_aux=True)
            grads, (y, new_state) = grad(x, state, weight, bias, c, config, use_custom_vjp)
            _close(_global(mesh, xs, state, weight, bias, cs, config, use_custom_vjp),
                   (y, new_state, grads))
            y_dp, states, grads_dp = _data_parallel(mesh, xs, state, weight, bias, cs, config,
                                                    use_custom_vjp)
            _close((y_dp, grads_dp), (y, grads))
            _close(states, jax.tree.map(lambda a: jnp.stack([a] * DEVICES), new_state))
            assert np.all(np.asarray(states.mean) == np.asarray(states.mean)[0])
        _check_index_groups(x, state, weight, bias, c, config)


def test_four_devices_match_one_device_on_the_whole_batch() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={DEVICES}"}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]


if __name__ == "__main__":
    check_on_devices()
