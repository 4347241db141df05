"""A case's expected results, computed by the float64 reference (``reference.py``).

The state is carried from op to op the way a layer carries it, so the expectations of
later ops depend on every earlier one: a multi-step run is checked as a whole.

Output names, per op kind (backends report the same names):

- ``train``: ``y``, ``dx``, ``dweight``, ``dbias`` (absent when not affine), ``mean``,
  ``std``, ``step``, ``finite``;
- ``infer``: ``y``;
- ``recurrent``: ``y`` (the timesteps' outputs stacked on a new axis 0), ``mean``,
  ``std``, ``step``, ``finite``;
- ``recalibrate``: ``mean``, ``std``, ``step``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import reference
from .cases import Case, Outputs

__all__ = ["reference_outputs"]


def _state(mean: Any, std: Any, step: int, finite: Any = None) -> Outputs:
    out = {"mean": np.asarray(mean), "std": np.asarray(std), "step": np.asarray(step)}
    if finite is not None:
        out["finite"] = np.asarray(finite)
    return out


def reference_outputs(case: Case) -> tuple[Outputs, ...]:
    """The reference's outputs for every op of ``case``, in order."""
    config = dict(case.config)
    mean, std, step = case.mean, case.std, case.step
    weight, bias = case.weight, case.bias
    results: list[Outputs] = []
    for op in case.ops:
        if op.kind == "train":
            out = reference.train_step(op.xs[0], mean, std, step, weight, bias, op.dys[0],
                                       mask=op.masks[0] if op.masks else None, **config)
            mean, std, step = out["mean"], out["std"], out["step"]
            result = {"y": out["y"], "dx": out["dx"]}
            result.update({k: out[k] for k in ("dweight", "dbias") if out[k] is not None})
            result.update(_state(mean, std, step, out["finite"]))
        elif op.kind == "infer":
            result = {"y": reference.infer(op.xs[0], mean, std, weight, bias,
                                           feature_axis=config["feature_axis"])}
        elif op.kind == "recurrent":
            out = reference.recurrent_steps(op.xs, mean, std, step, weight, bias, **config)
            mean, std, step = out["mean"], out["std"], out["step"]
            result = {"y": np.stack(out["ys"]), **_state(mean, std, step, out["finite"])}
        elif op.kind == "recalibrate":
            mean, std = reference.recalibrate(op.xs, feature_axis=config["feature_axis"],
                                              eps=config["eps"])
            result = _state(mean, std, step)
        else:
            raise ValueError(f"case {case.name!r}: unknown op kind {op.kind!r}")
        results.append(result)
    return tuple(results)
