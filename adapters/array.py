"""A stateful Batch Renormalization layer for plain arrays, with no autodiff needed.

For NumPy, CuPy, array-api-strict and any other Array API library: ``forward`` keeps
what ``backward`` needs, ``backward`` returns ``dx`` and stores the parameter
gradients, the way a hand-built network (or a CuPy pipeline) wants it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from array_api_compat import device

from portable_brn.config import RenormConfig
from portable_brn.inputs import namespace_of
from portable_brn.renorm import Residuals, backward, forward_infer, forward_train
from portable_brn.state import RenormState, init_state

__all__ = ["BatchRenorm"]

_STATE_KEYS = ("running_mean", "running_std", "num_batches_tracked")


def _to_numpy(array: Any) -> np.ndarray:
    """A host NumPy copy of an array of any library (via DLPack where needed)."""
    if hasattr(array, "get"):  # CuPy: device to host
        return array.get()
    return np.array(np.from_dlpack(array), copy=True)


class BatchRenorm:
    """Batch Renormalization over ``feature_axis`` of arrays from any Array API library.

    Parameters and state are created in the namespace and on the device of ``xp`` and
    ``device`` when given, else of the first input.  Every other keyword is a
    ``RenormConfig`` option (``eps``, ``momentum``, ``r_max``, ``d_max``, ...).
    """

    def __init__(self, num_features: int | tuple[int, ...], *, feature_axis: Any = 1,
                 affine: bool = True, xp: Any = None, dtype: Any = None, device: Any = None,
                 **config: Any) -> None:
        self.config = RenormConfig(feature_axis=feature_axis, **config)
        if isinstance(num_features, bool) or not isinstance(num_features, (int, tuple)):
            raise TypeError(f"num_features must be an int or a tuple of ints, "
                            f"got {num_features!r}")
        self.num_features = num_features
        self.affine = affine
        self.weight = self.bias = self.state = None
        self.grad_weight = self.grad_bias = None
        self.nonfinite_batches = 0
        self._dtype = dtype
        self._residuals: Residuals | None = None
        if xp is not None:
            self.state, self.weight, self.bias = self._fresh(xp, device)

    def _fresh(self, xp: Any, dev: Any) -> tuple[RenormState, Any, Any]:
        """New state and parameters (None without ``affine``) in ``xp`` on ``dev``."""
        dtype = xp.float32 if self._dtype is None else self._dtype
        state = init_state(self.num_features, xp=xp, dtype=dtype, device=dev)
        if not self.affine:
            return state, None, None
        return state, xp.ones_like(state.mean), xp.zeros_like(state.mean)

    def _bound_to(self, x: Any) -> tuple[RenormState, Any, Any]:
        """The layer's state and parameters; before the first call, fresh ones in the
        namespace and on the device of ``x``, which the layer keeps only once a call
        with them succeeds (a bad first input binds it to nothing)."""
        if self.state is not None:
            return self.state, self.weight, self.bias
        return self._fresh(namespace_of(x=x), device(x))

    def forward(self, x: Any, training: bool = True, *, mask: Any = None) -> Any:
        """Normalize ``x``: batch renorm in training (updating the state), else inference.

        ``mask`` (boolean, broadcastable to ``x``): in training, only the elements where
        it is True enter the batch statistics; every element is transformed either way.

        Every check runs before anything changes; the new state, parameters and
        residuals are committed together, then a non-finite batch is counted and warned
        about (so a warning turned into an error finds the layer consistent)."""
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
                          " their moving statistics were not updated", RuntimeWarning,
                          stacklevel=2)
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
            xp = namespace_of(mean=self.state.mean)
            self.state = init_state(self.num_features, xp=xp, dtype=self.state.mean.dtype,
                                    device=device(self.state.mean))

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host NumPy copies of parameters and state, ready for ``np.savez``."""
        if self.state is None:
            raise RuntimeError("the layer has no state yet: call forward once or pass xp=")
        arrays = dict(zip(_STATE_KEYS, self.state, strict=True))
        if self.affine:
            arrays.update(weight=self.weight, bias=self.bias)
        return {name: _to_numpy(a) for name, a in arrays.items()}

    def load_state_dict(self, arrays: Mapping[str, Any]) -> None:
        """Load what ``state_dict`` gave (a dict or an ``np.load`` of a ``.npz``); all or
        nothing: every entry is checked before any is assigned."""
        if self.state is None:
            raise RuntimeError("the layer has no state yet: call forward once or pass xp=")
        expected = _STATE_KEYS + (("weight", "bias") if self.affine else ())
        missing = [k for k in expected if k not in arrays]
        unexpected = [k for k in arrays if k not in expected]
        if missing or unexpected:
            raise KeyError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
        xp, dev = namespace_of(mean=self.state.mean), device(self.state.mean)
        current = dict(zip(_STATE_KEYS, self.state, strict=True), weight=self.weight,
                       bias=self.bias)
        loaded = {}
        for key in expected:
            value = np.asarray(arrays[key])
            if value.shape != tuple(current[key].shape):
                raise ValueError(f"{key} has shape {value.shape}, expected "
                                 f"{tuple(current[key].shape)}")
            loaded[key] = xp.asarray(value, dtype=current[key].dtype, device=dev)
        self.state = RenormState(*(loaded[k] for k in _STATE_KEYS))
        if self.affine:
            self.weight, self.bias = loaded["weight"], loaded["bias"]

    def __repr__(self) -> str:
        c = self.config
        options = [f"{self.num_features}", f"feature_axis={c.feature_axis}", f"eps={c.eps}",
                   f"momentum={c.momentum}", f"r_max={c.r_max}", f"d_max={c.d_max}"]
        for name in ("r_min", "micro_batch", "output_clip"):
            if getattr(c, name) is not None:
                options.append(f"{name}={getattr(c, name)}")
        if c.warmup_steps:
            options.append(f"warmup_steps={c.warmup_steps}")
        options.append(f"affine={self.affine}")
        return f"BatchRenorm({', '.join(options)})"
