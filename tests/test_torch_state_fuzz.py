"""Fuzzing ``load_state_dict`` of the torch layers: every state dict (shapes, dtypes,
values, missing and extra keys, strict or not) either loads and reads back exactly or
raises ``RuntimeError`` naming an offending entry, the layer unchanged.  Whether each
input is acceptable is decided here, independently of the layer's own checks."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_torch_support import random_affine, state_of  # noqa: E402

from portable_brn.adapters.torch import BatchRenorm1d, BatchRenorm2d, SyncBatchRenorm  # noqa: E402

C = 3
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
PRECISION = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
OTHER = [torch.int64, torch.int32, torch.bool, torch.complex64]
EXTRA_KEYS = ["running_var", "last_finite", "momentum_buffer"]

# values: (number, exact in every float dtype?)  dyadic values are, tenths need float64
VALUES = st.one_of(
    st.integers(-32, 32).map(lambda k: (k / 4, True)),
    st.integers(-9, 9).map(lambda k: (k / 10, k == 0)),
    st.sampled_from([(math.nan, True), (math.inf, True), (-math.inf, True)]),
)
STEPS = st.one_of(st.integers(-3, 10).map(float), st.sampled_from([2.7, -0.5, math.nan]))


@st.composite
def entries(draw, name, layer_dtype):
    """One entry: (value, problem) where problem says why it must be refused (or None)."""
    if draw(st.integers(0, 19)) == 0:
        return [0.0] * C, "not a tensor"
    step = name == "num_batches_tracked"
    shape = () if step else (C,)
    if draw(st.integers(0, 9)) == 0:
        shape = draw(st.sampled_from([(), (C + 1,), (C, 1), (1,)]))
    dtype = draw(st.sampled_from(([torch.int64, torch.int32] if step else []) + FLOATS + OTHER))
    count = math.prod(shape)
    if step:
        numbers = [draw(STEPS) for _ in range(count)]
        exact = [True] * count
    else:
        numbers, exact = map(list, zip(*[draw(VALUES) for _ in range(count)], strict=True))
    if not dtype.is_floating_point:
        numbers = [0.0 if not math.isfinite(v) else float(round(v)) for v in numbers]
    value = torch.tensor(numbers, dtype=torch.float64).reshape(shape).to(dtype)
    problem = None
    if shape != (() if step else (C,)):
        problem = "shape"
    elif dtype in (torch.bool, torch.complex64):
        problem = "not real"
    elif step:
        if not all(math.isfinite(v) and v == round(v) and v >= 0 for v in numbers):
            problem = "step"
    elif not dtype.is_floating_point:
        problem = "not floating point"
    elif PRECISION[dtype] > PRECISION[layer_dtype] and not all(exact):
        problem = "inexact"
    elif name.startswith("running") and not all(math.isfinite(v) for v in numbers):
        problem = "non-finite statistic"
    elif name == "running_std" and not all(v > 0 for v in numbers):
        problem = "std <= 0"
    return value, problem


@st.composite
def cases(draw):
    layer_class = draw(st.sampled_from([BatchRenorm1d, BatchRenorm2d, SyncBatchRenorm]))
    layer_dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    layer = random_affine(layer_class(C, affine=draw(st.booleans()), dtype=layer_dtype,
                                      track_running_stats=draw(st.booleans())))
    strict = draw(st.booleans())
    state, problems = {}, []
    for name in layer.state_dict():
        if draw(st.integers(0, 5)) == 0:
            problems += ["missing"] if strict else []
            continue
        state[name], problem = draw(entries(name, layer_dtype))
        problems += [name] if problem else []
    for name in draw(st.lists(st.sampled_from(EXTRA_KEYS), unique=True, max_size=2)):
        if name == "running_var" and "running_std" not in state:
            continue  # a batch-norm dict: it loads converted (tests/test_torch_checkpoints.py)
        state[name] = torch.ones(C)
        problems += ["unexpected"] if strict else []
    return layer, state, strict, problems


@settings(max_examples=300, deadline=None)
@given(cases())
def test_load_state_dict_loads_exactly_or_refuses_leaving_the_layer(case):
    layer, state, strict, problems = case
    before = state_of(layer)
    if problems:
        with pytest.raises(RuntimeError, match=r"Error.*in loading state_dict") as error:
            layer.load_state_dict(state, strict=strict)
        message = str(error.value)
        assert any(f'"{name}": ' in message for name in problems) or (
            "Missing key" in message or "Unexpected key" in message)
        for name, value in before.items():  # nothing of the layer moved
            assert torch.equal(layer.state_dict()[name], value), name
        return
    layer.load_state_dict(state, strict=strict)
    after = layer.state_dict()
    for name, value in before.items():
        if name not in state:
            assert torch.equal(after[name], value), name
            continue
        loaded = after[name]
        assert loaded.dtype == value.dtype and loaded.shape == value.shape
        expected = state[name].to(torch.float64)
        assert torch.allclose(loaded.to(torch.float64), expected, rtol=0.0, atol=0.0,
                              equal_nan=True), name


def test_the_refusals_name_the_entry_and_say_why():
    layer = BatchRenorm2d(C)
    good = layer.state_dict()
    for entry, value, why in [
        ("running_std", torch.zeros(C), "running std must be > 0"),
        ("running_std", -torch.ones(C), "running std must be > 0"),
        ("running_mean", torch.full((C,), math.nan), "not finite"),
        ("num_batches_tracked", torch.tensor(2.7), "whole number"),
        ("num_batches_tracked", torch.tensor(-5), ">= 0"),
        ("weight", torch.ones(C, dtype=torch.complex64), "not real"),
        ("bias", torch.ones(C, dtype=torch.bool), "not real"),
        ("weight", torch.full((C,), 0.1, dtype=torch.float64), "cannot hold exactly"),
        ("running_mean", torch.zeros(C + 1), r"shape \(4,\)"),
    ]:
        with pytest.raises(RuntimeError, match=rf'"{entry}": .*{why}'):
            layer.load_state_dict({**good, entry: value})
    with pytest.raises(RuntimeError, match=r'Unexpected key.*"running_var"'):
        layer.load_state_dict({**good, "running_var": torch.ones(C)})
    with pytest.raises(RuntimeError, match=r'Missing key.*"running_std"'):
        layer.load_state_dict({k: v for k, v in good.items() if k != "running_std"})
    layer.load_state_dict({"num_batches_tracked": torch.tensor(4.0)}, strict=False)
    assert int(layer.num_batches_tracked) == 4
