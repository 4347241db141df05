"""The conformance cases cover what the suite promises, and are well-formed data.

The coverage is checked on the cases' data and on what the float64 reference does with
it (r and d at their clip bounds, outputs at the output clip), so a case edited into
something weaker fails here rather than silently testing less.
"""

from __future__ import annotations

import numpy as np
import pytest

from portable_brn.conformance import golden, reference
from portable_brn.conformance.cases import representable
from portable_brn.conformance.runner import core_config, schedule

CASES = golden.all_cases()
BY_NAME = {case.name: case for case in CASES}


def _rank(case) -> int:
    return case.ops[0].xs[0].ndim


def _axes(case) -> tuple[int, ...]:
    axis = case.config["feature_axis"]
    return tuple(sorted(a % _rank(case) for a in (axis if isinstance(axis, tuple) else (axis,))))


def _train_trace(case) -> list[dict]:
    """The reference's full output (r, d, batch statistics included) for each training
    op, replaying the case's state the way ``expected`` does."""
    mean, std, step, trace = case.mean, case.std, case.step, []
    for op in case.ops:
        if op.kind == "train":
            out = reference.train_step(op.xs[0], mean, std, step, case.weight, case.bias,
                                       op.dys[0], **case.config)
            mean, std, step = out["mean"], out["std"], out["step"]
            trace.append(out)
        elif op.kind == "recurrent":
            out = reference.recurrent_steps(op.xs, mean, std, step, case.weight, case.bias,
                                            **case.config)
            mean, std, step = out["mean"], out["std"], out["step"]
        elif op.kind == "recalibrate":
            mean, std = op.expected["mean"], op.expected["std"]
    return trace


def _limits(case, step: int) -> tuple[float, float, float]:
    """(r_min, r_max, d_max) of the case at ``step``, from the reference's schedules."""
    r_max = reference.evaluate_schedule(case.config["r_max"], step)
    r_min = case.config["r_min"]
    r_min = 1.0 / r_max if r_min is None else reference.evaluate_schedule(r_min, step)
    return r_min, r_max, reference.evaluate_schedule(case.config["d_max"], step)


def test_names_are_unique_and_every_op_has_expectations() -> None:
    assert len(BY_NAME) == len(CASES)
    for case in CASES:
        assert case.ops and all(op.expected for op in case.ops), case.name


def test_every_input_is_exact_in_bfloat16_and_float16() -> None:
    for case in CASES:
        arrays = [case.mean, case.std, case.weight, case.bias]
        arrays += [a for op in case.ops for a in (*op.xs, *op.dys)]
        for a in arrays:
            if a is not None:
                np.testing.assert_array_equal(representable(a), a, err_msg=case.name)
                finite = a[np.isfinite(a)]
                np.testing.assert_array_equal(finite.astype(np.float16), finite)


def test_layouts() -> None:
    assert {_rank(c) for c in CASES} >= {2, 3, 4, 5}
    assert any(_axes(c) == (0,) for c in CASES), "feature axis first"
    assert any(_axes(c) == (_rank(c) - 1,) and _rank(c) > 2 for c in CASES), "axis last"
    assert any(_axes(c) == (1,) and _rank(c) > 2 for c in CASES), "axis in the middle"
    assert any(len(_axes(c)) > 1 for c in CASES), "a tuple of axes"
    assert any(c.weight is None and c.bias is None for c in CASES), "affine off"


@pytest.mark.parametrize(("name", "quantity", "which"), [
    ("clip_r_binds", "r", "r_max"), ("clip_r_binds", "r", "r_min"),
    ("clip_r_min", "r", "r_min"), ("clip_d_binds", "d", "+d_max"),
    ("clip_d_binds", "d", "-d_max"), ("micro_batch_rank4", "r", "r_max"),
    ("paper_schedule_5000", "d", "+d_max"), ("paper_schedule_5000", "r", "r_max"),
    ("paper_schedule_25000", "d", "-d_max"),
    ("paper_schedule_40000", "r", "r_max"),
])
def test_clips_bind(name: str, quantity: str, which: str) -> None:
    """Some r or d sits at a clip bound that is not the trivial r = 1 or d = 0."""
    case = BY_NAME[name]
    hits = 0
    for out in _train_trace(case):
        r_min, r_max, d_max = _limits(case, out["step"] - 1)
        if r_max == 1.0 or d_max == 0.0:
            continue
        bound = {"r_max": r_max, "r_min": r_min, "+d_max": d_max, "-d_max": -d_max}[which]
        hits += int(np.sum(np.isclose(out[quantity], bound, rtol=0, atol=1e-15)))
    assert hits, f"{quantity} never at {which} in {name}"


def test_warmup_crosses_into_renormalization() -> None:
    case = BY_NAME["warmup"]
    trace = _train_trace(case)
    steps = [out["step"] - 1 for out in trace]
    assert min(steps) < case.config["warmup_steps"] <= max(steps)
    warm = [out["step"] - 1 < case.config["warmup_steps"] for out in trace]
    assert all(np.all(o["r"] == 1.0) and np.all(o["d"] == 0.0)
               for o, w in zip(trace, warm, strict=True) if w)
    assert any(np.any(o["r"] != 1.0) for o, w in zip(trace, warm, strict=True) if not w)


@pytest.mark.parametrize(("name", "breakpoint"), [
    ("paper_schedule_5000", 5000), ("paper_schedule_25000", 25000),
    ("paper_schedule_40000", 40000)])
def test_paper_schedule_cases_straddle_a_breakpoint(name: str, breakpoint: int) -> None:
    case = BY_NAME[name]
    assert case.config["r_max"] == {"kind": "paper_r_max"}
    assert case.config["d_max"] == {"kind": "paper_d_max"}
    steps = [out["step"] - 1 for out in _train_trace(case)]
    assert min(steps) < breakpoint < max(steps)


def test_options_are_covered() -> None:
    kinds = {op.kind for c in CASES for op in c.ops}
    assert kinds == {"train", "infer", "recurrent", "recalibrate"}
    assert any(c.config["micro_batch"] for c in CASES)
    assert any(isinstance(c.config["r_min"], dict) for c in CASES)
    assert any(c.config["r_max"] == {"kind": "paper_r_max"} for c in CASES)
    assert any(isinstance(c.config["r_max"], dict) and c.config["r_max"]["kind"] == "linear"
               for c in CASES)


def test_output_clip_binds() -> None:
    case = BY_NAME["output_clip"]
    low, high = case.config["output_clip"]
    shape = [1] * _rank(case)
    shape[1] = -1
    weight, bias = case.weight.reshape(shape), case.bias.reshape(shape)
    z = [(op.expected["y"] - bias) / weight for op in case.ops if op.kind == "train"]
    assert any(np.any(np.isclose(zi, low)) and np.any(np.isclose(zi, high)) for zi in z)


def test_nonfinite_batches_are_flagged_and_skipped() -> None:
    flagged = [op for c in CASES for op in c.ops if "finite" in op.expected
               and not np.all(op.expected["finite"])]
    nan_or_inf = [a for op in flagged for a in op.xs if not np.all(np.isfinite(a))]
    assert any(np.isnan(a).any() for a in nan_or_inf)
    assert any(np.isinf(a).any() for a in nan_or_inf)
    assert any(op.kind == "recurrent" for op in flagged)


def test_long_run_interleaves_fifty_training_steps_with_inference() -> None:
    kinds = [op.kind for op in BY_NAME["long_run"].ops]
    assert kinds.count("train") >= 50
    first, last = kinds.index("train"), len(kinds) - 1 - kinds[::-1].index("train")
    assert kinds[first:last].count("infer") >= 49


def test_configs_map_to_the_core() -> None:
    for case in CASES:
        config = core_config(case.config)
        for name in ("r_max", "d_max", "r_min"):
            spec = case.config[name]
            if isinstance(spec, dict):
                for step in (0, 4, 4999, 5000, 5001, 24999, 25000, 39999, 40000, 50000):
                    core = schedule(spec)(np.asarray(float(step)))
                    assert float(core) == pytest.approx(
                        reference.evaluate_schedule(spec, step), rel=1e-15, abs=1e-15)
        assert config.feature_axis == case.config["feature_axis"]
