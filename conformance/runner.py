"""Running a case through the core (``portable_brn``) on one Array API namespace.

``core_config`` maps a case's config dict (the reference's vocabulary) to a
``RenormConfig``; ``run_core`` plays the case's ops with the state the core itself
returns, carried from op to op, and reports the outputs ``expected`` names.  How
arrays enter and leave the library, and whether the step functions are compiled, is up
to the ``CoreHooks`` a backend provides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import numpy as np

from portable_brn import (
    RenormConfig,
    RenormState,
    backward,
    deferred_update,
    forward_infer,
    forward_train,
    recalibrate,
    schedules,
)

from .arrays import dtype_pair
from .cases import Case, Outputs

__all__ = ["CoreHooks", "core_config", "core_steps", "run_core", "schedule"]


def schedule(spec: Any) -> Any:
    """A schedule spec dict (``constant``, ``linear``, ``paper_r_max``, ``paper_d_max``)
    as a ``portable_brn.schedules`` object; numbers and ``None`` pass through."""
    if not isinstance(spec, Mapping):
        return spec
    kind = spec.get("kind")
    if kind == "constant":
        return schedules.constant(spec["value"])
    if kind == "linear":
        return schedules.linear(spec["start_value"], spec["end_value"], spec["start_step"],
                                spec["end_step"])
    if kind in ("paper_r_max", "paper_d_max"):
        return schedules.paper()[kind.removeprefix("paper_")]
    raise ValueError(f"schedule spec: unknown kind {kind!r}")


def core_config(config: Mapping[str, Any]) -> RenormConfig:
    """The ``RenormConfig`` of a case's config dict."""
    options = dict(config)
    for name in ("r_max", "d_max", "r_min"):
        options[name] = schedule(options[name])
    for name in ("feature_axis", "output_clip"):
        if isinstance(options[name], list):
            options[name] = tuple(options[name])
    return RenormConfig(**options)


class CoreHooks(Protocol):
    """What ``run_core`` needs from a backend."""

    xp: Any
    device: Any
    stop_gradient: Callable[[Any], Any] | None

    def asarray(self, array: np.ndarray | None, dtype: Any) -> Any:
        """A host array in the library (``None`` stays ``None``)."""

    def carry(self, array: Any) -> Any:
        """An array the core returned, made ready to be passed back in."""

    def to_host(self, arrays: dict[str, Any]) -> Outputs:
        """Host NumPy copies of ``arrays`` (see ``arrays.to_numpy``)."""

    def compile(self, fn: Callable) -> Callable:
        """``fn`` as the backend runs it (``jax.jit`` for JAX, else unchanged)."""


class CoreSteps(NamedTuple):
    """The four calls a case is made of, as pure functions of arrays."""

    train: Callable
    infer: Callable
    recurrent: Callable
    recalibrate: Callable


def core_steps(config: RenormConfig, stop_gradient: Callable[[Any], Any] | None) -> CoreSteps:
    """The core's training step (forward and backward), inference, deferred recurrent
    update and recalibration under ``config``."""

    def train(x: Any, state: RenormState, weight: Any, bias: Any, dy: Any,
              mask: Any = None) -> tuple:
        y, new_state, residuals = forward_train(x, state, weight, bias, config,
                                                stop_gradient=stop_gradient, mask=mask)
        return (y, *backward(residuals, dy)), new_state, residuals.finite

    def infer(x: Any, state: RenormState, weight: Any, bias: Any) -> Any:
        return forward_infer(x, state, weight, bias, config)

    def recurrent(xs: tuple, state: RenormState, weight: Any, bias: Any) -> tuple:
        calls = [forward_train(x, state, weight, bias, config, stop_gradient=stop_gradient,
                               defer_update=True) for x in xs]
        new_state, finite = deferred_update(state, [res.moments for _, _, res in calls],
                                            config)
        return [y for y, _, _ in calls], new_state, finite

    def recalibrate_(batches: tuple, state: RenormState) -> RenormState:
        return recalibrate(batches, config, state=state)

    return CoreSteps(train, infer, recurrent, recalibrate_)


def _state(state: RenormState, finite: Any = None) -> dict[str, Any]:
    out = {"mean": state.mean, "std": state.std, "step": state.step}
    if finite is not None:
        out["finite"] = finite
    return out


def run_core(case: Case, dtype: str, hooks: CoreHooks) -> tuple[Outputs, ...]:
    """Play ``case`` through the core with inputs in ``dtype``; one dict per op."""
    xp = hooks.xp
    x_dtype, p_dtype = dtype_pair(xp, dtype)
    steps = CoreSteps(*(hooks.compile(fn) for fn in core_steps(core_config(case.config),
                                                               hooks.stop_gradient)))
    int_dtype = xp.__array_namespace_info__().default_dtypes(device=hooks.device)["integral"]
    state = RenormState(hooks.asarray(case.mean, p_dtype), hooks.asarray(case.std, p_dtype),
                        hooks.asarray(np.asarray(case.step), int_dtype))
    weight, bias = hooks.asarray(case.weight, p_dtype), hooks.asarray(case.bias, p_dtype)

    def inputs(arrays: tuple[np.ndarray, ...]) -> tuple:
        return tuple(hooks.asarray(a, x_dtype) for a in arrays)

    results: list[Outputs] = []
    for op in case.ops:
        if op.kind == "train":
            masks = tuple(hooks.asarray(mask, xp.bool) for mask in op.masks)
            (y, dx, dweight, dbias), state, finite = steps.train(
                *inputs(op.xs), state, weight, bias, *inputs(op.dys), *masks)
            out = {"y": y, "dx": dx, "dweight": dweight, "dbias": dbias,
                   **_state(state, finite)}
        elif op.kind == "infer":
            out = {"y": steps.infer(*inputs(op.xs), state, weight, bias)}
        elif op.kind == "recurrent":
            ys, state, finite = steps.recurrent(inputs(op.xs), state, weight, bias)
            out = {"y": xp.stack(ys), **_state(state, finite)}
        elif op.kind == "recalibrate":
            state = steps.recalibrate(inputs(op.xs), state)
            out = _state(state)
        else:
            raise ValueError(f"case {case.name!r}: unknown op kind {op.kind!r}")
        results.append(hooks.to_host({k: v for k, v in out.items() if v is not None}))
        state = RenormState(*(hooks.carry(a) for a in state))
    return tuple(results)
