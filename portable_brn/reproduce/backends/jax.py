"""The JAX backend: ``portable_brn.adapters.flax.BatchRenorm`` in a ``flax.linen``
network, gradients from ``jax.grad``, updates from ``optax.sgd``, each step under
``jax.jit``.

Flax states the moving-average rate as a decay (``momentum=0.99`` is alpha 0.01) and
names ``eps`` ``epsilon``; ``portable_brn.conventions.flax_options`` translates.  The
moving statistics live in the ``batch_stats`` collection.  jax, flax and optax are
imported when a network is built, never when this module is.
"""

from __future__ import annotations

from functools import cache
from typing import Any, NamedTuple

import numpy as np

from portable_brn.config import RenormConfig
from portable_brn.conventions import flax_options
from portable_brn.host import to_host

from . import NetworkSpec

__all__ = ["JaxNetwork", "build"]


def _mlp(widths: tuple[int, ...], norm: dict[str, Any], use_running_average: bool) -> Any:
    """The network as a ``flax.linen`` module, in training or inference mode."""
    import flax.linen as nn

    from portable_brn.adapters.flax import BatchRenorm

    options = flax_options(RenormConfig(feature_axis=-1, **norm))

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            for index, width in enumerate(widths[:-1]):
                x = nn.Dense(width, use_bias=False, name=f"dense_{index}")(x)
                x = BatchRenorm(use_running_average=use_running_average, **options)(x)
                x = nn.relu(x)
            return nn.Dense(widths[-1], name=f"dense_{len(widths) - 1}")(x)

    return MLP()


class _Programs(NamedTuple):
    """What networks of one architecture and configuration share."""

    infer_model: Any
    optimizer: Any
    step: Any
    predict: Any


@cache
def _programs(widths: tuple[int, ...], norm: tuple[tuple[str, Any], ...],
              learning_rate: float, sgd_momentum: float) -> _Programs:
    """The models, optimizer, jitted step and prediction for one architecture and
    configuration, built once per process: every network with them (each regime, each
    run) reuses the compiled code instead of compiling fresh closures."""
    import jax
    import jax.numpy as jnp
    import optax

    train_model, infer_model = _mlp(widths, dict(norm), False), _mlp(widths, dict(norm), True)
    optimizer = optax.sgd(learning_rate, momentum=sgd_momentum)

    def loss(params: Any, batch_stats: Any, x: Any, y: Any) -> tuple[Any, Any]:
        logits, updated = train_model.apply({"params": params, "batch_stats": batch_stats},
                                            x, mutable=["batch_stats"])
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return cross_entropy.mean(), updated["batch_stats"]

    def step(params: Any, batch_stats: Any, opt_state: Any, x: Any,
             y: Any) -> tuple[Any, Any, Any]:
        grads, batch_stats = jax.grad(loss, has_aux=True)(params, batch_stats, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state

    def predict(params: Any, batch_stats: Any, x: Any) -> Any:
        logits = infer_model.apply({"params": params, "batch_stats": batch_stats}, x)
        return jnp.argmax(logits, axis=1)

    return _Programs(infer_model, optimizer, jax.jit(step), jax.jit(predict))


class JaxNetwork:
    """Parameters, moving statistics and optimizer state, advanced by a jitted step."""

    def __init__(self, spec: NetworkSpec):
        import jax
        import jax.numpy as jnp

        programs = _programs(tuple(weight.shape[1] for weight in spec.weights),
                             tuple(sorted(spec.norm.items())), spec.learning_rate,
                             spec.sgd_momentum)
        sample = jnp.zeros((1, spec.weights[0].shape[0]), dtype=jnp.float32)
        variables = programs.infer_model.init(jax.random.key(0), sample)
        last = len(spec.weights) - 1
        self.params = {**variables["params"],
                       **{f"dense_{index}": {"kernel": jnp.asarray(weight)}
                          for index, weight in enumerate(spec.weights)}}
        self.params[f"dense_{last}"]["bias"] = jnp.asarray(spec.output_bias)
        self.batch_stats = variables["batch_stats"]
        self.opt_state = programs.optimizer.init(self.params)
        self._step, self._predict = programs.step, programs.predict

    def sgd_step(self, x: np.ndarray, y: np.ndarray) -> None:
        """One jitted SGD step, normalization in training mode."""
        self.params, self.batch_stats, self.opt_state = self._step(
            self.params, self.batch_stats, self.opt_state, x, y)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Labels from the network with ``use_running_average=True``."""
        return to_host(self._predict(self.params, self.batch_stats, x))


def build(spec: NetworkSpec) -> JaxNetwork:
    """A fresh JAX network from ``spec``."""
    return JaxNetwork(spec)
