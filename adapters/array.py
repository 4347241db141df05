"""A stateful Batch Renormalization layer for plain arrays, with no autodiff needed.

For NumPy, CuPy, array-api-strict and any other Array API library: ``forward`` keeps
what ``backward`` needs, ``backward`` returns ``dx`` and stores the parameter
gradients, the way a hand-built network (or a CuPy pipeline) wants it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from array_api_compat import device as device_of

from portable_brn.config import RenormConfig
from portable_brn.host import to_host
from portable_brn.inputs import as_namespace, floating_namespace, namespace_of
from portable_brn.renorm import Residuals, backward, forward_infer, forward_train
from portable_brn.state import RenormState, init_params, init_state

__all__ = ["BatchRenorm"]

_STATE_KEYS = ("running_mean", "running_std", "num_batches_tracked")


def _setting(name: str) -> property:
    """A ``RenormConfig`` option as a layer attribute: setting it validates the value
    (the errors of ``RenormConfig``) and takes effect from the next call."""

    def get(self: BatchRenorm) -> Any:
        return getattr(self.config, name)

    def set_(self: BatchRenorm, value: Any) -> None:
        self.config = dataclasses.replace(self.config, **{name: value})

    return property(get, set_, doc=f"``RenormConfig.{name}``: settable, checked, used "
                                   f"from the next call.")


def _read_only(name: str, why: str, get: Any, doc: str) -> property:
    """A read-only attribute whose setter says why it cannot change."""

    def set_(self: BatchRenorm, value: Any) -> None:
        raise AttributeError(f"BatchRenorm.{name} cannot be changed: {why}")

    return property(get, set_, doc=doc)


_WHERE = "the layer lives where its state lives; load_state_dict into a new layer instead"


def _host_entry(key: str, value: Any) -> np.ndarray:
    """One ``load_state_dict`` entry as a host NumPy array (a ``TypeError`` naming it when
    it is not array-like)."""
    try:
        return np.asarray(value)
    except Exception as error:  # an object NumPy cannot read
        raise TypeError(f"{key} must be an array, got {type(value).__name__}") from error


def _checked_entry(xp: Any, key: str, value: np.ndarray, like: Any) -> None:
    """Refuse a loaded value the layer could not use as ``like``: wrong shape, a
    statistic or parameter that is not real floating, finite and within ``like``'s
    dtype (a ``running_std`` at 0 or below), a step that is not a non-negative integer
    of ``like``'s range."""
    if value.shape != tuple(like.shape):
        raise ValueError(f"{key} has shape {value.shape}, expected {tuple(like.shape)}")
    if key == "num_batches_tracked":
        integral = value.dtype.kind in "iu" or (value.dtype.kind == "f"
                                                and np.isfinite(value) and value == np.round(value))
        if not integral or value < 0:
            raise ValueError(f"num_batches_tracked must be a non-negative integer, got "
                             f"{value!r}")
        if int(value) > int(xp.iinfo(like.dtype).max):  # exact: no cast of the bound
            raise ValueError(f"num_batches_tracked={value} is beyond the step's {like.dtype}")
        return
    if value.dtype.kind != "f":
        raise TypeError(f"{key} must have a real floating dtype, got {value.dtype}")
    if not np.all(np.isfinite(value)):
        raise ValueError(f"{key} holds NaN or Inf")
    if float(np.max(np.abs(value), initial=0.0)) > float(xp.finfo(like.dtype).max):
        raise ValueError(f"{key} overflows the layer's {like.dtype}")
    if key == "running_std" and not np.all(value > 0):
        raise ValueError(f"running_std must be positive, got a minimum of {value.min()!r}")


class BatchRenorm:
    """Batch Renormalization over ``feature_axis`` of arrays from any Array API library.

    Parameters and state are created in the namespace and on the device of ``xp`` and
    ``device`` when given, else of the first input, and in ``dtype`` when given, else in
    the first input's dtype widened to float32 at least (float64 input, float64 state;
    float16 or bfloat16 input, float32 state); with ``xp=`` and no ``dtype``, float32.
    ``xp`` may be a framework module (``torch``) as well as a namespace.  Every other
    keyword is a ``RenormConfig`` option (``eps``, ``momentum``, ``r_max``, ``d_max``, ...);
    each is an attribute that can be set (checked as the constructor checks it, used from
    the next call).  ``num_features``, ``affine``, ``xp``, ``dtype`` and ``device`` are
    read-only.
    """

    feature_axis = _setting("feature_axis")
    eps = _setting("eps")
    momentum = _setting("momentum")
    r_max = _setting("r_max")
    d_max = _setting("d_max")
    r_min = _setting("r_min")
    warmup_steps = _setting("warmup_steps")
    micro_batch = _setting("micro_batch")
    output_clip = _setting("output_clip")
    num_features = _read_only(
        "num_features", "it is the shape of the state; make a new layer",
        lambda self: self._num_features, "The size (or sizes) of the feature axes.")
    affine = _read_only(
        "affine", "weight and bias exist or not; make a new layer",
        lambda self: self._affine, "Whether the layer has a weight and a bias.")
    xp = _read_only(
        "xp", _WHERE, lambda self: None if self.state is None else namespace_of(
            mean=self.state.mean),
        "The namespace of the state and parameters (None before the first call).")
    dtype = _read_only(
        "dtype", _WHERE,
        lambda self: self._dtype if self.state is None else self.state.mean.dtype,
        "The dtype of the moving statistics (None before the first call unless given).")
    device = _read_only(
        "device", _WHERE, lambda self: None if self.state is None else device_of(
            self.state.mean),
        "The device of the state and parameters (None before the first call).")

    def __init__(self, num_features: int | tuple[int, ...], *, feature_axis: Any = 1,
                 affine: bool = True, xp: Any = None, dtype: Any = None, device: Any = None,
                 **config: Any) -> None:
        self._config = RenormConfig(feature_axis=feature_axis, **config)
        if isinstance(num_features, bool) or not isinstance(num_features, (int, tuple)):
            raise TypeError(f"num_features must be an int or a tuple of ints, "
                            f"got {num_features!r}")
        if not isinstance(affine, bool):
            raise TypeError(f"affine must be a bool, got {affine!r}")
        self._num_features = num_features
        self._affine = affine
        self.weight = self.bias = self.state = None
        self.grad_weight = self.grad_bias = None
        self.nonfinite_batches = 0
        self._dtype = dtype
        self._residuals: Residuals | None = None
        if xp is not None:
            xp = as_namespace(xp)
            dtype = xp.float32 if dtype is None else dtype
            self.state, self.weight, self.bias = self._fresh(xp, device, dtype)

    @property
    def config(self) -> RenormConfig:
        """Every option of the computation, as one ``RenormConfig`` (settable)."""
        return self._config

    @config.setter
    def config(self, config: RenormConfig) -> None:
        if not isinstance(config, RenormConfig):
            raise TypeError(f"config must be a RenormConfig, got {type(config).__name__}")
        self._config = config

    def _fresh(self, xp: Any, dev: Any, dtype: Any) -> tuple[RenormState, Any, Any]:
        """New state and parameters (None without ``affine``) in ``xp`` on ``dev``."""
        state = init_state(self._num_features, xp=xp, dtype=dtype, device=dev)
        return (state, *init_params(state)) if self._affine else (state, None, None)

    def _bound_to(self, x: Any) -> tuple[RenormState, Any, Any]:
        """The layer's state and parameters; before the first call, fresh ones in the
        namespace, on the device and in the dtype (float32 at least) of ``x``, which the
        layer keeps only once a call with them succeeds (a bad first input binds it to
        nothing)."""
        if self.state is not None:
            return self.state, self.weight, self.bias
        xp = floating_namespace("x", x)
        dtype = xp.result_type(x.dtype, xp.float32) if self._dtype is None else self._dtype
        return self._fresh(xp, device_of(x), dtype)

    def forward(self, x: Any, training: bool = True, *, mask: Any = None) -> Any:
        """Normalize ``x``: batch renorm in training (updating the state), else inference.

        ``mask`` (boolean, broadcastable to ``x``): in training, only the elements where
        it is True enter the batch statistics; every element is transformed either way.

        Every check runs before anything changes; the new state, parameters and
        residuals are committed together, then a non-finite batch is counted and warned
        about (so a warning turned into an error finds the layer consistent).  The step
        counter advances on every training call, a non-finite batch included: only the
        moving statistics of its non-finite features stay as they were."""
        state, weight, bias = self._bound_to(x)
        if not training:
            y = forward_infer(x, state, weight, bias, self.config, mask=mask)
            self.state, self.weight, self.bias = state, weight, bias
            return y
        y, new_state, residuals = forward_train(x, state, weight, bias, self.config, mask=mask)
        xp = namespace_of(x=x)
        skipped = int(xp.sum(xp.astype(~residuals.finite, xp.int32)))
        self.state, self.weight, self.bias, self._residuals = new_state, weight, bias, residuals
        if skipped:
            self.nonfinite_batches += 1
            warnings.warn(f"BatchRenorm: non-finite batch statistics in {skipped} feature(s);"
                          " their moving statistics were not updated (the step was)",
                          RuntimeWarning, stacklevel=2)
        return y

    __call__ = forward

    @property
    def last_finite(self) -> Any:
        """Per feature, whether the last training batch's statistics were finite (where
        not, the moving statistics were left as they were); None before training."""
        return None if self._residuals is None else self._residuals.finite

    def backward(self, dy: Any) -> Any:
        """``dL/dx`` for the last training ``forward``; stores ``grad_weight``/``grad_bias``."""
        if self._residuals is None:
            raise RuntimeError("backward needs a forward(x, training=True) first")
        dx, self.grad_weight, self.grad_bias = backward(self._residuals, dy)
        return dx

    def reset_running_stats(self) -> None:
        """Moving mean 0, std 1, step 0, in the current namespace and device."""
        if self.state is not None:
            self.state = init_state(self._num_features, xp=self.xp, dtype=self.dtype,
                                    device=self.device)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host NumPy copies of parameters and state, ready for ``np.savez``."""
        if self.state is None:
            raise RuntimeError("the layer has no state yet: call forward once or pass xp=")
        arrays = dict(zip(_STATE_KEYS, self.state, strict=True))
        if self._affine:
            arrays.update(weight=self.weight, bias=self.bias)
        return {name: to_host(a) for name, a in arrays.items()}

    def load_state_dict(self, arrays: Mapping[str, Any]) -> None:
        """Load what ``state_dict`` gave (a dict or an ``np.load`` of a ``.npz``), converted
        to the layer's dtypes; all or nothing: every entry is checked (keys, shapes,
        dtypes, finite statistics, a positive ``running_std``, a non-negative integer
        step) before any is assigned, and an error names the entry."""
        if self.state is None:
            raise RuntimeError("the layer has no state yet: call forward once or pass xp=")
        if not isinstance(arrays, Mapping):
            raise TypeError(f"load_state_dict takes a mapping of names to arrays, got "
                            f"{type(arrays).__name__}")
        expected = _STATE_KEYS + (("weight", "bias") if self._affine else ())
        missing = [k for k in expected if k not in arrays]
        unexpected = [k for k in arrays if k not in expected]
        if missing or unexpected:
            raise KeyError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
        xp, dev = self.xp, self.device
        current = dict(zip(_STATE_KEYS, self.state, strict=True), weight=self.weight,
                       bias=self.bias)
        loaded = {}
        for key in expected:
            value = _host_entry(key, arrays[key])
            _checked_entry(xp, key, value, current[key])
            if key == "num_batches_tracked":
                value = int(value)
            loaded[key] = xp.asarray(value, dtype=current[key].dtype, device=dev)
        if not bool(xp.all(loaded["running_std"] > 0)):
            raise ValueError(f"running_std underflows to 0 in the layer's {self.dtype}")
        self.state = RenormState(*(loaded[k] for k in _STATE_KEYS))
        if self._affine:
            self.weight, self.bias = loaded["weight"], loaded["bias"]

    def __repr__(self) -> str:
        c = self.config
        options = [f"{self._num_features}", f"feature_axis={c.feature_axis}", f"eps={c.eps}",
                   f"momentum={c.momentum}", f"r_max={c.r_max}", f"d_max={c.d_max}"]
        for name in ("r_min", "micro_batch", "output_clip"):
            if getattr(c, name) is not None:
                options.append(f"{name}={getattr(c, name)}")
        if c.warmup_steps:
            options.append(f"warmup_steps={c.warmup_steps}")
        options.append(f"affine={self._affine}")
        return f"BatchRenorm({', '.join(options)})"
