"""Independent float64 reference for Batch Renormalization (Ioffe, NIPS 2017).

This module is the ground truth that every backend of ``portable_brn`` is compared
to (specification section 6). It is written straight from specification sections 2 to 4
in plain NumPy float64, deliberately naive: every input is cast to float64 on entry, the batch
is laid out as one 1-D vector of reduced elements per (feature, group), and each
vector is normalized by a Python loop that reads like the paper's Algorithm 1.

It is independent of the core on purpose: it imports nothing from ``portable_brn``,
shares none of its helpers (moment merging, schedules, broadcasting) and uses no
Array API indirection, so a bug in the core cannot hide by being copied into the
thing it is checked against. Speed is not a goal; clarity is.

Public functions: :func:`train_step`, :func:`infer`, :func:`recalibrate`,
:func:`recurrent_steps` and :func:`evaluate_schedule`.

Conventions decided here (the specification leaves them open):

- ``feature_axis`` given as a tuple is normalized to sorted non-negative axes; the
  statistics have the sizes of the feature axes in increasing axis order.
- A ``"linear"`` schedule whose ``end_step <= start_step`` is a step function: the
  start value before ``start_step``, the end value from it on.
- ``output_clip=(lo, hi)`` accepts ``None`` for either bound (no clip on that side).
- Infinite limits (``r_max`` or ``d_max`` of ``inf``) mean no clipping; a ``"linear"``
  schedule with an infinite end is infinite strictly between its steps.
- ``dweight`` is ``None`` when ``weight`` is ``None``; ``dbias`` is ``None`` when
  ``bias`` is ``None``; ``dx`` is ``None`` when ``dy`` is ``None``.
- The non-finite guard also applies to :func:`recurrent_steps` (per feature, on the
  pooled mean and std), which reports ``finite`` as well.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "evaluate_schedule",
    "infer",
    "recalibrate",
    "recurrent_steps",
    "train_step",
]

Schedule = float | dict | Callable[[int], float]
FeatureAxis = int | Sequence[int]

_PAPER_SCHEDULES = {
    # r_max = 1 until step 5000, then linear to 3 at step 40000, constant afterwards.
    "paper_r_max": {"start_value": 1.0, "end_value": 3.0, "start_step": 5000, "end_step": 40000},
    # d_max = 0 until step 5000, then linear to 5 at step 25000, constant afterwards.
    "paper_d_max": {"start_value": 0.0, "end_value": 5.0, "start_step": 5000, "end_step": 25000},
}


# ---------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------


def _linear(start_value, end_value, start_step, end_step, step) -> float:
    a, b = float(start_value), float(end_value)
    s0, s1, t = float(start_step), float(end_step), float(step)
    if s1 <= s0:  # degenerate ramp: a step from a to b at s0
        return b if t >= s0 else a
    fraction = min(max((t - s0) / (s1 - s0), 0.0), 1.0)
    if math.isinf(a) or math.isinf(b):  # the line's limit: infinite inside the ramp
        return a if fraction == 0.0 else b if fraction == 1.0 else a + b
    return a + (b - a) * fraction


def evaluate_schedule(value: Schedule, step: int) -> float:
    """Value of a hyperparameter schedule at step ``step``.

    ``value`` is a number (constant), a Python callable ``step -> float``, or a spec
    dict: ``{"kind": "constant", "value": v}``, ``{"kind": "linear", "start_value": a,
    "end_value": b, "start_step": s0, "end_step": s1}`` meaning
    ``a + (b - a) * clip((t - s0) / (s1 - s0), 0, 1)``, ``{"kind": "paper_r_max"}`` or
    ``{"kind": "paper_d_max"}`` (the paper's schedules, as linear specs) or
    ``{"kind": "cumulative_average"}`` (the momentum ``1 / (t + 1)``).
    """
    if callable(value):
        return float(value(step))
    if isinstance(value, dict):
        kind = value.get("kind")
        if kind == "constant":
            return float(value["value"])
        if kind == "linear":
            return _linear(
                value["start_value"],
                value["end_value"],
                value["start_step"],
                value["end_step"],
                step,
            )
        if kind == "cumulative_average":
            return 1.0 / (step + 1)
        if kind in _PAPER_SCHEDULES:
            return _linear(step=step, **_PAPER_SCHEDULES[kind])
        raise ValueError(f"schedule spec: unknown kind {kind!r}")
    return float(value)


# ---------------------------------------------------------------------------
# Layout: one 1-D vector of reduced elements per (feature, group)
# ---------------------------------------------------------------------------


def _feature_axes(feature_axis, ndim: int) -> tuple[int, ...]:
    axes = (feature_axis,) if isinstance(feature_axis, (int, np.integer)) else tuple(feature_axis)
    normalized = []
    for axis in axes:
        axis = int(axis)
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"feature_axis: axis {axis} is out of range for an array of rank {ndim}"
            )
        normalized.append(axis % ndim)
    return tuple(sorted(normalized))


def _permutation(ndim: int, feature_axes: tuple[int, ...]) -> tuple[int, ...]:
    """Feature axes first (increasing), then the reduced axes (increasing)."""
    reduced = tuple(a for a in range(ndim) if a not in feature_axes)
    return feature_axes + reduced


def _to_vectors(x: np.ndarray, feature_axes: tuple[int, ...], groups: int) -> np.ndarray:
    """Array of shape (F, groups, n): for feature f and group g, its n reduced elements.

    The reduced axes keep their order, so when axis 0 is reduced it comes first and
    the reduced elements of example i are contiguous; splitting the flat reduced
    index into ``groups`` equal chunks gives contiguous groups of examples.
    """
    perm = _permutation(x.ndim, feature_axes)
    n_features = math.prod(x.shape[a] for a in feature_axes)
    return np.transpose(x, perm).reshape(n_features, groups, -1)


def _from_vectors(
    v: np.ndarray, shape: tuple[int, ...], feature_axes: tuple[int, ...]
) -> np.ndarray:
    """Inverse of :func:`_to_vectors`: back to an array of shape ``shape``."""
    perm = _permutation(len(shape), feature_axes)
    permuted = v.reshape(tuple(shape[a] for a in perm))
    return np.transpose(permuted, np.argsort(perm))


def _f64(a) -> np.ndarray | None:
    return None if a is None else np.asarray(a, dtype=np.float64)


# ---------------------------------------------------------------------------
# Training step
# ---------------------------------------------------------------------------


def train_step(
    x: ArrayLike,
    mean: ArrayLike,
    std: ArrayLike,
    step: int,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    dy: ArrayLike | None = None,
    *,
    feature_axis: FeatureAxis = 1,
    eps: float = 1e-3,
    momentum: Schedule = 0.01,
    r_max: Schedule = 3.0,
    d_max: Schedule = 5.0,
    r_min: Schedule | None = None,
    warmup_steps: int = 0,
    micro_batch: int | None = None,
    output_clip: tuple[float | None, float | None] | None = None,
    mask: ArrayLike | None = None,
) -> dict[str, Any]:
    """One Batch Renormalization training step (specification sections 2, 4 and 5), float64.

    ``mask`` (boolean, broadcastable to ``x``) selects the elements the batch statistics
    are computed over; every element is transformed and gets a gradient.

    Returns a dict with ``y``, ``dx``, ``dweight``, ``dbias`` (``None`` where not
    applicable), the new state ``mean``, ``std``, ``step``, the per-group ``r``, ``d``,
    ``batch_mean``, ``batch_std`` (shape ``(G, *feature_shape)`` when ``micro_batch``
    is set, else ``feature_shape``) and ``finite`` (bool per feature: whether the
    moving statistics of that feature were updated).
    """
    x = np.asarray(x, dtype=np.float64)
    mean, std = _f64(mean), _f64(std)
    weight, bias, dy = _f64(weight), _f64(bias), _f64(dy)
    step = int(step)
    eps = float(eps)

    feature_axes = _feature_axes(feature_axis, x.ndim)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    n_features = math.prod(feature_shape)

    if micro_batch is None:
        groups = 1
    else:
        k = int(micro_batch)
        if 0 in feature_axes:
            raise ValueError("micro_batch: the batch axis 0 must not be a feature axis")
        if k < 1 or x.shape[0] % k != 0:
            raise ValueError(
                f"micro_batch: batch size {x.shape[0]} is not divisible by micro_batch={k}"
            )
        groups = x.shape[0] // k

    # Schedules are evaluated at the pre-update step counter t = step.
    r_hi = evaluate_schedule(r_max, step)
    r_lo = 1.0 / r_hi if r_min is None else evaluate_schedule(r_min, step)
    d_hi = evaluate_schedule(d_max, step)
    momentum = evaluate_schedule(momentum, step)
    warm = step < int(warmup_steps)

    if output_clip is None:
        clip_lo, clip_hi = None, None
    else:
        clip_lo, clip_hi = output_clip
        clip_lo = -math.inf if clip_lo is None else float(clip_lo)
        clip_hi = math.inf if clip_hi is None else float(clip_hi)

    mean_f = mean.reshape(n_features)
    std_f = std.reshape(n_features)
    weight_f = None if weight is None else weight.reshape(n_features)
    bias_f = None if bias is None else bias.reshape(n_features)

    xv = _to_vectors(x, feature_axes, groups)
    gv = None if dy is None else _to_vectors(dy, feature_axes, groups)
    counted = np.ones(x.shape, dtype=bool) if mask is None else np.broadcast_to(
        np.asarray(mask, dtype=bool), x.shape)
    cv = _to_vectors(counted, feature_axes, groups)

    yv = np.empty_like(xv)
    dxv = None if dy is None else np.empty_like(xv)
    mu_b = np.empty((groups, n_features))
    sigma_b = np.empty((groups, n_features))
    r_all = np.empty((groups, n_features))
    d_all = np.empty((groups, n_features))
    dweight = None if weight is None or dy is None else np.zeros(n_features)
    dbias = None if bias is None or dy is None else np.zeros(n_features)

    with np.errstate(all="ignore"):
        for f in range(n_features):
            for g in range(groups):
                v = xv[f, g]  # the m reduced elements of feature f in group g
                c = cv[f, g]  # which of them count towards the statistics
                n_c = int(np.sum(c))

                # Forward, Algorithm 1, over the counted elements (NaN if none).
                mu = np.sum(v[c]) / n_c if n_c else np.nan
                sigma = np.sqrt(np.sum((v[c] - mu) ** 2) / n_c + eps) if n_c else np.nan
                if warm:
                    r, d = 1.0, 0.0
                else:
                    r = np.clip(sigma / std_f[f], r_lo, r_hi)
                    d = np.clip((mu - mean_f[f]) / std_f[f], -d_hi, d_hi)
                x_hat = (v - mu) / sigma
                z_raw = x_hat * r + d
                if output_clip is None:
                    z = z_raw
                    bound = np.zeros(v.shape, dtype=bool)
                else:
                    z = np.clip(z_raw, clip_lo, clip_hi)
                    bound = (z_raw < clip_lo) | (z_raw > clip_hi)
                y = z if weight_f is None else weight_f[f] * z
                y = y if bias_f is None else y + bias_f[f]

                yv[f, g] = y
                mu_b[g, f], sigma_b[g, f] = mu, sigma
                r_all[g, f], d_all[g, f] = r, d

                # Backward, specification section 4 (r and d are constants).
                if gv is not None:
                    grad = gv[f, g]
                    if dbias is not None:
                        dbias[f] += np.sum(grad)
                    if dweight is not None:
                        dweight[f] += np.sum(grad * z)
                    g_z = grad if weight_f is None else weight_f[f] * grad
                    g_z = np.where(bound, 0.0, g_z)
                    g_xhat = r * g_z
                    # Every output depends on mu and sigma, which only counted elements move.
                    s1, s2 = np.sum(g_xhat), np.sum(g_xhat * x_hat)
                    dxv[f, g] = (g_xhat - c * (s1 + x_hat * s2) / n_c) / sigma

        # Moving statistics: once per call, toward the mean over groups.
        finite = np.all(np.isfinite(mu_b), axis=0) & np.all(np.isfinite(sigma_b), axis=0)
        target_mean = np.mean(mu_b, axis=0)
        target_std = np.mean(sigma_b, axis=0)
        new_mean = np.where(finite, mean_f + momentum * (target_mean - mean_f), mean_f)
        new_std = np.where(finite, std_f + momentum * (target_std - std_f), std_f)

    def per_group(a: np.ndarray) -> np.ndarray:
        if micro_batch is None:
            return a[0].reshape(feature_shape)
        return a.reshape((groups, *feature_shape))

    return {
        "y": _from_vectors(yv, x.shape, feature_axes),
        "dx": None if dxv is None else _from_vectors(dxv, x.shape, feature_axes),
        "dweight": None if dweight is None else dweight.reshape(feature_shape),
        "dbias": None if dbias is None else dbias.reshape(feature_shape),
        "mean": new_mean.reshape(feature_shape),
        "std": new_std.reshape(feature_shape),
        "step": step + 1,
        "r": per_group(r_all),
        "d": per_group(d_all),
        "batch_mean": per_group(mu_b),
        "batch_std": per_group(sigma_b),
        "finite": finite.reshape(feature_shape),
    }


# ---------------------------------------------------------------------------
# Inference and recalibration
# ---------------------------------------------------------------------------


def _broadcastable(a: np.ndarray, ndim: int, shape, feature_axes: tuple[int, ...]) -> np.ndarray:
    """Reshape a feature-shaped array so that it broadcasts against ``x``."""
    target = [1] * ndim
    for axis in feature_axes:
        target[axis] = shape[axis]
    return a.reshape(target)


def infer(x: ArrayLike, mean: ArrayLike, std: ArrayLike, weight: ArrayLike | None = None,
          bias: ArrayLike | None = None, *, feature_axis: FeatureAxis = 1) -> np.ndarray:
    """Inference (specification section 3): ``y = weight * (x - mean) / std + bias``."""
    x = np.asarray(x, dtype=np.float64)
    feature_axes = _feature_axes(feature_axis, x.ndim)

    def b(a):
        return _broadcastable(_f64(a), x.ndim, x.shape, feature_axes)

    with np.errstate(all="ignore"):
        y = (x - b(mean)) / b(std)
        if weight is not None:
            y = b(weight) * y
        if bias is not None:
            y = y + b(bias)
    return y


def _pooled_moments(x: np.ndarray, feature_axes: tuple[int, ...], eps: float):
    """Exact per-feature mean and sqrt(biased variance + eps), two passes."""
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    v = _to_vectors(x, feature_axes, 1)[:, 0, :]
    means = np.empty(v.shape[0])
    stds = np.empty(v.shape[0])
    with np.errstate(all="ignore"):
        for f in range(v.shape[0]):
            mu = np.mean(v[f])
            means[f] = mu
            stds[f] = np.sqrt(np.mean((v[f] - mu) ** 2) + eps)
    return means.reshape(feature_shape), stds.reshape(feature_shape)


def recalibrate(batches: Iterable[ArrayLike], *, feature_axis: FeatureAxis = 1,
                eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Population statistics over ``batches`` (concatenated along axis 0).

    Returns ``(mean, sqrt(biased_var + eps))`` per feature, in float64.
    """
    arrays = [np.asarray(b, dtype=np.float64) for b in batches]
    x = np.concatenate(arrays, axis=0)
    return _pooled_moments(x, _feature_axes(feature_axis, x.ndim), float(eps))


# ---------------------------------------------------------------------------
# Deferred update for recurrent use
# ---------------------------------------------------------------------------


def recurrent_steps(
    xs: Sequence[ArrayLike],
    mean: ArrayLike,
    std: ArrayLike,
    step: int,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Normalize every timestep with the same state, then update the state once.

    Each ``x`` in ``xs`` goes through a :func:`train_step` forward with the SAME
    pre-step ``mean``, ``std`` and ``step`` (``options`` are its keyword options).
    The state then moves once, with rate ``momentum``, toward the pooled mean and
    ``sqrt(pooled biased variance + eps)`` of all timesteps concatenated along
    axis 0; ``step`` increases by one. A feature whose pooled mean or std is not
    finite keeps its statistics. Returns ``{"ys", "mean", "std", "step", "finite"}``.
    """
    xs = [np.asarray(x, dtype=np.float64) for x in xs]
    mean, std = _f64(mean), _f64(std)
    ys = [train_step(x, mean, std, step, weight, bias, **options)["y"] for x in xs]

    eps = float(options.get("eps", 1e-3))
    momentum = float(options.get("momentum", 0.01))
    x_all = np.concatenate(xs, axis=0)
    feature_axes = _feature_axes(options.get("feature_axis", 1), x_all.ndim)
    pooled_mean, pooled_std = _pooled_moments(x_all, feature_axes, eps)

    with np.errstate(all="ignore"):
        finite = np.isfinite(pooled_mean) & np.isfinite(pooled_std)
        new_mean = np.where(finite, mean + momentum * (pooled_mean - mean), mean)
        new_std = np.where(finite, std + momentum * (pooled_std - std), std)
    return {"ys": ys, "mean": new_mean, "std": new_std, "step": int(step) + 1, "finite": finite}
