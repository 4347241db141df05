"""Batch Renormalization as Flax layers: ``flax.linen`` and ``flax.nnx``.

``BatchRenorm`` (linen) and ``NnxBatchRenorm`` (nnx) take the arguments of
``flax.linen.BatchNorm`` and ``flax.nnx.BatchNorm`` with the same meaning, plus the
renormalization options (``r_max``, ``d_max``, ``r_min``, ``warmup_steps``,
``micro_batch``, ``output_clip``).  Conventions kept from Flax:

- ``momentum`` is the decay of the old value (0.99 is the paper's alpha = 0.01);
- ``use_running_average`` at construction or call (``.train()``/``.eval()`` in nnx);
- state in the ``batch_stats`` collection (``nnx.BatchStat``): ``mean``, ``std`` (a
  standard deviation, not a variance) and ``step``; never updated during ``init``;
- ``dtype`` is the output dtype, inferred from the input and parameters when None;
  statistics are float32 or wider whatever the input.

``epsilon`` defaults to 1e-3 (the core's, TF's and Keras' renorm default) rather than
Flax's 1e-5.  Per-feature ``finite`` flags (False where a batch statistic was NaN or
Inf and the statistics were kept; ``step`` advances on every training call all the
same) are sown as ``finite`` into the ``intermediates`` collection
(linen, when it is mutable) or ``nnx.Intermediate`` (nnx, under ``nnx.capture``).
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import FrozenDict, freeze, unfreeze

from portable_brn.config import RenormConfig
from portable_brn.conventions import (
    RENORM_OPTIONS,
    config_from_flax,
    flax_named,
    rate_from_flax_decay,
)
from portable_brn.inputs import check_floating
from portable_brn.layout import make_layout
from portable_brn.schedules import ScheduleLike
from portable_brn.state import RenormState, init_state, zero_step

from .jax import as_jax_array, renorm_infer, renorm_train

__all__ = ["BatchRenorm", "NnxBatchRenorm", "from_batchnorm_variables",
           "to_batchnorm_variables"]

Initializer = Any
Dtype = Any


def _normalize(x: jax.Array, state: RenormState, scale: jax.Array | None,
               bias: jax.Array | None, config: RenormConfig, *, training: bool,
               dtype: Dtype | None, axis_name: Hashable | None, axis_index_groups: Any,
               use_custom_vjp: bool,
               mask: jax.Array | None) -> tuple[jax.Array, RenormState, jax.Array | None]:
    """``(y, new_state, finite)`` with Flax's dtype rule: the output dtype is ``dtype``,
    else the promotion of the input and parameters; the input is widened first when
    that dtype is wider, so no precision is lost on the way."""
    x = as_jax_array(x, "x")
    check_floating(jnp, "x", x)
    out_dtype = dtype if dtype is not None else jnp.result_type(
        x, *(p for p in (scale, bias) if p is not None))
    x = x.astype(jnp.promote_types(x.dtype, out_dtype))
    if not training:
        y = renorm_infer(x, state, scale, bias, config, mask=mask)
        return y.astype(out_dtype), state, None
    y, new_state, finite = renorm_train(x, state, scale, bias, config, axis_name=axis_name,
                                        axis_index_groups=axis_index_groups,
                                        use_custom_vjp=use_custom_vjp, mask=mask)
    return y.astype(out_dtype), new_state, finite


def _keep_latest(_previous: Any, latest: Any) -> Any:
    """Sow reducer: the flags of the latest call replace earlier ones."""
    return latest


def _config_of(layer: Any) -> RenormConfig:
    """The core's configuration from a Flax layer's attributes (``axis``, ``momentum``,
    ``epsilon`` and the renormalization options)."""
    return config_from_flax(axis=layer.axis, momentum=layer.momentum, epsilon=layer.epsilon,
                            **{name: getattr(layer, name) for name in RENORM_OPTIONS})


def _check_stat_names(stats: Any) -> None:
    """``batch_stats`` must hold exactly what ``init`` made: a missing entry would be
    made afresh in a mutable apply, an extra one carried along unused."""
    present, wanted = set(stats), {"mean", "std", "step"}
    if present != wanted:
        raise ValueError(f"batch_stats must hold mean, std and step (as init returns them): "
                         f"missing {sorted(wanted - present)}, unexpected "
                         f"{sorted(present - wanted)}")



class BatchRenorm(nn.Module):
    """``flax.linen`` Batch Renormalization, a drop-in for ``flax.linen.BatchNorm``.

    Attributes follow ``flax.linen.BatchNorm`` (``use_fast_variance`` and
    ``force_float32_reductions`` are not offered: statistics are always exact two-pass
    moments in float32 or wider).  ``r_max``, ``d_max`` and ``r_min`` take a number or a
    schedule from ``portable_brn.schedules``; ``use_custom_vjp`` picks the core's
    backward pass (True) or JAX autodiff of the forward (False).
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 1e-3
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    r_max: ScheduleLike = 3.0
    d_max: ScheduleLike = 5.0
    r_min: ScheduleLike | None = None
    warmup_steps: int = 0
    micro_batch: int | None = None
    output_clip: tuple[float, float] | None = None
    use_custom_vjp: bool = True

    def __post_init__(self) -> None:
        """Check the hyperparameters at construction, not at the first call."""
        self.config()
        super().__post_init__()

    def config(self) -> RenormConfig:
        """The core's configuration for this layer (``momentum`` there is the paper's
        alpha, ``1 - self.momentum``)."""
        return _config_of(self)

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        """Normalize ``x``; in training, update ``batch_stats`` (except during ``init``).
        ``mask`` (boolean, broadcastable to ``x``) as in ``flax.linen.BatchNorm``: only
        the elements where it is True enter the batch statistics."""
        use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                             use_running_average)
        config = self.config()
        if not self.is_initializing():  # the hint first: the general check would preempt it
            if self.has_variable("batch_stats", "var") and not self.has_variable(
                    "batch_stats", "std"):
                raise ValueError(f"{self.name or 'BatchRenorm'}: batch_stats lack 'std' (a "
                                 "flax.linen.BatchNorm checkpoint's mean and var?); convert "
                                 "them with from_batchnorm_variables or initialize the model "
                                 "afresh")
            _check_stat_names(self.variables.get("batch_stats", {}))
        shape = make_layout(x.shape, self.axis, training=False).feature_shape
        fresh = init_state(shape, xp=jnp, dtype=self.param_dtype)
        mean = self.variable("batch_stats", "mean", lambda: fresh.mean)
        std = self.variable("batch_stats", "std", lambda: fresh.std)
        step = self.variable("batch_stats", "step", lambda: fresh.step)
        scale = (self.param("scale", self.scale_init, shape, self.param_dtype)
                 if self.use_scale else None)
        bias = (self.param("bias", self.bias_init, shape, self.param_dtype)
                if self.use_bias else None)
        initializing = self.is_initializing()
        y, new_state, finite = _normalize(
            x, RenormState(mean.value, std.value, step.value), scale, bias, config,
            training=not use_running_average, dtype=self.dtype,
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=self.axis_index_groups, use_custom_vjp=self.use_custom_vjp,
            mask=mask)
        if finite is not None and not initializing:
            mean.value, std.value, step.value = new_state
            self.sow("intermediates", "finite", finite, reduce_fn=_keep_latest)
        return y


# -- flax.linen.BatchNorm checkpoints in and out: stats {mean, var} <-> {mean, std, step}


def _layer_paths(tree: Mapping, keys: frozenset[str], path: tuple[str, ...] = ()) -> list:
    """The paths of the sub-mappings of ``tree`` whose keys are exactly ``keys``."""
    if set(tree) == keys:
        return [path]
    return [found for name, sub in tree.items() if isinstance(sub, Mapping)
            for found in _layer_paths(sub, keys, (*path, name))]


def _convert_variables(variables: Mapping, epsilon: float, from_keys: frozenset[str],
                       convert: Callable[[dict], dict], old: str, new: str) -> Any:
    """``variables`` with every layer whose ``batch_stats`` have ``from_keys`` converted by
    ``convert`` and, in every collection, auto-generated names ``old_i`` renamed ``new_i``."""
    if not isinstance(variables, Mapping):
        raise TypeError(f"variables must be a mapping of collections, got {variables!r}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"epsilon must be a real number, got {epsilon!r}")
    if not 0.0 < epsilon < float("inf"):
        raise ValueError(f"epsilon must be positive and finite, got {epsilon!r}")
    converted = unfreeze(variables)
    paths = _layer_paths(converted.get("batch_stats", {}), from_keys)
    if not paths:
        raise ValueError(f"variables['batch_stats'] hold no layer with statistics "
                         f"{sorted(from_keys)}")
    for path in paths:
        for name, collection in converted.items():
            parent = collection
            for key in path[:-1]:
                parent = parent.get(key, {})
            if path[-1] not in parent:
                continue
            layer = parent.pop(path[-1])
            renamed = re.sub(rf"^{old}_(\d+)$", rf"{new}_\1", path[-1])
            if renamed in parent:
                raise ValueError(f"variables[{name!r}] hold both {path[-1]} and {renamed}")
            parent[renamed] = convert(layer) if name == "batch_stats" else layer
    return freeze(converted) if isinstance(variables, FrozenDict) else converted


def from_batchnorm_variables(variables: Mapping, *, epsilon: float) -> Any:
    """A model's variables with ``flax.linen.BatchNorm`` layers turned into ``BatchRenorm``
    layers of the same inference: ``std = sqrt(var + epsilon)`` (computed in float64),
    ``step = 0``, and auto-generated names ``BatchNorm_i`` renamed ``BatchRenorm_i``
    (nested modules too).  ``epsilon`` is the batch norm layers'."""

    def convert(stats: dict) -> dict:
        var = np.asarray(stats["var"])
        std = np.sqrt(var.astype(np.float64) + epsilon).astype(var.dtype)
        return {"mean": stats["mean"], "std": jnp.asarray(std),
                "step": zero_step(jnp)}

    return _convert_variables(variables, epsilon, frozenset({"mean", "var"}), convert,
                              "BatchNorm", "BatchRenorm")


def to_batchnorm_variables(variables: Mapping, *, epsilon: float) -> Any:
    """A model's variables with ``BatchRenorm`` layers turned into ``flax.linen.BatchNorm``
    layers of the same inference: ``var = std**2 - epsilon`` (computed in float64), the
    step dropped, ``BatchRenorm_i`` renamed ``BatchNorm_i``.  ``epsilon`` is the renorm
    layers' (and must be the batch norm model's)."""

    def convert(stats: dict) -> dict:
        std = np.asarray(stats["std"])
        var = (np.square(std.astype(np.float64)) - epsilon).astype(std.dtype)
        return {"mean": stats["mean"], "var": jnp.asarray(var)}

    return _convert_variables(variables, epsilon, frozenset({"mean", "std", "step"}), convert,
                              "BatchRenorm", "BatchNorm")


# NnxBatchRenorm's constructor options held in its ``config`` (Flax name: core name), and
# those fixed by the variables it created.
_CONFIG_OPTIONS = {"axis": "feature_axis", "epsilon": "eps", "momentum": "momentum",
                   "r_max": "r_max", "d_max": "d_max", "r_min": "r_min",
                   "warmup_steps": "warmup_steps", "micro_batch": "micro_batch",
                   "output_clip": "output_clip"}
_FIXED_OPTIONS = ("num_features", "param_dtype", "use_bias", "use_scale", "bias_init",
                  "scale_init")


def _config_view(flax_name: str, core_name: str) -> property:
    """An ``NnxBatchRenorm`` option read back from its ``config`` in Flax's meaning (Flax's
    ``momentum`` is the decay, ``1 -`` the core's rate); setting goes through
    ``__setattr__``."""
    if flax_name == "momentum":
        return property(lambda self: 1.0 - self.config.momentum,
                        doc="Flax's momentum: the decay of the old statistics.")
    return property(lambda self: getattr(self.config, core_name),
                    doc=f"``RenormConfig.{core_name}``.")


class NnxBatchRenorm(nnx.Module):
    """``flax.nnx`` Batch Renormalization, a drop-in for ``flax.nnx.BatchNorm``.

    State is ``mean``, ``std`` and ``step`` as ``nnx.BatchStat``; ``scale`` and ``bias``
    are ``nnx.Param``.  ``.train()``/``.eval()`` and ``nnx.view`` set
    ``use_running_average``.  Other arguments as in ``BatchRenorm``.  Setting an option
    after construction (``layer.r_max = 2.0``, ``layer.momentum = 0.9`` in Flax's meaning)
    checks it and updates ``config``, used from the next call; the options that shaped
    the variables (``num_features``, ``param_dtype``, ``use_bias``, ...) are read-only.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        """Keep ``config`` in step with the options set after construction."""
        if "config" in vars(self):
            if name in _FIXED_OPTIONS:
                raise AttributeError(f"NnxBatchRenorm.{name} cannot be changed: it shaped "
                                     f"the layer's variables; make a new layer")
            if name in _CONFIG_OPTIONS:
                core = rate_from_flax_decay(value) if name == "momentum" else value
                try:
                    config = dataclasses.replace(self.config, **{_CONFIG_OPTIONS[name]: core})
                except (TypeError, ValueError) as error:
                    raise flax_named(error) from error
                super().__setattr__("config", config)
                return  # the attribute is a view of config (``_config_view``)
        super().__setattr__(name, value)

    def __init__(self, num_features: int, *, use_running_average: bool | None = False,
                 axis: int = -1, momentum: float = 0.99, epsilon: float = 1e-3,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                 use_bias: bool = True, use_scale: bool = True,
                 bias_init: Initializer = nnx.initializers.zeros,
                 scale_init: Initializer = nnx.initializers.ones,
                 axis_name: str | None = None, axis_index_groups: Any = None,
                 r_max: ScheduleLike = 3.0, d_max: ScheduleLike = 5.0,
                 r_min: ScheduleLike | None = None, warmup_steps: int = 0,
                 micro_batch: int | None = None,
                 output_clip: tuple[float, float] | None = None,
                 use_custom_vjp: bool = True, rngs: nnx.Rngs) -> None:
        self.num_features = num_features  # these before config: read-only from then on
        self.param_dtype, self.use_bias, self.use_scale = param_dtype, use_bias, use_scale
        self.bias_init, self.scale_init = bias_init, scale_init
        self.config = config_from_flax(axis=axis, momentum=momentum, epsilon=epsilon,
                                       r_max=r_max, d_max=d_max, r_min=r_min,
                                       warmup_steps=warmup_steps, micro_batch=micro_batch,
                                       output_clip=output_clip)
        shape = (num_features,)
        fresh = init_state(shape, xp=jnp, dtype=param_dtype)
        self.mean = nnx.BatchStat(fresh.mean)
        self.std = nnx.BatchStat(fresh.std)
        self.step = nnx.BatchStat(fresh.step)
        self.scale = (nnx.Param(scale_init(rngs.params(), shape, param_dtype)) if use_scale
                      else nnx.data(None))
        self.bias = (nnx.Param(bias_init(rngs.params(), shape, param_dtype)) if use_bias
                     else nnx.data(None))
        self.use_running_average = use_running_average
        self.dtype = dtype
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_custom_vjp = use_custom_vjp

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: switch between training and inference."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        """Normalize ``x``; in training, update the ``BatchStat`` state (``mask`` as in
        ``BatchRenorm``)."""
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError("use_running_average must be given to NnxBatchRenorm at "
                             "construction or call, or set with .train()/.eval()")
        state = RenormState(self.mean[...], self.std[...], self.step[...])
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        y, new_state, finite = _normalize(
            x, state, scale, bias, self.config, training=not use_running_average,
            dtype=self.dtype, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, use_custom_vjp=self.use_custom_vjp,
            mask=mask)
        if finite is not None:
            self.mean[...], self.std[...], self.step[...] = new_state
            if hasattr(self, "__captures__"):  # inside nnx.capture: sowing is supported
                self.sow(nnx.Intermediate, "finite", finite, reduce_fn=_keep_latest)
        return y


for _flax_name, _core_name in _CONFIG_OPTIONS.items():
    setattr(NnxBatchRenorm, _flax_name, _config_view(_flax_name, _core_name))
