"""``flax.linen.BatchNorm`` checkpoints into ``BatchRenorm`` and back.

The same small linen model (with a nested block) is built twice, once with
``flax.linen.BatchNorm`` and once with ``BatchRenorm``; converted variables give the other
model the same inference outputs, held to ``flax.linen.BatchNorm`` itself.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from portable_brn.adapters.flax import (
    BatchRenorm,
    from_batchnorm_variables,
    to_batchnorm_variables,
)

from conftest import rel_err

EPS = 1e-3


class _Block(nn.Module):
    norm: type

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(6)(x)
        return nn.relu(self.norm(use_running_average=not train, epsilon=EPS, momentum=0.8)(x))


class _Net(nn.Module):
    """Dense, norm, a nested block with its own norm, a second norm, dense head."""

    norm: type

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.norm(use_running_average=not train, epsilon=EPS, momentum=0.8)(nn.Dense(8)(x))
        x = _Block(self.norm)(nn.relu(x), train)
        x = self.norm(use_running_average=not train, epsilon=EPS, momentum=0.8)(x)
        return nn.Dense(2)(x)


def _data(seed: int, n: int = 16) -> jax.Array:
    return 2.0 * jax.random.normal(jax.random.key(seed), (n, 5)) + 1.0


@functools.cache
def _trained(norm: type) -> dict:
    """Variables after a few training applies with non-trivial scale and bias (shared by the
    tests, which never mutate them)."""
    model = _Net(norm)
    variables = model.init(jax.random.key(0), _data(0))
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p + 0.3 * jax.random.normal(jax.random.key(len(str(path))), p.shape),
        variables["params"])
    stats = variables["batch_stats"]
    for seed in range(1, 5):
        _, updates = model.apply({"params": params, "batch_stats": stats}, _data(seed),
                                 train=True, mutable=["batch_stats"])
        stats = updates["batch_stats"]
    return {"params": params, "batch_stats": stats}


def test_batchnorm_checkpoint_into_batchrenorm() -> None:
    bn_variables = _trained(nn.BatchNorm)
    renorm_variables = from_batchnorm_variables(bn_variables, epsilon=EPS)
    assert set(renorm_variables["batch_stats"]) == {"BatchRenorm_0", "BatchRenorm_1", "_Block_0"}
    assert set(renorm_variables["params"]["_Block_0"]) == {"Dense_0", "BatchRenorm_0"}
    x = _data(9)
    expected = _Net(nn.BatchNorm).apply(bn_variables, x)
    actual = _Net(BatchRenorm).apply(renorm_variables, x)
    assert rel_err(np.asarray(actual), np.asarray(expected)) <= 1e-6
    var = np.asarray(bn_variables["batch_stats"]["_Block_0"]["BatchNorm_0"]["var"], np.float64)
    std = renorm_variables["batch_stats"]["_Block_0"]["BatchRenorm_0"]["std"]
    assert rel_err(np.asarray(std), np.sqrt(var + EPS)) <= 1e-7
    assert int(renorm_variables["batch_stats"]["BatchRenorm_0"]["step"]) == 0
    # the renorm model trains on from there
    _, updates = _Net(BatchRenorm).apply(renorm_variables, x, train=True, mutable=["batch_stats"])
    assert int(updates["batch_stats"]["BatchRenorm_1"]["step"]) == 1


def test_batchrenorm_checkpoint_into_batchnorm() -> None:
    renorm_variables = _trained(BatchRenorm)
    bn_variables = to_batchnorm_variables(renorm_variables, epsilon=EPS)
    assert set(bn_variables["batch_stats"]["_Block_0"]["BatchNorm_0"]) == {"mean", "var"}
    x = _data(9)
    expected = _Net(BatchRenorm).apply(renorm_variables, x)
    actual = _Net(nn.BatchNorm).apply(bn_variables, x)
    assert rel_err(np.asarray(actual), np.asarray(expected)) <= 1e-6


def test_round_trip_restores_batchnorm_variables() -> None:
    bn_variables = _trained(nn.BatchNorm)
    back = to_batchnorm_variables(from_batchnorm_variables(bn_variables, epsilon=EPS),
                                  epsilon=EPS)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(bn_variables)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(bn_variables),
                    strict=True):
        assert rel_err(np.asarray(a), np.asarray(b)) <= 1e-5


def test_training_apply_on_batchnorm_stats_names_std() -> None:
    bn_variables = _trained(nn.BatchNorm)
    renamed = jax.tree_util.tree_map(lambda a: a, from_batchnorm_variables(bn_variables,
                                                                          epsilon=EPS))
    stale = renamed["batch_stats"]["BatchRenorm_0"]
    renamed["batch_stats"]["BatchRenorm_0"] = {"mean": stale["mean"],
                                               "var": jnp.square(stale["std"])}
    with pytest.raises(ValueError, match="'std'"):
        _Net(BatchRenorm).apply(renamed, _data(3), train=True, mutable=["batch_stats"])


def test_unconverted_batchnorm_variables_point_to_the_converter() -> None:
    """A flax.linen.BatchNorm checkpoint applied as it is names the conversion to use."""
    bn_variables = _trained(nn.BatchNorm)
    renamed = jax.tree_util.tree_map(lambda a: a, dict(bn_variables))
    renamed = {name: {k.replace("BatchNorm", "BatchRenorm"): v for k, v in coll.items()}
               for name, coll in renamed.items()}
    with pytest.raises(ValueError, match="from_batchnorm_variables"):
        _Net(BatchRenorm).apply(renamed, _data(3))


@pytest.mark.parametrize("convert", [from_batchnorm_variables, to_batchnorm_variables])
def test_bad_arguments(convert) -> None:
    with pytest.raises(ValueError, match="epsilon"):
        convert({"batch_stats": {}}, epsilon=0.0)
    with pytest.raises(TypeError, match="epsilon"):
        convert({"batch_stats": {}}, epsilon="1e-3")
    with pytest.raises(TypeError, match="variables"):
        convert([1, 2], epsilon=EPS)
    with pytest.raises(ValueError, match="batch_stats"):
        convert({"params": {}}, epsilon=EPS)
