"""Properties of Batch Renormalization that hold for any input, checked on any namespace.

Every check takes an Array API namespace ``xp`` and NumPy inputs, moves them to ``xp``
in their own dtype (on ``device`` when given), runs the core and returns one float: a
relative error or a normalized residual that is at rounding level (about 1e-15 for
float64 inputs) when the property holds.  What the checks compute on the host side is
float64, so with float32 inputs the result measures the core's float32 error alone
(``finite_difference`` needs float64 inputs).  Inputs whose mean is far from zero
against their spread cost digits in any float32 implementation: about
``|mean| / std * 6e-8``.  They are meant to be driven with many inputs, e.g.
from hypothesis::

    error = properties.train_matches_inference(xp, x, mean, std, weight, bias)
    assert error < properties.TOLERANCE["train_matches_inference"]

Shapes: ``x`` and ``dy`` have at least 2 dimensions with more than one element per
feature; ``mean``, ``std``, ``weight`` and ``bias`` have the feature shape (the sizes of
``feature_axis``, in increasing axis order); ``std > 0``.  ``run_all`` runs every check
on fixed seeded inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from portable_brn import (
    RenormConfig,
    RenormState,
    backward,
    forward_infer,
    forward_train,
    recalibrate,
)

from .arrays import from_numpy, to_numpy
from .checks import relative_error

__all__ = ["TOLERANCE", "batchnorm_equivalence", "dx_orthogonality", "finite_difference",
           "micro_batch_equivalence", "recalibration_equivalence", "run_all",
           "train_matches_inference"]

# Bounds at float64: the finite-difference check carries truncation error O(h**2).
TOLERANCE = {
    "batchnorm_equivalence": 1e-12, "train_matches_inference": 1e-12,
    "dx_orthogonality": 1e-12, "finite_difference": 1e-7,
    "micro_batch_equivalence": 1e-12, "recalibration_equivalence": 1e-12,
}
_MOMENTUM = 0.1


def _axes(ndim: int, feature_axis: int | tuple[int, ...]) -> tuple[int, ...]:
    """The reduced axes of an input with ``ndim`` dimensions."""
    axes = feature_axis if isinstance(feature_axis, tuple) else (feature_axis,)
    keep = {a % ndim for a in axes}
    return tuple(a for a in range(ndim) if a not in keep)


def _stats(x: np.ndarray, feature_axis: Any, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Batch mean and ``sqrt(biased var + eps)``, kept dims, float64."""
    x = np.asarray(x, dtype=np.float64)
    axes = _axes(x.ndim, feature_axis)
    mean = np.mean(x, axis=axes, keepdims=True)
    return mean, np.sqrt(np.mean((x - mean) ** 2, axis=axes, keepdims=True) + eps)


def _largest(errors: Iterable[float]) -> float:
    """The largest error; NaN when any is NaN (Python's ``max`` could skip it)."""
    errors = list(errors)
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


def _state(xp: Any, mean: np.ndarray, std: np.ndarray, step: int, device: Any) -> RenormState:
    return RenormState(from_numpy(xp, mean, device=device), from_numpy(xp, std, device=device),
                       from_numpy(xp, np.asarray(step), device=device))


def _train(xp: Any, x: np.ndarray, mean: np.ndarray, std: np.ndarray, weight: Any, bias: Any,
           dy: np.ndarray | None, config: RenormConfig, device: Any,
           step: int = 0) -> dict[str, np.ndarray]:
    """One core training step (and backward when ``dy`` is given), outputs on the host."""
    state = _state(xp, mean, std, step, device)
    y, new_state, residuals = forward_train(from_numpy(xp, x, device=device), state,
                                            from_numpy(xp, weight, device=device),
                                            from_numpy(xp, bias, device=device), config)
    out = {"y": y, "mean": new_state.mean, "std": new_state.std}
    if dy is not None:
        out["dx"], out["dweight"], out["dbias"] = backward(
            residuals, from_numpy(xp, dy, device=device))
    return {k: to_numpy(v) for k, v in out.items() if v is not None}


def _feature_shape(x: np.ndarray, feature_axis: Any) -> tuple[int, ...]:
    reduced = _axes(x.ndim, feature_axis)
    return tuple(n for a, n in enumerate(x.shape) if a not in reduced)


def _view(a: np.ndarray | None, x: np.ndarray, feature_axis: Any) -> np.ndarray | None:
    """A feature-shaped array broadcast against ``x``."""
    if a is None:
        return None
    reduced = _axes(x.ndim, feature_axis)
    return np.reshape(a, [1 if i in reduced else n for i, n in enumerate(x.shape)])


def batchnorm_equivalence(xp: Any, x: np.ndarray, weight: np.ndarray | None = None,
                          bias: np.ndarray | None = None, *, feature_axis: Any = 1,
                          eps: float = 1e-3, device: Any = None) -> float:
    """With ``r_max=1, d_max=0`` the training output is batch norm's: relative error of
    the core's ``y`` against ``weight * (x - mean) / sqrt(var + eps) + bias`` computed
    here in NumPy.  The moving statistics are set far from the batch's, so the result
    only holds if r and d are clipped to exactly 1 and 0."""
    batch_mean, batch_std = _stats(x, feature_axis, eps)
    shape = _feature_shape(x, feature_axis)
    mean = np.reshape(batch_mean, shape) + 3.0
    std = np.reshape(batch_std, shape) * 4.0
    config = RenormConfig(feature_axis=feature_axis, eps=eps, r_max=1.0, d_max=0.0)
    y = _train(xp, x, mean, std, weight, bias, None, config, device)["y"]
    expected = (np.asarray(x, dtype=np.float64) - batch_mean) / batch_std
    if weight is not None:
        expected = expected * _view(weight, x, feature_axis)
    if bias is not None:
        expected = expected + _view(bias, x, feature_axis)
    return relative_error(y, expected)


def train_matches_inference(xp: Any, x: np.ndarray, mean: np.ndarray, std: np.ndarray,
                            weight: np.ndarray | None = None, bias: np.ndarray | None = None,
                            *, feature_axis: Any = 1, eps: float = 1e-3,
                            device: Any = None) -> float:
    """When no clip binds, training output equals inference with the pre-step state (the
    paper's central property): relative error between the two.  ``r_max`` and
    ``d_max`` are set beyond the largest r and |d| this input produces."""
    batch_mean, batch_std = _stats(x, feature_axis, eps)
    ratio = np.reshape(batch_std, np.shape(std)) / std
    shift = np.abs(np.reshape(batch_mean, np.shape(mean)) - mean) / std
    config = RenormConfig(feature_axis=feature_axis, eps=eps,
                          r_max=2.0 * float(np.max(np.maximum(ratio, 1.0 / ratio))) + 1.0,
                          d_max=2.0 * float(np.max(shift)) + 1.0)
    y = _train(xp, x, mean, std, weight, bias, None, config, device)["y"]
    y_infer = to_numpy(forward_infer(
        from_numpy(xp, x, device=device), _state(xp, mean, std, 0, device),
        from_numpy(xp, weight, device=device), from_numpy(xp, bias, device=device), config))
    return relative_error(y, y_infer)


def dx_orthogonality(xp: Any, x: np.ndarray, dy: np.ndarray, mean: np.ndarray,
                     std: np.ndarray, weight: np.ndarray | None = None, *,
                     feature_axis: Any = 1, eps: float = 1e-3, r_max: float = 3.0,
                     device: Any = None) -> float:
    """``dx`` is orthogonal to the ones vector along the reduced axes, and to ``x`` up to
    the eps term: per feature ``sum(dx * x) = m * mean(g * x_hat) * eps / (var + eps)``
    with ``g = r * weight * dy`` (exactly 0 as eps -> 0).

    Given ``sum(dx) = 0``, orthogonality to ``x`` is orthogonality to ``x - mean(x)``,
    which is what is measured (a large mean would only add rounding).  Returns the
    larger residual, divided by the norm of the vector it is taken against (``sqrt(m)``,
    ``||x - mean(x)||``) and by ``||g|| / sigma_B``, the size of the terms ``dx`` is made
    of: ``dx`` itself may be far smaller (with m = 2 it is the eps term alone).
    """
    config = RenormConfig(feature_axis=feature_axis, eps=eps, r_max=r_max)
    dx = _train(xp, x, mean, std, weight, None, dy, config, device)["dx"]
    axes = _axes(x.ndim, feature_axis)
    batch_mean, batch_std = _stats(x, feature_axis, eps)
    centered = x - batch_mean
    r = np.clip(batch_std / _view(std, x, feature_axis), 1.0 / r_max, r_max)
    g = r * dy * (1.0 if weight is None else _view(weight, x, feature_axis))
    x_hat = centered / batch_std
    var = batch_std**2 - eps
    count = x.size // batch_mean.size
    closed = count * np.mean(g * x_hat, axis=axes, keepdims=True) * eps / (var + eps)
    scale = np.maximum(np.sqrt(np.sum(g**2, axis=axes, keepdims=True)) / batch_std,
                       np.finfo(np.float64).tiny)
    ones = np.abs(np.sum(dx, axis=axes, keepdims=True)) / (scale * np.sqrt(count))
    along_x = (np.abs(np.sum(dx * centered, axis=axes, keepdims=True) - closed)
               / (scale * np.sqrt(np.sum(centered**2, axis=axes, keepdims=True))))
    return float(np.max(np.maximum(ones, along_x)))


def finite_difference(xp: Any, x: np.ndarray, dy: np.ndarray, weight: np.ndarray,
                      bias: np.ndarray, *, feature_axis: Any = 1, eps: float = 1e-3,
                      r_max: float = 2.0, d_max: float = 0.5, directions: int = 4,
                      step: float = 1e-5, seed: int = 0, device: Any = None,
                      output_clip: tuple[float, float] | None = None) -> float:
    """Float64 central differences of ``L = sum(dy * y)`` along random directions of
    ``x``, ``weight`` and ``bias`` against the core's ``backward``.

    r and d are constants of the gradient (specification section 4), so the moving statistics are
    set for both clips to bind with a wide margin (r = r_max, d = -d_max): the forward
    is then locally the function the backward differentiates.  An ``output_clip`` must
    keep its bounds well away from every ``z = x_hat * r_max - d_max`` (many ``step``
    sizes), so that no difference crosses one.  Returns the largest
    ``|fd - analytic| / (||whole gradient|| * ||direction||)``.
    """
    batch_mean, batch_std = _stats(x, feature_axis, eps)
    shape = np.shape(weight)
    std = np.reshape(batch_std, shape) / (4.0 * r_max)
    mean = np.reshape(batch_mean, shape) + 4.0 * d_max * std
    config = RenormConfig(feature_axis=feature_axis, eps=eps, r_max=r_max, d_max=d_max,
                          output_clip=output_clip)

    def loss(x_: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
        return float(np.sum(dy * _train(xp, x_, mean, std, w, b, None, config, device)["y"]))

    grads = _train(xp, x, mean, std, weight, bias, dy, config, device)
    gradients = (grads["dx"], grads["dweight"], grads["dbias"])
    total_norm = math.sqrt(sum(float(np.sum(g**2)) for g in gradients))
    rng = np.random.default_rng(seed)
    worst = []
    for _ in range(directions):
        for part, gradient in enumerate(gradients):
            direction = [np.zeros_like(a) for a in (x, weight, bias)]
            direction[part] = rng.standard_normal(np.shape(gradient))
            ahead = loss(*(a + step * v for a, v in zip((x, weight, bias), direction,
                                                          strict=True)))
            behind = loss(*(a - step * v for a, v in zip((x, weight, bias), direction,
                                                           strict=True)))
            analytic = float(np.sum(gradient * direction[part]))
            # relative to the whole gradient: dx alone can be tiny (few values per feature)
            scale = float(total_norm * np.linalg.norm(direction[part]))
            worst.append(abs((ahead - behind) / (2.0 * step) - analytic) / scale)
    return _largest(worst)


def micro_batch_equivalence(xp: Any, x: np.ndarray, dy: np.ndarray, mean: np.ndarray,
                            std: np.ndarray, weight: np.ndarray | None = None,
                            bias: np.ndarray | None = None, *, micro_batch: int,
                            feature_axis: Any = 1, eps: float = 1e-3, r_max: float = 2.0,
                            d_max: float = 1.0, device: Any = None) -> float:
    """``micro_batch=k`` equals separate calls on each run of ``k`` examples, all from
    the same pre-step state: outputs and ``dx`` concatenate, ``dweight``/``dbias`` add
    up and the new moving statistics are the mean of the separate calls' (the update is
    linear).  Axis 0 is the batch axis; ``x.shape[0]`` must be a multiple of ``k``.

    Returns the largest relative error; ``dx`` is measured against the size of the terms
    it is made of, ``||r_max * weight * dy / sigma_B||`` per group, since with tiny
    groups ``dx`` itself can be all rounding (with k = 2 it is the eps term alone).
    """
    whole = _train(xp, x, mean, std, weight, bias, dy,
                   RenormConfig(feature_axis=feature_axis, eps=eps, r_max=r_max,
                                d_max=d_max, micro_batch=micro_batch), device)
    config = RenormConfig(feature_axis=feature_axis, eps=eps, r_max=r_max, d_max=d_max)
    starts = range(0, x.shape[0], micro_batch)
    parts = [_train(xp, x[i:i + micro_batch], mean, std, weight, bias, dy[i:i + micro_batch],
                    config, device) for i in starts]
    combine = {"y": np.concatenate, "dweight": lambda a: np.sum(a, axis=0),
               "dbias": lambda a: np.sum(a, axis=0), "mean": lambda a: np.mean(a, axis=0),
               "std": lambda a: np.mean(a, axis=0)}
    errors = [relative_error(whole[name], join([p[name] for p in parts]))
              for name, join in combine.items() if name in whole]
    w = 1.0 if weight is None else _view(weight, x, feature_axis)
    terms = np.concatenate([r_max * w * dy[i:i + micro_batch]
                            / _stats(x[i:i + micro_batch], feature_axis, eps)[1]
                            for i in starts])
    dx_parts = np.concatenate([p["dx"] for p in parts])
    errors.append(float(np.linalg.norm(whole["dx"] - dx_parts) / np.linalg.norm(terms)))
    return _largest(errors)


def recalibration_equivalence(xp: Any, batches: Sequence[np.ndarray], *,
                              feature_axis: Any = 1, eps: float = 1e-3,
                              device: Any = None) -> float:
    """Recalibration over ``batches`` gives the mean and ``sqrt(var + eps)`` of all of
    them concatenated along axis 0: the larger relative error of the two."""
    config = RenormConfig(feature_axis=feature_axis, eps=eps)
    state = recalibrate([from_numpy(xp, b, device=device) for b in batches], config)
    mean, std = _stats(np.concatenate(batches), feature_axis, eps)
    return _largest((relative_error(to_numpy(state.mean), np.reshape(mean, state.mean.shape)),
                     relative_error(to_numpy(state.std), np.reshape(std, state.std.shape))))


def run_all(xp: Any, device: Any = None) -> dict[str, float]:
    """Every property on fixed seeded float64 inputs (rank 3 and rank 4 with a tuple
    feature axis); compare each with ``TOLERANCE``."""
    rng = np.random.default_rng(2017)
    errors: dict[str, float] = {}
    for shape, axis in (((8, 3, 5), 1), ((4, 2, 3, 3), (1, -1))):
        x = rng.normal(1.0, 2.0, shape)
        dy = rng.standard_normal(shape)
        features = _feature_shape(x, axis)
        mean, std = rng.normal(0.0, 1.0, features), rng.uniform(0.5, 2.0, features)
        weight, bias = rng.uniform(0.5, 1.5, features), rng.normal(0.0, 0.5, features)
        batches = [rng.normal(-1.0, 3.0, (n, *shape[1:])) for n in (3, 6, 2)]
        found = {
            "batchnorm_equivalence": batchnorm_equivalence(
                xp, x, weight, bias, feature_axis=axis, device=device),
            "train_matches_inference": train_matches_inference(
                xp, x, mean, std, weight, bias, feature_axis=axis, device=device),
            "dx_orthogonality": dx_orthogonality(
                xp, x, dy, mean, std, weight, feature_axis=axis, device=device),
            "finite_difference": finite_difference(
                xp, x, dy, weight, bias, feature_axis=axis, device=device),
            "micro_batch_equivalence": micro_batch_equivalence(
                xp, x, dy, mean, std, weight, bias, micro_batch=2, feature_axis=axis,
                device=device),
            "recalibration_equivalence": recalibration_equivalence(
                xp, batches, feature_axis=axis, device=device),
        }
        for name, error in found.items():
            errors[name] = _largest((errors.get(name, 0.0), error))
    return errors
