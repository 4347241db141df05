"""The named cases: small, seeded programs of calls on one Batch Renormalization layer.

A case is plain data: a config dict in the reference's keyword vocabulary (schedules
as spec dicts such as ``{"kind": "linear", ...}`` or ``{"kind": "paper_r_max"}``), the
initial state and parameters, and a sequence of operations (training steps with an
upstream gradient, inference calls, deferred recurrent updates, recalibrations).  The
expected results are filled in from the float64 reference (see ``golden``), stored in
``golden.npz`` and read back from there by every run.

``build_large_cases`` adds two cases too large to commit, built the same way.

Every input value is rounded to 8 significant bits, so it is exactly representable in
bfloat16, float16, float32 and float64: a backend running in any of those dtypes sees
exactly the data the reference saw, and one set of expected values serves them all.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

__all__ = ["Case", "Op", "Outputs", "build_cases", "build_large_cases", "representable"]

Outputs = dict[str, np.ndarray]  # one op's results by name (see ``expected``)

_DEFAULT_CONFIG: dict[str, Any] = {
    "feature_axis": 1, "eps": 1e-3, "momentum": 0.1, "r_max": 3.0, "d_max": 5.0,
    "r_min": None, "warmup_steps": 0, "micro_batch": None, "output_clip": None,
}


@dataclass(frozen=True)
class Op:
    """One call on the layer.

    ``train``: ``xs = (x,)``, ``dys = (dy,)``; ``infer``: ``xs = (x,)``; ``recurrent``:
    ``xs`` are the timesteps (one shape), normalized with one state then one deferred
    update; ``recalibrate``: ``xs`` are the batches whose pooled statistics replace the
    state.  ``expected`` maps output names to reference values (empty until filled).
    """

    kind: str
    xs: tuple[np.ndarray, ...]
    dys: tuple[np.ndarray, ...] = ()
    expected: Mapping[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """A named program: ``config``, initial ``mean``/``std``/``step``, ``weight`` and
    ``bias`` (both ``None`` when the layer is not affine) and the ``ops`` to run."""

    name: str
    about: str
    config: Mapping[str, Any]
    mean: np.ndarray
    std: np.ndarray
    step: int
    weight: np.ndarray | None
    bias: np.ndarray | None
    ops: tuple[Op, ...]

    @property
    def has_nonfinite(self) -> bool:
        """Whether some input holds NaN or Inf (eager libraries then warn)."""
        return any(not np.all(np.isfinite(a)) for op in self.ops for a in op.xs)

    def with_expected(self, expected: tuple[Mapping[str, np.ndarray], ...]) -> Case:
        """This case with ``expected`` (one mapping per op) filled in."""
        ops = tuple(replace(op, expected=dict(e)) for op, e in zip(self.ops, expected,
                                                                  strict=True))
        return replace(self, ops=ops)


def representable(a: Any) -> np.ndarray:
    """``a`` rounded to 8 significant bits, magnitudes below 2**-12 flushed to zero:
    exact in bfloat16, float16, float32 and float64 (NaN and Inf pass through)."""
    a = np.asarray(a, dtype=np.float64)
    mantissa, exponent = np.frexp(a)
    rounded = np.ldexp(np.round(mantissa * 256.0) / 256.0, exponent)
    rounded = np.where(np.isfinite(a), rounded, a)
    return np.where(np.abs(rounded) < 2.0**-12, 0.0, rounded)


class _Maker:
    """Seeded input factory for one case (the seed is derived from the case's name)."""

    def __init__(self, name: str, shape: tuple[int, ...], feature_axis: Any):
        self.rng = np.random.default_rng(zlib.crc32(name.encode()))
        self.shape = shape
        axes = feature_axis if isinstance(feature_axis, tuple) else (feature_axis,)
        self.axes = tuple(sorted(a % len(shape) for a in axes))
        self.features = tuple(shape[a] for a in self.axes)

    def per_feature(self, values: Any) -> np.ndarray:
        """Per-feature ``values`` (scalar or feature-shaped) broadcast against the input."""
        values = np.broadcast_to(np.asarray(values, dtype=np.float64), self.features)
        view = [self.shape[a] if a in self.axes else 1 for a in range(len(self.shape))]
        return values.reshape(view)

    def uniform(self, low: float, high: float) -> np.ndarray:
        """A feature-shaped array drawn uniformly."""
        return representable(self.rng.uniform(low, high, self.features))

    def batch(self, loc: Any = 0.0, scale: Any = 1.0, rows: int | None = None) -> np.ndarray:
        """Normal data with per-feature ``loc`` and ``scale``; ``rows`` overrides axis 0."""
        shape = self.shape if rows is None else (rows, *self.shape[1:])
        noise = self.rng.standard_normal(shape)
        return representable(self.per_feature(loc) + self.per_feature(scale) * noise)

    def grad(self) -> np.ndarray:
        """An upstream gradient ``dy``."""
        return representable(self.rng.standard_normal(self.shape))

    def train(self, loc: Any = 0.0, scale: Any = 1.0) -> Op:
        return Op("train", (self.batch(loc, scale),), (self.grad(),))

    def infer(self, loc: Any = 0.0, scale: Any = 1.0) -> Op:
        return Op("infer", (self.batch(loc, scale),))


def _case(name: str, about: str, shape: tuple[int, ...], program: Callable[[_Maker], list[Op]],
          *, affine: bool = True, step: int = 0, state: tuple[Any, Any] | None = None,
          **config: Any) -> Case:
    """Build one case; ``state`` is the initial ``(mean, std)`` (random when omitted)."""
    config = {**_DEFAULT_CONFIG, **config}
    maker = _Maker(name, shape, config["feature_axis"])
    if state is None:
        mean, std = maker.uniform(-0.5, 0.5), maker.uniform(0.6, 1.6)
    else:
        mean = representable(np.broadcast_to(state[0], maker.features))
        std = representable(np.broadcast_to(state[1], maker.features))
    weight = maker.uniform(0.5, 1.5) if affine else None
    bias = maker.uniform(-0.5, 0.5) if affine else None
    return Case(name, about, config, mean, std, step, weight, bias, tuple(program(maker)))


def _steps(n: int, **batch: Any) -> Callable[[_Maker], list[Op]]:
    """``n`` training steps, then one inference call."""
    return lambda m: [m.train(**batch) for _ in range(n)] + [m.infer(**batch)]


def _nonfinite(m: _Maker) -> list[Op]:
    """NaN in feature 1, +Inf in feature 3, then a finite step, inference with a NaN."""
    nan_x, inf_x, infer_x = m.batch(), m.batch(), m.batch()
    nan_x[2, 1], inf_x[0, 3], infer_x[3, 2] = np.nan, np.inf, np.nan
    return [Op("train", (nan_x,), (m.grad(),)), Op("train", (inf_x,), (m.grad(),)),
            m.train(), Op("infer", (infer_x,))]


def _recurrent(m: _Maker) -> list[Op]:
    """Two deferred updates over four timesteps each, inference between, a deferred
    update with a NaN in one timestep, a plain step."""
    def timesteps() -> list[np.ndarray]:
        return [m.batch(loc=0.3 * t, scale=1.0 + 0.2 * t) for t in range(4)]
    with_nan = timesteps()
    with_nan[2][1, 0] = np.nan
    return [Op("recurrent", tuple(timesteps())), m.infer(), Op("recurrent", tuple(timesteps())),
            Op("recurrent", tuple(with_nan)), m.train(), m.infer()]


def _recalibration(m: _Maker) -> list[Op]:
    """Two steps, recalibration on a shifted domain (batches of 5, 8 and 3), then use."""
    shifted = {"loc": [1.5, -2.0, 0.5], "scale": [2.0, 0.5, 1.0]}
    batches = tuple(m.batch(rows=n, **shifted) for n in (5, 8, 3))
    return [m.train(), m.train(), Op("recalibrate", batches), m.infer(**shifted),
            m.train(**shifted)]


def _long_run(m: _Maker) -> list[Op]:
    """55 training steps, each followed by inference, on slowly drifting data."""
    ops = []
    for t in range(55):
        loc = 2.0 * math.sin(t / 9.0) * np.array([1.0, -1.0, 0.5])
        scale = 1.0 + 0.8 * math.cos(t / 7.0) * np.array([1.0, 0.5, -0.5])
        ops += [m.train(loc, scale), m.infer(loc, scale)]
    return ops


def build_cases() -> tuple[Case, ...]:
    """Every named case, without expected values (deterministic: seeded by name)."""
    far = {"loc": [3.0, -4.0, 0.1, 1.0], "scale": [4.0, 0.25, 1.0, 2.5]}
    paper = {"r_max": {"kind": "paper_r_max"}, "d_max": {"kind": "paper_d_max"}}
    paper_data = {"loc": [8.0, -9.0, 0.2, 0.5], "scale": [6.0, 0.5, 1.0, 1.0]}
    return (
        _case("rank2_features_last", "rank 2, feature axis -1", (12, 4), _steps(3),
              feature_axis=-1),
        _case("rank3_features_middle", "rank 3, feature axis 1", (6, 3, 5), _steps(3)),
        _case("rank3_features_first", "rank 3, feature axis 0 (features first)", (3, 6, 5),
              _steps(3), feature_axis=0),
        _case("rank4_channels_first", "rank 4, NCHW", (4, 3, 3, 3), _steps(3)),
        _case("rank4_channels_last", "rank 4, NHWC", (3, 2, 3, 5), _steps(3),
              feature_axis=-1),
        _case("rank5_channels_first", "rank 5, NCDHW", (2, 3, 2, 3, 3), _steps(2)),
        _case("rank4_tuple_axes", "rank 4, feature_axis (1, 3)", (4, 3, 3, 2), _steps(3),
              feature_axis=(1, 3)),
        _case("rank5_tuple_axes", "rank 5, feature_axis (1, -1)", (3, 2, 3, 2, 2), _steps(2),
              feature_axis=(1, -1)),
        _case("no_affine", "affine off: no weight, no bias", (8, 3, 4), _steps(3),
              affine=False),
        _case("clip_r_binds", "r clipped at r_max and at 1/r_max", (16, 4), _steps(3, **far),
              r_max=2.0, d_max=100.0, state=(far["loc"], 1.0)),
        _case("clip_r_min", "explicit r_min (a constant spec) binding", (16, 4),
              _steps(3, **far), r_max=1.5, r_min={"kind": "constant", "value": 0.75},
              d_max=100.0, state=(far["loc"], 1.0)),
        _case("clip_d_binds", "d clipped at -d_max and +d_max", (16, 4), _steps(3, **far),
              d_max=1.0, r_max=100.0, state=(0.0, 1.0)),
        _case("warmup", "warm-up: r = 1, d = 0 for 3 steps, then clipped renorm", (16, 4),
              _steps(5, **far), warmup_steps=3, r_max=2.0, d_max=1.0, state=(0.0, 1.0)),
        _case("paper_schedule_5000", "paper schedule, steps 4998-5001 (renorm starts)",
              (16, 4), _steps(4, **paper_data), step=4998, state=(0.0, 1.0), **paper),
        _case("paper_schedule_25000", "paper schedule, steps 24998-25001 (d_max reaches 5)",
              (16, 4), _steps(4, **paper_data), step=24998, state=(0.0, 1.0), **paper),
        _case("paper_schedule_40000", "paper schedule, steps 39998-40001 (r_max reaches 3)",
              (16, 4), _steps(4, **paper_data), step=39998, state=(0.0, 1.0), **paper),
        _case("linear_schedules", "linear r_max, d_max and r_min specs", (16, 4),
              _steps(8, **far), state=(0.0, 1.0),
              r_max={"kind": "linear", "start_value": 1.0, "end_value": 4.0,
                     "start_step": 2, "end_step": 6},
              d_max={"kind": "linear", "start_value": 0.0, "end_value": 2.0,
                     "start_step": 0, "end_step": 8},
              r_min={"kind": "linear", "start_value": 1.0, "end_value": 0.25,
                     "start_step": 2, "end_step": 6}),
        _case("micro_batch", "micro-batches of 4 in a batch of 16", (16, 3), _steps(3),
              micro_batch=4),
        _case("micro_batch_rank4", "micro-batches of 2, rank 4, clips binding per group",
              (8, 2, 3, 3), _steps(3, loc=[2.0, -1.0], scale=[3.0, 0.2]), micro_batch=2,
              r_max=1.5, d_max=0.5),
        _case("output_clip", "output clipped to (-1, 1.25)", (16, 3), _steps(3),
              output_clip=(-1.0, 1.25)),
        _case("recurrent_deferred", "deferred updates over 4 timesteps, one with a NaN",
              (6, 3),
              _recurrent),
        _case("recalibration", "recalibration on a new domain, rank 3", (6, 3, 2),
              _recalibration),
        _case("nonfinite", "NaN and Inf batches leave the moving statistics alone", (8, 4),
              _nonfinite),
        _case("large_mean", "mean 3.5 std from zero, channels last", (6, 2, 2, 3),
              _steps(3, loc=3.5, scale=1.0), feature_axis=-1, state=(3.0, 1.0)),
        _case("long_run", "55 training steps interleaved with inference, warm-up and "
              "linear ramps, drifting data", (8, 3, 2), _long_run, momentum=0.05,
              warmup_steps=5,
              r_max={"kind": "linear", "start_value": 1.0, "end_value": 3.0,
                     "start_step": 5, "end_step": 30},
              d_max={"kind": "linear", "start_value": 0.0, "end_value": 2.0,
                     "start_step": 5, "end_step": 20}),
        _case("infinite_limits", "r_max = d_max = inf: no clipping after 2 warm-up steps",
              (16, 4), _steps(4, **far), r_max=math.inf, d_max=math.inf, warmup_steps=2,
              state=(0.0, 1.0)),
        _case("infinite_schedules", "linear r_max and d_max ramps to inf over steps 1-3",
              (16, 4), _steps(5, **far), state=(0.0, 1.0),
              r_max={"kind": "linear", "start_value": 1.0, "end_value": math.inf,
                     "start_step": 1, "end_step": 3},
              d_max={"kind": "linear", "start_value": 0.0, "end_value": math.inf,
                     "start_step": 1, "end_step": 3}),
    )


def build_large_cases() -> tuple[Case, ...]:
    """Cases too large to commit (millions of values): long reductions, where the order
    of summation shows in float32, and inputs the NumPy kernel splits into blocks.
    Their expected values are computed when loaded (see ``golden.all_cases``)."""
    return (
        _case("large_channels_last", "NHWC with 131072 values per feature", (32, 64, 64, 2),
              _steps(2, loc=[2.0, -0.5], scale=[0.5, 2.0]),
              feature_axis=-1, r_max=1.5, d_max=0.5),
        _case("large_channels_first", "NCHW with 32768 values per feature, several blocks",
              (32, 8, 32, 32), _steps(2, loc=0.5), r_max=1.5, d_max=0.5),
    )
