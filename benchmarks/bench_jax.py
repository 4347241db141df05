"""Time portable_brn's Flax layer against flax.linen.BatchNorm and Keras 3's renorm.

Every contender is jitted, compiled and warmed up first, then the contenders run in
interleaved rounds on the same input (alternating order, so drifting machine load
hits all alike) and each one's median over the rounds is reported, with the ratios
ours / flax and ours / keras.  A training step is forward plus backward of
``sum(y * c)`` for a fixed random ``c`` (a jit argument, so nothing is folded) with
respect to the input and the parameters, returning the new statistics too; inference
is the forward with the moving statistics.

Run: ``python benchmarks/bench_jax.py [--rounds N] [--budget SECONDS]``.  Keras runs on
its JAX backend (KERAS_BACKEND=jax) through ``stateless_call``; without Keras its
column says skipped.  "ours" is ``portable_brn.adapters.flax.BatchRenorm`` with its
default gradient (the core's backward as a custom VJP); "autodiff ms" is the same
layer with ``use_custom_vjp=False`` (JAX differentiating the forward).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

os.environ["KERAS_BACKEND"] = "jax"  # before Keras is imported: time it on JAX

import flax.linen as nn
import jax
import jax.numpy as jnp

from portable_brn.adapters.flax import BatchRenorm

SHAPES = ((32, 56, 56, 64), (1024, 512))
Step = tuple[Callable[..., Any], tuple]


def _flax_like(module: nn.Module, x: jax.Array, c: jax.Array, training: bool) -> Step:
    """A jitted step of a linen module that keeps its statistics in ``batch_stats``."""
    variables = jax.jit(partial(module.init, use_running_average=False))(jax.random.key(0), x)
    if not training:
        return (jax.jit(lambda v, x: module.apply(v, x, use_running_average=True)),
                (variables, x))

    def loss(params: Any, x: jax.Array, stats: Any, c: jax.Array) -> tuple:
        y, updates = module.apply({"params": params, "batch_stats": stats}, x,
                                  use_running_average=False, mutable=["batch_stats"])
        return jnp.sum(y * c), updates["batch_stats"]

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    return jax.jit(grad), (variables["params"], x, variables["batch_stats"], c)


def _import_keras() -> Any:
    """The keras module, or None when it is not installed."""
    try:
        import keras
    except ImportError:
        return None
    return keras


def _keras(keras: Any, x: jax.Array, c: jax.Array, training: bool) -> Step:
    """Keras 3 ``BatchNormalization(renorm=True)`` through ``stateless_call``."""
    layer = keras.layers.BatchNormalization(renorm=True)
    layer.build(x.shape)
    trainable = [v.value for v in layer.trainable_variables]
    frozen = [v.value for v in layer.non_trainable_variables]
    if not training:
        return (jax.jit(lambda t, f, x: layer.stateless_call(t, f, x, training=False)[0]),
                (trainable, frozen, x))

    def loss(trainable: list, x: jax.Array, frozen: list, c: jax.Array) -> tuple:
        y, new_frozen = layer.stateless_call(trainable, frozen, x, training=True)
        return jnp.sum(y * c), new_frozen

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    return jax.jit(grad), (trainable, x, frozen, c)


def _timed(function: Callable[..., Any], args: tuple) -> float:
    """Seconds for one call, waiting for the result."""
    start = time.perf_counter()
    jax.block_until_ready(function(*args))
    return time.perf_counter() - start


def _median_ms(steps: dict[str, Step], rounds: int, budget_s: float) -> dict[str, float]:
    """Median milliseconds of each step over interleaved rounds, after compiling and two
    warm-up calls: at least ``rounds`` rounds, more while they fit in ``budget_s``."""
    for function, args in steps.values():
        for _ in range(2):
            jax.block_until_ready(function(*args))
    one_round = sum(_timed(*step) for step in steps.values())
    rounds = max(rounds, min(2000, int(budget_s / one_round)))
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            times[name].append(_timed(*steps[name]))
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _case(shape: tuple[int, ...], training: bool, keras: Any, rounds: int,
          budget_s: float) -> dict[str, float]:
    """Median times for one shape and mode: flax, keras (unless None), ours both ways."""
    keys = jax.random.split(jax.random.key(42))
    x = 1.5 * jax.random.normal(keys[0], shape) + 0.5
    c = jax.random.normal(keys[1], shape)
    steps = {
        "flax": _flax_like(nn.BatchNorm(epsilon=1e-3), x, c, training),
        "ours": _flax_like(BatchRenorm(), x, c, training),
    }
    if training:
        steps["ours-autodiff"] = _flax_like(BatchRenorm(use_custom_vjp=False), x, c, training)
    if keras is not None:
        steps["keras"] = _keras(keras, x, c, training)
    return _median_ms(steps, rounds, budget_s)


def _row(cells: list[str]) -> str:
    """One line of the table: the case name, then right-aligned columns."""
    return " | ".join([f"{cells[0]:<20}", *(f"{cell:>10}" for cell in cells[1:])])


def _cells(name: str, ms: dict[str, float]) -> list[str]:
    """The table's cells for one case; Keras' are "skipped" without Keras."""
    keras = ms.get("keras")
    return [name, f"{ms['flax']:.3f}", "skipped" if keras is None else f"{keras:.3f}",
            f"{ms['ours']:.3f}", f"{ms['ours'] / ms['flax']:.2f}",
            "-" if keras is None else f"{ms['ours'] / keras:.2f}",
            f"{ms['ours-autodiff']:.3f}" if "ours-autodiff" in ms else "-"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60, help="least timed rounds per case")
    parser.add_argument("--budget", type=float, default=4.0,
                        help="seconds of timed rounds per case, when more than --rounds fit")
    options = parser.parse_args()
    keras = _import_keras()
    if keras is None:
        print("keras-renorm: skipped: keras not installed")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}: median over interleaved "
          f"rounds (at least {options.rounds}, about {options.budget:g} s per case)")
    print(_row(["case", "flax ms", "keras ms", "ours ms", "ours/flax", "ours/keras",
                "autodiff ms"]))
    for training in (True, False):
        for shape in SHAPES:
            ms = _case(shape, training, keras, options.rounds, options.budget)
            name = f"{'train' if training else 'infer'} {'x'.join(map(str, shape))}"
            print(_row(_cells(name, ms)), flush=True)


if __name__ == "__main__":
    main()
