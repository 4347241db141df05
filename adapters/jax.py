"""Batch Renormalization as pure JAX functions over a ``RenormState`` pytree.

Every function here is safe under ``jax.jit``, ``jax.grad``, ``jax.vmap`` and
``jax.lax.scan``: the configuration is static, the state is a pytree of arrays, and no
Python branch looks at a traced value (the core clips and guards with ``where``).

Gradients come either from the core's backward pass (specification section 4) wired in with
``jax.custom_vjp`` (the default) or from differentiating the forward with
``jax.lax.stop_gradient`` around r, d and the state update; the two agree.

``axis_name`` makes the batch statistics those of the global batch over a named axis
(``shard_map``, ``pmap`` or ``vmap``), so every replica holds the same state.

On ``jax.numpy`` arrays the core runs ``portable_brn.xla_kernel.XlaKernel`` whether or
not this module was imported.
"""

from __future__ import annotations

from collections.abc import Hashable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from portable_brn.config import RenormConfig
from portable_brn.moments import ReplicaMean
from portable_brn.renorm import Residuals, backward, forward_infer, forward_train
from portable_brn.state import RenormState, init_params, init_state
from portable_brn.xla_kernel import XlaKernel

__all__ = ["RenormState", "TrainOutput", "XlaKernel", "as_jax_array", "batch_renorm", "init",
           "renorm_infer", "renorm_train"]


class TrainOutput(NamedTuple):
    """A training step's output, new state and per-feature ``finite`` flags (False
    where the batch statistic was NaN or Inf and the statistics were therefore kept; the
    step counter advances on every training call all the same)."""

    y: jax.Array
    state: RenormState
    finite: jax.Array


class _Sync(NamedTuple):
    """The static, hashable part of a training call: configuration and replica axis."""

    config: RenormConfig
    axis_name: Hashable | None
    axis_index_groups: Any


def init(num_features: int | tuple[int, ...], *, dtype: Any = jnp.float32,
         param_dtype: Any = jnp.float32) -> tuple[RenormState, jax.Array, jax.Array]:
    """Fresh ``(state, weight, bias)``: mean 0, std 1, step 0, weight 1, bias 0 (the
    statistics float32 or wider, as ``init_state`` makes them)."""
    state = init_state(num_features, xp=jnp, dtype=dtype)
    return (state, *init_params(state, dtype=param_dtype))


def _replica_mean(axis_name: Hashable | None, axis_index_groups: Any = None) -> ReplicaMean:
    """The core's cross-replica average: ``pmean`` over ``axis_name``, or None."""
    if axis_name is None:
        return None
    return partial(jax.lax.pmean, axis_name=axis_name, axis_index_groups=axis_index_groups)


def _forward(x: jax.Array, state: RenormState, weight: Any, bias: Any, mask: Any,
             sync: _Sync) -> tuple[jax.Array, RenormState, Residuals]:
    """The core's training forward with JAX's stop-gradient and replica mean."""
    return forward_train(x, state, weight, bias, sync.config,
                         stop_gradient=jax.lax.stop_gradient,
                         replica_mean=_replica_mean(sync.axis_name, sync.axis_index_groups),
                         mask=mask)


def _zero_cotangent(array: jax.Array) -> jax.Array:
    """A zero cotangent for a state array; integer arrays take ``float0``."""
    if jnp.issubdtype(array.dtype, jnp.inexact):
        return jnp.zeros_like(array)
    return np.zeros(array.shape, dtype=jax.dtypes.float0)


def _varying_axes(array: jax.Array) -> frozenset:
    """The ``shard_map`` axes along which ``array`` varies (empty outside one)."""
    axis_type = getattr(jax.typeof(array), "manual_axis_type", None)
    return frozenset(axis_type.varying) if axis_type is not None else frozenset()


def _summed_like(cotangent: jax.Array | None, primal: jax.Array | None) -> jax.Array | None:
    """A parameter's cotangent summed over the ``shard_map`` axes along which it varies
    but the parameter does not: the transpose of the implicit broadcast of a replicated
    parameter, which JAX applies itself when it differentiates the forward."""
    if cotangent is None:
        return None
    extra = _varying_axes(cotangent) - _varying_axes(primal)
    return jax.lax.psum(cotangent, tuple(extra)) if extra else cotangent


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _train_core_vjp(x: jax.Array, state: RenormState, weight: Any, bias: Any, mask: Any,
                    sync: _Sync) -> TrainOutput:
    """Training forward whose gradient is the core's ``backward``."""
    y, new_state, residuals = _forward(x, state, weight, bias, mask, sync)
    return TrainOutput(y, new_state, residuals.finite)


def _train_core_vjp_fwd(x: jax.Array, state: RenormState, weight: Any, bias: Any, mask: Any,
                        sync: _Sync) -> tuple[TrainOutput, tuple]:
    """Forward rule: the primal inputs are the residuals (see the backward rule)."""
    return (_train_core_vjp(x, state, weight, bias, mask, sync),
            (x, state, weight, bias, mask))


def _train_core_vjp_bwd(sync: _Sync, primals: tuple, cotangent: TrainOutput) -> tuple:
    """Backward rule: the core's ``backward`` on the core's own residuals.

    The residuals are rebuilt by running the forward again on the saved inputs, which
    keeps their static parts (layout, replica mean, ...) out of JAX's residuals; under
    ``jit`` XLA merges the repeated forward with the original one.  The state only
    enters through stop-gradient, so its cotangent is zero, as is the boolean mask's.
    """
    x, state, weight, bias, mask = primals
    _, _, residuals = _forward(x, state, weight, bias, mask, sync)
    dx, dweight, dbias = backward(residuals, cotangent.y)
    return (dx, jax.tree.map(_zero_cotangent, state), _summed_like(dweight, weight),
            _summed_like(dbias, bias), jax.tree.map(_zero_cotangent, mask))


_train_core_vjp.defvjp(_train_core_vjp_fwd, _train_core_vjp_bwd)


_JAX_COMPATIBLE = (jax.Array, np.ndarray, np.generic, bool, int, float, complex)


def as_jax_array(value: Any, name: str) -> jax.Array:
    """``value`` as a JAX array: JAX arrays, NumPy arrays, Python scalars and objects that
    convert themselves (``__jax_array__``, e.g. ``nnx`` variables) are taken, as
    everywhere in JAX; another library's array is a ``TypeError`` naming ``name`` (specification
    section 7: arrays of different libraries are not mixed in one call)."""
    if not (isinstance(value, _JAX_COMPATIBLE) or hasattr(value, "__jax_array__")):
        kind = type(value)
        raise TypeError(f"{name} must be a JAX array, a NumPy array or a Python scalar, got "
                        f"{kind.__module__}.{kind.__qualname__}")
    return jnp.asarray(value)


def _check_state(state: RenormState) -> None:
    """The step must be a 0-d integer array (static facts, checked under ``jit`` too).
    Values are checked only where they are known, outside ``jit`` (traced values cannot
    be looked at; under ``jit`` a bad value gives whatever the arithmetic gives): finite
    statistics, a positive std, a non-negative step."""
    step = state.step
    if not jnp.issubdtype(step.dtype, jnp.integer):
        raise TypeError(f"state.step must be an integer array, got {step.dtype}")
    if step.shape != ():
        raise ValueError(f"state.step must be 0-d, got shape {step.shape}")
    if any(isinstance(a, jax.core.Tracer) or not a.is_fully_addressable for a in state):
        return
    mean, std = np.asarray(state.mean), np.asarray(state.std)  # host copies: no traced op
    if not np.all(np.isfinite(mean)):
        raise ValueError("state.mean holds NaN or Inf")
    if not np.all(np.isfinite(std) & (std > 0)):
        raise ValueError("state.std must be positive and finite")
    if int(step) < 0:
        raise ValueError(f"state.step must be non-negative, got {int(step)}")


def _as_jax(x: Any, state: Any, weight: Any, bias: Any) -> tuple:
    """The call's arrays as JAX arrays (see ``as_jax_array``); ``None`` stays ``None``;
    the state checked (see ``_check_state``)."""

    def convert(array: Any, name: str) -> jax.Array | None:
        return None if array is None else as_jax_array(array, name)

    fields = RenormState(*state)._asdict()
    state = RenormState(**{k: convert(v, f"state.{k}") for k, v in fields.items()})
    _check_state(state)
    return convert(x, "x"), state, convert(weight, "weight"), convert(bias, "bias")


def renorm_train(x: jax.Array, state: RenormState, weight: jax.Array | None,
                 bias: jax.Array | None, config: RenormConfig, *,
                 axis_name: Hashable | None = None, axis_index_groups: Any = None,
                 use_custom_vjp: bool = True, mask: jax.Array | None = None) -> TrainOutput:
    """One training step (Algorithm 1): output, new state and ``finite`` flags.

    ``mask`` (boolean, broadcastable to ``x``, True where an element counts) restricts
    the batch statistics to the counted elements, as ``flax.linen.BatchNorm``'s.

    ``use_custom_vjp=True`` differentiates with the core's backward pass (the faster
    under ``jit``); ``False`` lets JAX differentiate the forward.  ``axis_name`` (and
    ``axis_index_groups``) average the batch statistics over that named axis.  Inside
    ``shard_map`` the gradient of a replicated weight or bias is summed over the axis,
    as JAX does for its own operations.  Under ``vmap(axis_name=...)`` take the gradient
    of the custom VJP inside the ``vmap``: JAX runs a backward rule traced from outside
    it without the axis.
    """
    x, state, weight, bias = _as_jax(x, state, weight, bias)
    mask = None if mask is None else as_jax_array(mask, "mask")
    sync = _Sync(config, axis_name, axis_index_groups)
    if use_custom_vjp:
        return _train_core_vjp(x, state, weight, bias, mask, sync)
    y, new_state, residuals = _forward(x, state, weight, bias, mask, sync)
    return TrainOutput(y, new_state, residuals.finite)


def renorm_infer(x: jax.Array, state: RenormState, weight: jax.Array | None,
                 bias: jax.Array | None, config: RenormConfig, *,
                 mask: jax.Array | None = None) -> jax.Array:
    """Inference: ``weight * (x - mean) / std + bias`` with the moving statistics
    (``mask`` is checked, and unused: no statistic is computed)."""
    mask = None if mask is None else as_jax_array(mask, "mask")
    return forward_infer(*_as_jax(x, state, weight, bias), config, mask=mask)


def batch_renorm(x: jax.Array, state: RenormState, weight: jax.Array | None,
                 bias: jax.Array | None, config: RenormConfig, *, training: bool,
                 axis_name: Hashable | None = None, axis_index_groups: Any = None,
                 use_custom_vjp: bool = True,
                 mask: jax.Array | None = None) -> tuple[jax.Array, RenormState]:
    """``(y, new_state)``: a training step when ``training``, else inference with the
    state returned unchanged.  ``training`` is a Python bool (static under ``jit``)."""
    if not training:
        return renorm_infer(x, state, weight, bias, config, mask=mask), state
    y, new_state, _ = renorm_train(x, state, weight, bias, config, axis_name=axis_name,
                                   axis_index_groups=axis_index_groups,
                                   use_custom_vjp=use_custom_vjp, mask=mask)
    return y, new_state
