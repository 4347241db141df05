"""Fuzzing where state enters (issue 13, item 10): every state given to the array layer's
``load_state_dict`` or as the Flax layers' ``batch_stats`` either loads (then it is used
exactly as given, as the reference says) or raises a clear error and changes nothing.

Each test decides independently, from the values drawn, whether the state is a valid one
(keys, shapes, real floating finite statistics, std > 0, a non-negative integer step) and
checks that the layer agrees."""

from __future__ import annotations

import re
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portable_brn.adapters.array import BatchRenorm
from portable_brn.conformance import reference as ref

from conftest import rel_err

FEATURES = 3
SHAPES = [(FEATURES,), (), (2,), (4,), (FEATURES, 1)]
DTYPES = ["float16", "float32", "float64", "int32", "int64", "bool", "complex64", "uint8"]
VALUES = [0.0, 1.0, -1.0, 2.7, -5.0, 3.0, 0.5, 1e-300, 1e-45, 7e4, 1e300, np.nan, np.inf,
          -np.inf]
STAT_KEYS = ("mean", "std")
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _cast(values: list[float], shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """``values`` as an array of ``shape`` and ``dtype`` (NaN to int as NumPy casts it)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return np.asarray(values, dtype=np.float64).reshape(shape).astype(dtype)


@st.composite
def _entry(draw: Any, shape: tuple[int, ...], dtype: str, *, positive: bool = False,
           integer: bool = False) -> np.ndarray:
    """Mostly a valid entry of ``shape`` and ``dtype``, else one bad in shape, dtype or
    values (drawn from values that break something: NaN, Inf, 0, negative, huge, tiny).
    Most entries valid, so that whole states are often valid too."""
    if draw(st.integers(0, 6)):  # valid, 6 times in 7
        if integer:
            return np.asarray(draw(st.integers(0, 10**6)), dtype=dtype)
        low = 0.25 if positive else -4.0
        values = draw(st.lists(st.floats(low, 4.0), min_size=int(np.prod(shape)),
                               max_size=int(np.prod(shape))))
        return _cast(values, shape, dtype)
    shape = draw(st.sampled_from([shape, shape, *SHAPES]))
    dtype = draw(st.sampled_from([dtype, *DTYPES]))
    values = draw(st.lists(st.sampled_from(VALUES), min_size=int(np.prod(shape)),
                           max_size=int(np.prod(shape))))
    return _cast(values, shape, dtype)


@st.composite
def _keys(draw: Any, entries: dict[str, Any]) -> dict[str, Any]:
    """``entries`` with, now and then, one left out or an unexpected one added."""
    entries = dict(entries)
    if draw(st.integers(0, 9)) == 0:
        del entries[draw(st.sampled_from(sorted(entries)))]
    if draw(st.integers(0, 9)) == 0:
        entries[draw(st.sampled_from(["running_var", "extra", "var"]))] = np.ones(FEATURES)
    return entries


# --- the array layer's load_state_dict ---------------------------------------------------

LAYER_KEYS = ("running_mean", "running_std", "num_batches_tracked", "weight", "bias")


@st.composite
def _state_dicts(draw: Any, dtype: str) -> dict[str, Any]:
    entries = {"running_mean": draw(_entry((FEATURES,), dtype)),
               "running_std": draw(_entry((FEATURES,), dtype, positive=True)),
               "num_batches_tracked": draw(_entry((), "int64", integer=True)),
               "weight": draw(_entry((FEATURES,), dtype)),
               "bias": draw(_entry((FEATURES,), dtype))}
    return draw(_keys(entries))


def _layer_accepts(entries: dict[str, Any], dtype: str) -> bool:
    """Whether a state dict is valid for a layer whose arrays are ``dtype``."""
    if set(entries) != set(LAYER_KEYS):
        return False
    big = np.finfo(dtype).max
    for key, value in entries.items():
        value = np.asarray(value)
        if value.shape != (() if key == "num_batches_tracked" else (FEATURES,)):
            return False
        if key == "num_batches_tracked":
            whole = value.dtype.kind in "iu" or (value.dtype.kind == "f" and np.isfinite(value)
                                                 and float(value) == int(value))
            if not whole or value < 0 or int(value) > np.iinfo(np.int64).max:
                return False  # the layer's step is int64
            continue
        if value.dtype.kind != "f" or not np.all(np.isfinite(value)):
            return False
        too_big = np.max(np.abs(value.astype(np.float64))) > big
        if too_big or (key == "running_std" and not np.all(value.astype(dtype) > 0)):
            return False
    return True


@pytest.mark.parametrize("step", [np.float16(0.0), np.float16(2048.0), np.float32(1e6)])
def test_array_layer_loads_a_whole_floating_step(step: Any) -> None:
    """A step saved as a whole float loads without casting the int64 bound to its dtype
    (float16's overflowed: a draw the fuzz test below found)."""
    layer = BatchRenorm(FEATURES, xp=np, dtype=np.dtype("float32"))
    entries = {**layer.state_dict(), "num_batches_tracked": np.array(step)}
    layer.load_state_dict(entries)
    assert int(layer.state_dict()["num_batches_tracked"]) == int(step)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@FUZZ
@given(data=st.data())
def test_array_layer_load_state_dict(dtype: str, data: Any) -> None:
    layer = BatchRenorm(FEATURES, xp=np, dtype=np.dtype(dtype))
    layer.forward(np.random.default_rng(0).standard_normal((6, FEATURES)).astype(dtype))
    before = layer.state_dict()
    entries = data.draw(_state_dicts(dtype))
    valid = _layer_accepts(entries, dtype)
    try:
        layer.load_state_dict(entries)
    except (KeyError, TypeError, ValueError) as error:
        assert not valid, f"a valid state dict was refused: {error}"
        message = str(error)
        assert message.startswith(LAYER_KEYS) or "state dict mismatch" in message, message
        after = layer.state_dict()
        for key, array in before.items():
            np.testing.assert_array_equal(after[key], array, err_msg=key)
        return
    assert valid, f"an invalid state dict loaded: {entries}"
    loaded = layer.state_dict()
    for key in LAYER_KEYS:
        wanted = np.asarray(entries[key])
        if key == "num_batches_tracked":
            assert int(loaded[key]) == int(wanted) and loaded[key].dtype.kind == "i"
        else:
            assert loaded[key].dtype == dtype
            np.testing.assert_array_equal(loaded[key], wanted.astype(dtype), err_msg=key)
    if float(np.min(loaded["running_std"])) * float(np.finfo(dtype).max) < 1.0:
        return  # 1 / std overflows the dtype (a denormal std): inference is inf, as in numpy
    x = np.random.default_rng(1).standard_normal((6, FEATURES))
    y = layer.forward(x.astype(dtype), training=False)
    expected = ref.infer(x.astype(dtype), loaded["running_mean"], loaded["running_std"],
                         loaded["weight"], loaded["bias"])
    assert rel_err(y, expected) < (1e-5 if dtype == "float32" else 1e-12)


# --- the Flax layers' batch_stats --------------------------------------------------------

X = np.random.default_rng(2).normal(0.5, 2.0, (8, FEATURES)).astype(np.float32)


@st.composite
def _batch_stats(draw: Any) -> dict[str, Any]:
    entries = {"mean": draw(_entry((FEATURES,), "float32")),
               "std": draw(_entry((FEATURES,), "float32", positive=True)),
               "step": draw(_entry((), "int32", integer=True))}
    narrow = {"f": "float32", "i": "int32", "u": "uint32"}  # as JAX holds them, x64 off
    entries = {k: _cast(v, v.shape, narrow[v.dtype.kind]) if v.dtype.itemsize == 8
               and v.dtype.kind in narrow else v for k, v in entries.items()}
    return draw(_keys(entries))


def _flax_accepts(stats: dict[str, Any]) -> bool:
    """Whether ``batch_stats`` are valid (as JAX holds them: float32 at most)."""
    if set(stats) != {"mean", "std", "step"}:
        return False
    step = np.asarray(stats["step"])
    if step.shape != () or step.dtype.kind not in "iu" or step < 0:
        return False
    for key in STAT_KEYS:
        value = np.asarray(stats[key])
        if value.shape != (FEATURES,) or value.dtype.kind != "f":
            return False
        if not np.all(np.isfinite(value)) or (key == "std" and not np.all(value > 0)):
            return False
    return True


def _check_flax_result(stats: dict, y: Any, new: dict | None) -> None:
    """y is the inference (or training step) of the reference with exactly ``stats``."""
    mean, std = (np.asarray(stats[k], np.float64) for k in STAT_KEYS)
    step = int(stats["step"])
    if new is None:
        assert rel_err(np.asarray(y), ref.infer(X, mean, std, feature_axis=-1)) < 1e-5
        return
    expected = ref.train_step(X, mean, std, step, feature_axis=-1, momentum=0.01)
    assert int(new["step"]) == step + 1
    assert rel_err(np.asarray(y), expected["y"]) < 1e-5
    assert rel_err(np.asarray(new["std"]), expected["std"]) < 1e-5


def _flax_error(error: Exception) -> None:
    """A clear error: names the state entry (or the missing/unexpected keys)."""
    assert re.match(r"^(state\.(mean|std|step)|batch_stats must hold)", str(error)), error


@FUZZ
@given(stats=_batch_stats(), training=st.booleans())
def test_flax_linen_batch_stats(stats: dict[str, Any], training: bool) -> None:
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    from portable_brn.adapters.flax import BatchRenorm as LinenBatchRenorm

    module = LinenBatchRenorm(use_running_average=not training, use_scale=False,
                              use_bias=False, momentum=0.99)
    stats = {k: jax.numpy.asarray(v) for k, v in stats.items()}
    valid = _flax_accepts(stats)
    try:
        if training:
            y, updates = module.apply({"batch_stats": stats}, X, mutable=["batch_stats"])
            new = updates["batch_stats"]
        else:
            y, new = module.apply({"batch_stats": stats}, X), None
    except (TypeError, ValueError) as error:
        assert not valid, f"valid batch_stats were refused: {error}"
        _flax_error(error)
        return
    assert valid, f"invalid batch_stats were used: {stats}"
    _check_flax_result(stats, y, new)


@FUZZ
@given(stats=_batch_stats(), training=st.booleans())
def test_flax_nnx_state(stats: dict[str, Any], training: bool) -> None:
    """``NnxBatchRenorm`` state set from outside (assigned to its ``BatchStat`` values, as
    ``nnx.update`` does): a call either uses it exactly or raises and leaves it as set."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    from flax import nnx

    from portable_brn.adapters.flax import NnxBatchRenorm

    model = NnxBatchRenorm(FEATURES, use_scale=False, use_bias=False, momentum=0.99,
                           use_running_average=not training, rngs=nnx.Rngs(0))
    stats = {k: jax.numpy.asarray(v) for k, v in stats.items() if k in ("mean", "std", "step")}
    if set(stats) != {"mean", "std", "step"}:
        return  # nnx state has no missing keys: its variables are attributes
    for key, value in stats.items():
        setattr(model, key, nnx.BatchStat(value))
    valid = _flax_accepts(stats)
    try:
        y = model(X)
    except (TypeError, ValueError) as error:
        assert not valid, f"valid state was refused: {error}"
        _flax_error(error)
        for key, value in stats.items():
            np.testing.assert_array_equal(getattr(model, key)[...], value, err_msg=key)
        return
    assert valid, f"invalid state was used: {stats}"
    new = {k: getattr(model, k)[...] for k in ("mean", "std", "step")} if training else None
    _check_flax_result(stats, y, new)
