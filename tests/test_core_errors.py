"""Bad input (specification section 7): the exact error type, a message naming the argument, and
no state change, for the core's functions and for the array layer, on every backend."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from array_api_compat import device

import portable_brn as pb
from portable_brn.adapters.array import BatchRenorm
from portable_brn.conformance import reference as ref
from portable_brn.conformance.arrays import to_numpy

from conftest import BACKEND_NAMES, Backend, rel_err

CONFIG = pb.RenormConfig()


def _setup(backend: Backend, features: int = 3) -> tuple[pb.RenormState, Any, Any]:
    """A float64 state (moved off its defaults) with weight and bias, in ``backend``."""
    state = pb.RenormState(*backend.put(np.linspace(-0.5, 0.5, features),
                                        np.linspace(1.0, 2.0, features), np.asarray(7)))
    return state, *backend.put(np.full(features, 1.5), np.full(features, -0.25))


def _host(backend: Backend, arrays: Any) -> list[np.ndarray | None]:
    """Host copies of ``arrays`` (a state, parameters), to compare before and after."""
    return [backend.get(a) for a in arrays]


def _assert_same(before: list, after: list) -> None:
    """Every array of ``after`` equals the one of ``before`` exactly."""
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(new, old)


TWO_DEVICES = ["strict", "strict-device1"]  # the backends with another device to use


def _on_backends(cases: Any) -> list[Any]:
    """``(backend, case)`` for every case on every backend; a case whose name says
    "device" only on the backends with a second device (NumPy has one)."""
    return [pytest.param(name, case, id=f"{name}-{case}") for name in BACKEND_NAMES
            for case in cases if "device" not in case or name in TWO_DEVICES]


def _elsewhere(backend: Backend, array: np.ndarray, where: str) -> Any:
    """``array`` in another library (``where="library"``) or on another device
    (``"device"``, for the ``TWO_DEVICES`` backends) than ``backend``'s."""
    strict = pytest.importorskip("array_api_strict")
    if where == "library":
        return strict.asarray(array) if backend.name.startswith("numpy") else np.asarray(array)
    assert backend.name in TWO_DEVICES
    other = "CPU_DEVICE" if backend.name == "strict-device1" else "device1"
    return strict.asarray(array, device=strict.Device(other))


# --- forward_train / forward_infer -------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex128])
def test_non_real_floating_x(backend, dtype) -> None:
    state, w, b = _setup(backend)
    before = _host(backend, (*state, w, b))
    for call in (pb.forward_train, pb.forward_infer):
        with pytest.raises(TypeError, match=r"^x must have a real floating dtype"):
            call(backend.put(np.ones((4, 3), dtype)), state, w, b, CONFIG)
    _assert_same(before, _host(backend, (*state, w, b)))


def test_x_without_batch_axis(backend) -> None:
    state, w, b = _setup(backend)
    with pytest.raises(ValueError, match=r"^x must have at least 2 dimensions"):
        pb.forward_train(backend.put(np.ones(3)), state, w, b, pb.RenormConfig(feature_axis=0))


@pytest.mark.parametrize("name", ["state.mean", "state.std", "weight", "bias"])
def test_feature_size_mismatch(backend, name) -> None:
    state, w, b = _setup(backend)
    args = {"state.mean": state.mean, "state.std": state.std, "weight": w, "bias": b}
    args[name] = backend.put(np.ones(4))
    state = pb.RenormState(args["state.mean"], args["state.std"], state.step)
    before = _host(backend, (*state, args["weight"], args["bias"]))
    with pytest.raises(ValueError, match=rf"^{name} has shape \(4,\) but x has \(3,\) features"):
        pb.forward_train(backend.put(np.ones((5, 3))), state, args["weight"], args["bias"],
                         CONFIG)
    _assert_same(before, _host(backend, (*state, args["weight"], args["bias"])))


@pytest.mark.parametrize(("feature_axis", "message"), [
    (2, r"^feature_axis 2 is out of range for an input with 2 dimensions"),
    (-3, r"^feature_axis -3 is out of range"),
    ((1, -1), r"^feature_axis \(1, -1\) names the same axis twice"),
])
def test_feature_axis_out_of_range_or_repeated(backend, feature_axis, message) -> None:
    state, w, b = _setup(backend)
    with pytest.raises(ValueError, match=message):
        pb.forward_train(backend.put(np.ones((5, 3))), state, w, b,
                         pb.RenormConfig(feature_axis=feature_axis))


def test_feature_axis_repeated_at_construction() -> None:
    with pytest.raises(ValueError, match=r"^feature_axis has a repeated axis"):
        pb.RenormConfig(feature_axis=(1, 1))
    with pytest.raises(TypeError, match=r"^feature_axis must be an int"):
        pb.RenormConfig(feature_axis=1.0)


def test_one_value_per_feature_in_training(backend) -> None:
    state, w, b = _setup(backend)
    with pytest.raises(ValueError, match=r"^Expected more than 1 value per feature .*x of "
                                         r"shape \(1, 3\)"):
        pb.forward_train(backend.put(np.ones((1, 3))), state, w, b, CONFIG)
    with pytest.raises(ValueError, match=r"and micro_batch=1$"):
        pb.forward_train(backend.put(np.ones((4, 3))), state, w, b,
                         pb.RenormConfig(micro_batch=1))
    # inference on a single example is fine, and is the reference's
    x = np.full((1, 3), 2.0)
    expected = ref.infer(x, *_host(backend, (state.mean, state.std, w, b)))
    assert rel_err(backend.get(pb.forward_infer(backend.put(x), state, w, b, CONFIG)),
                   expected) < 1e-15


def test_micro_batch_must_divide_batch(backend) -> None:
    state, w, b = _setup(backend)
    with pytest.raises(ValueError, match=r"^micro_batch=4 does not divide the batch size 6"):
        pb.forward_train(backend.put(np.ones((6, 3))), state, w, b,
                         pb.RenormConfig(micro_batch=4))


def test_mixed_libraries(backend) -> None:
    state, w, b = _setup(backend)
    x = _elsewhere(backend, np.ones((4, 3)), "library")
    with pytest.raises(TypeError, match=r"^arrays from different libraries .* x: "):
        pb.forward_train(x, state, w, b, CONFIG)


@pytest.mark.parametrize("backend", TWO_DEVICES, indirect=True)
def test_mixed_devices(backend) -> None:
    state, w, b = _setup(backend)
    x = _elsewhere(backend, np.ones((4, 3)), "device")
    with pytest.raises(ValueError, match=r"^arrays on different devices in one call: x is on"):
        pb.forward_train(x, state, w, b, CONFIG)


@pytest.mark.parametrize(("option", "value", "error"), [
    ("eps", 0.0, ValueError), ("eps", -1e-3, ValueError), ("eps", float("nan"), ValueError),
    ("momentum", 0.0, ValueError), ("momentum", 1.5, ValueError),
    ("r_max", 0.5, ValueError), ("d_max", -1.0, ValueError),
    ("r_min", 0.0, ValueError), ("r_min", 1.5, ValueError),
    ("warmup_steps", -1, ValueError), ("warmup_steps", 2.5, TypeError),
    ("micro_batch", 0, ValueError), ("eps", "small", TypeError),
    ("r_max", pb.schedules.linear(0.5, 2.0, 0, 10), ValueError),
    ("output_clip", (1.0, -1.0), ValueError), ("output_clip", 3.0, TypeError),
])
def test_invalid_hyperparameters(option, value, error) -> None:
    with pytest.raises(error, match=rf"^{option}"):
        pb.RenormConfig(**{option: value})


def test_invalid_schedule_steps() -> None:
    with pytest.raises(ValueError, match=r"start_step < end_step"):
        pb.schedules.linear(1.0, 3.0, 10, 10)


# --- backward ----------------------------------------------------------------------------


BAD_DY = {  # dy for a forward on a (4, 3) x, error, message
    "shape": (lambda b: b.put(np.ones((4, 2))), ValueError, r"^dy has shape \(4, 2\)"),
    "integer": (lambda b: b.put(np.ones((4, 3), np.int32)), TypeError,
                r"^dy must have a real floating"),
    "library": (lambda b: _elsewhere(b, np.ones((4, 3)), "library"), TypeError,
                r"^arrays from different libraries .*dy: "),
    "device": (lambda b: _elsewhere(b, np.ones((4, 3)), "device"), ValueError,
               r"^arrays on different devices in one call: dy is on"),
}


@pytest.mark.parametrize(("backend", "case"), _on_backends(BAD_DY), indirect=["backend"])
def test_backward_bad_dy(backend, case) -> None:
    dy, error, message = BAD_DY[case]
    state, w, b = _setup(backend)
    _, _, residuals = pb.forward_train(backend.put(np.eye(4, 3)), state, w, b, CONFIG)
    with pytest.raises(error, match=message):
        pb.backward(residuals, dy(backend))


# --- moments, update_state, deferred_update, recalibrate ---------------------------------


def test_moments_rejects_non_floating_and_non_arrays(backend) -> None:
    with pytest.raises(TypeError, match=r"^x must have a real floating dtype .* got \S*int32$"):
        pb.moments(backend.put(np.ones((4, 3), np.int32)))
    with pytest.raises(TypeError, match=r"^x must be an array of an Array API library, got "
                                        r"builtins\.list"):
        pb.moments([[1.0, 2.0], [3.0, 4.0]])


@pytest.mark.parametrize("name", ["state.std", "batch_mean", "batch_std"])
def test_update_state_feature_size_mismatch(backend, name) -> None:
    state, _, _ = _setup(backend)
    args = {"state.std": state.std, "batch_mean": backend.put(np.zeros(3)),
            "batch_std": backend.put(np.ones(3))}
    args[name] = backend.put(np.ones(4))
    state = pb.RenormState(state.mean, args["state.std"], state.step)
    before = _host(backend, state)
    with pytest.raises(ValueError, match=rf"^{name} has shape \(4,\) but state\.mean has "
                                         r"\(3,\) features"):
        pb.update_state(state, args["batch_mean"], args["batch_std"], CONFIG)
    _assert_same(before, _host(backend, state))


@pytest.mark.parametrize(("backend", "where"), _on_backends(["library", "device"]),
                         indirect=["backend"])
def test_update_state_mixed_library_or_device(backend, where) -> None:
    state, _, _ = _setup(backend)
    before = _host(backend, state)
    error, message = ((TypeError, r"^arrays from different libraries .*batch_std: ")
                      if where == "library" else
                      (ValueError, r"^arrays on different devices in one call: .* but "
                                   r"batch_std is on"))
    with pytest.raises(error, match=message):
        pb.update_state(state, backend.put(np.zeros(3)),
                        _elsewhere(backend, np.ones(3), where), CONFIG)
    with pytest.raises(TypeError, match=r"^batch_mean must have a real floating dtype"):
        pb.update_state(state, backend.put(np.zeros(3, np.int32)), backend.put(np.ones(3)),
                        CONFIG)
    _assert_same(before, _host(backend, state))


def test_deferred_update_bad_parts(backend) -> None:
    state, _, _ = _setup(backend)
    before = _host(backend, state)

    def part(features: int) -> pb.Moments:
        return pb.Moments(*backend.put(np.zeros(features), np.ones(features)), 4)

    with pytest.raises(ValueError, match=r"^parts has shape \(4,\) but state\.mean has \(3,\)"):
        pb.deferred_update(state, [part(4), part(4)], CONFIG)
    with pytest.raises(ValueError, match=r"^parts\[1\] has shape \(4,\) but parts\[0\] has "
                                         r"\(3,\) features"):
        pb.deferred_update(state, [part(3), part(4)], CONFIG)
    with pytest.raises(ValueError, match=r"^parts must not be empty, got nothing to merge"):
        pb.deferred_update(state, [], CONFIG)
    _assert_same(before, _host(backend, state))


MIXED_BATCHES = {
    "library": (TypeError, r"^arrays from different libraries .*batches\[0\]: .*batches\[1\]: "),
    "device": (ValueError, r"^arrays on different devices in one call: batches\[0\] is on .* "
                           r"but batches\[1\] is on"),
}


@pytest.mark.parametrize(("backend", "where"), _on_backends(MIXED_BATCHES), indirect=["backend"])
def test_recalibrate_mixed_batches(backend, where) -> None:
    error, message = MIXED_BATCHES[where]
    batches = [backend.put(np.ones((4, 3))), _elsewhere(backend, np.zeros((5, 3)), where)]
    with pytest.raises(error, match=message):
        pb.recalibrate(batches, CONFIG)


def test_recalibrate_bad_batches_and_state(backend) -> None:
    state, _, _ = _setup(backend)
    before = _host(backend, state)
    good = backend.put(np.eye(4, 3))
    with pytest.raises(TypeError, match=r"^batches\[1\] must have a real floating dtype"):
        pb.recalibrate([good, backend.put(np.ones((4, 3), np.int32))], CONFIG, state=state)
    with pytest.raises(ValueError, match=r"^batches\[1\] has shape \(2,\) but batches\[0\] "
                                         r"has \(3,\) features"):
        pb.recalibrate([good, backend.put(np.ones((4, 2)))], CONFIG, state=state)
    with pytest.raises(ValueError, match=r"^state\.mean has shape \(3,\) but batches has "
                                         r"\(2,\) features"):
        pb.recalibrate([backend.put(np.ones((4, 2)))], CONFIG, state=state)
    other = pb.RenormState(*(_elsewhere(backend, a, "library") for a in before))
    with pytest.raises(TypeError, match=r"^arrays from different libraries .*batches: .*"
                                        r"state\.mean: "):
        pb.recalibrate([good], CONFIG, state=other)
    _assert_same(before, _host(backend, state))


def test_recalibrate_keeps_every_array_on_the_batches_device(backend) -> None:
    batches = [np.random.default_rng(i).normal(i, 1.0 + i, (3 + i, 3, 2)) for i in range(3)]
    moved = [backend.put(b) for b in batches]
    state = pb.recalibrate(moved, CONFIG)
    assert {device(a) for a in state} == {device(moved[0])}
    mean, std = ref.recalibrate(batches, eps=CONFIG.eps)
    assert rel_err(backend.get(state.mean), mean) < 1e-13
    assert rel_err(backend.get(state.std), std) < 1e-13
    assert int(backend.get(state.step)) == 0


# --- non-finite batches ------------------------------------------------------------------


def test_non_finite_batch_skips_update_per_feature() -> None:
    rng = np.random.default_rng(0)
    state = pb.RenormState(np.array([0.5, -0.5, 0.1]), np.array([2.0, 1.0, 1.5]), np.asarray(3))
    x = rng.standard_normal((8, 3))
    x[2, 1] = np.nan
    x[5, 2] = np.inf
    config = pb.RenormConfig(momentum=0.5)
    with np.errstate(invalid="ignore"):  # inf - inf in the user's own batch
        _, new, residuals = pb.forward_train(x, state, None, None, config)
    np.testing.assert_array_equal(residuals.finite, [True, False, False])
    np.testing.assert_array_equal(new.mean[1:], state.mean[1:])
    np.testing.assert_array_equal(new.std[1:], state.std[1:])
    sigma = np.sqrt(x[:, 0].var() + config.eps)
    np.testing.assert_allclose(new.mean[0], 0.5 + 0.5 * (x[:, 0].mean() - 0.5), rtol=1e-12)
    np.testing.assert_allclose(new.std[0], 2.0 + 0.5 * (sigma - 2.0), rtol=1e-12)
    assert int(new.step) == 4


# --- the array layer ---------------------------------------------------------------------


def _trained_layer(backend: Backend, features: int = 3, shape: tuple[int, ...] = (4, 3),
                   **options: Any) -> BatchRenorm:
    """A float64 array layer in ``backend`` after one training step and its backward."""
    layer = BatchRenorm(features, dtype=backend.xp.float64, **options)
    rng = np.random.default_rng(1)
    layer.forward(backend.put(rng.standard_normal(shape)))
    layer.backward(backend.put(rng.standard_normal(shape)))
    return layer


def _layer_snapshot(layer: BatchRenorm) -> dict[str, Any]:
    """Everything a failing call must leave as it was, on the host."""
    return {**layer.state_dict(), "grad_weight": to_numpy(layer.grad_weight),
            "grad_bias": to_numpy(layer.grad_bias),
            "nonfinite_batches": layer.nonfinite_batches, "residuals": id(layer._residuals)}


def _assert_snapshot(before: dict[str, Any], layer: BatchRenorm) -> None:
    after = _layer_snapshot(layer)
    assert before.keys() == after.keys()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


TRAIN_AND_INFER, TRAIN = (True, False), (True,)
FORWARD_CASES = {  # layer options, bad x, error, message, the modes that check it
    "integer x": ({}, lambda b: b.put(np.ones((4, 3), np.int32)), TypeError,
                  r"^x must have a real floating dtype", TRAIN_AND_INFER),
    "non-array x": ({}, lambda b: [[1.0, 2.0, 3.0]] * 4, TypeError,
                    r"^arrays from different libraries \(or non-arrays\) in one call: "
                    r"x: builtins\.list", TRAIN_AND_INFER),
    "feature size": ({}, lambda b: b.put(np.ones((4, 5))), ValueError,
                     r"^state\.mean has shape \(3,\) but x has \(5,\) features", TRAIN_AND_INFER),
    "one value per feature": ({}, lambda b: b.put(np.ones((1, 3))), ValueError,
                              r"^Expected more than 1 value per feature .*x of shape", TRAIN),
    "mixed library": ({}, lambda b: _elsewhere(b, np.ones((4, 3)), "library"), TypeError,
                      r"^arrays from different libraries .* x: ", TRAIN_AND_INFER),
    "mixed device": ({}, lambda b: _elsewhere(b, np.ones((4, 3)), "device"), ValueError,
                     r"^arrays on different devices in one call: x is on", TRAIN_AND_INFER),
    "feature_axis out of range": ({"feature_axis": 2, "shape": (4, 2, 3)},
                                  lambda b: b.put(np.ones((4, 3))), ValueError,
                                  r"^feature_axis 2 is out of range for an input with 2 dim",
                                  TRAIN_AND_INFER),
    "micro_batch does not divide": ({"micro_batch": 4, "shape": (8, 3)},
                                    lambda b: b.put(np.ones((6, 3))), ValueError,
                                    r"^micro_batch=4 does not divide the batch size 6", TRAIN),
}


@pytest.mark.parametrize(("backend", "case"), _on_backends(FORWARD_CASES), indirect=["backend"])
def test_array_layer_forward_rejects_bad_input(backend, case) -> None:
    options, bad, error, message, modes = FORWARD_CASES[case]
    layer = _trained_layer(backend, **options)
    before = _layer_snapshot(layer)
    x = bad(backend)
    for training in modes:
        with pytest.raises(error, match=message):
            layer.forward(x, training=training)
    _assert_snapshot(before, layer)


@pytest.mark.parametrize(("backend", "case"), _on_backends(BAD_DY), indirect=["backend"])
def test_array_layer_backward_rejects_bad_dy(backend, case) -> None:
    dy, error, message = BAD_DY[case]
    layer = _trained_layer(backend)
    before = _layer_snapshot(layer)
    with pytest.raises(error, match=message):
        layer.backward(dy(backend))
    _assert_snapshot(before, layer)


def test_array_layer_load_state_dict_is_all_or_nothing() -> None:
    layer = _trained_layer(Backend("numpy"))
    before = _layer_snapshot(layer)
    saved = layer.state_dict()
    with pytest.raises(ValueError, match=r"^running_std has shape \(4,\), expected \(3,\)"):
        layer.load_state_dict({**saved, "running_std": np.ones(4), "running_mean": saved["bias"]})
    with pytest.raises(KeyError, match=r"missing \['bias'\]"):
        layer.load_state_dict({k: v for k, v in saved.items() if k != "bias"})
    _assert_snapshot(before, layer)


BAD_ENTRIES = {  # entry: (bad value, error, message)
    "fractional step": ("num_batches_tracked", np.asarray(2.7), ValueError,
                        r"^num_batches_tracked must be a non-negative integer, got"),
    "negative step": ("num_batches_tracked", np.asarray(-5), ValueError,
                      r"^num_batches_tracked must be a non-negative integer, got"),
    "boolean step": ("num_batches_tracked", np.asarray(True), ValueError,
                     r"^num_batches_tracked must be a non-negative integer, got"),
    "complex step": ("num_batches_tracked", np.asarray(3 + 0j), ValueError,
                     r"^num_batches_tracked must be a non-negative integer, got"),
    "complex mean": ("running_mean", np.zeros(3, np.complex128), TypeError,
                     r"^running_mean must have a real floating dtype, got complex128"),
    "boolean weight": ("weight", np.ones(3, bool), TypeError,
                       r"^weight must have a real floating dtype, got bool"),
    "integer bias": ("bias", np.zeros(3, np.int64), TypeError,
                     r"^bias must have a real floating dtype, got int64"),
    "zero std": ("running_std", np.array([1.0, 0.0, 1.0]), ValueError,
                 r"^running_std must be positive, got a minimum of"),
    "negative std": ("running_std", np.array([1.0, 2.0, -1.0]), ValueError,
                     r"^running_std must be positive, got a minimum of"),
    "NaN mean": ("running_mean", np.array([0.0, np.nan, 0.0]), ValueError,
                 r"^running_mean holds NaN or Inf"),
    "Inf weight": ("weight", np.array([1.0, np.inf, 1.0]), ValueError,
                   r"^weight holds NaN or Inf"),
    "text": ("bias", "abc", ValueError, r"^bias has shape \(\), expected \(3,\)"),
}


@pytest.mark.parametrize(("backend", "case"), _on_backends(BAD_ENTRIES), indirect=["backend"])
def test_array_layer_load_state_dict_refuses_bad_values(backend, case) -> None:
    """Every entry is checked (issue 13, item 3: a step of 2.7 loaded as 2, a step of -5,
    complex or boolean arrays and a running_std of 0 or below were accepted); the error
    names the entry and the layer is left as it was."""
    key, value, error, message = BAD_ENTRIES[case]
    layer = _trained_layer(backend)
    before = _layer_snapshot(layer)
    with pytest.raises(error, match=message):
        layer.load_state_dict({**layer.state_dict(), key: value})
    _assert_snapshot(before, layer)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("running_std", np.array([1.0, 1e-300, 1.0]), r"^running_std underflows to 0 in the "
                                                  r"layer's float32"),
    ("running_mean", np.array([0.0, 1e300, 0.0]), r"^running_mean overflows the layer's "
                                                  r"float32"),
])
def test_array_layer_load_state_dict_refuses_what_its_dtype_cannot_hold(key, value,
                                                                        message) -> None:
    layer = BatchRenorm(3, xp=np)
    layer.forward(np.eye(4, 3, dtype=np.float32))
    before = layer.state_dict()
    with pytest.raises(ValueError, match=message):
        layer.load_state_dict({**layer.state_dict(), key: value})
    for name, array in layer.state_dict().items():
        np.testing.assert_array_equal(array, before[name], err_msg=name)


def test_array_layer_load_state_dict_takes_integral_steps_and_casts() -> None:
    """An integral float step (a JSON checkpoint) and float32 arrays load; the values
    arrive exactly, in the layer's dtypes."""
    layer = _trained_layer(Backend("numpy"))
    saved = {k: v.astype(np.float32) if v.dtype == np.float64 else v
             for k, v in layer.state_dict().items()}
    layer.load_state_dict({**saved, "num_batches_tracked": np.asarray(12.0)})
    loaded = layer.state_dict()
    assert loaded["num_batches_tracked"] == 12 and loaded["num_batches_tracked"].dtype.kind == "i"
    for key in ("running_mean", "running_std", "weight", "bias"):
        assert loaded[key].dtype == np.float64
        np.testing.assert_array_equal(loaded[key], saved[key].astype(np.float64))
    with pytest.raises(TypeError, match=r"^load_state_dict takes a mapping"):
        layer.load_state_dict(list(saved.items()))


def test_array_layer_counts_and_warns_on_non_finite_batch() -> None:
    layer = BatchRenorm(2, xp=np)
    x = np.ones((4, 2))
    x[0, 0] = np.nan
    with pytest.warns(RuntimeWarning, match=r"non-finite batch statistics in 1 feature"):
        layer.forward(x)
    assert layer.nonfinite_batches == 1
    np.testing.assert_array_equal(layer.last_finite, [False, True])
    assert np.all(np.isfinite(layer.state.mean)) and np.all(np.isfinite(layer.state.std))


def test_array_layer_warning_as_error_finds_the_step_committed(backend) -> None:
    """With ``-W error::RuntimeWarning`` the warning raises after the state, the step and
    the counter moved together: the finite features as the reference says, the others
    left where they were."""
    layer = BatchRenorm(3, dtype=backend.xp.float64, momentum=0.5)
    x = np.random.default_rng(2).standard_normal((6, 3))
    layer.forward(backend.put(x))
    state = _host(backend, layer.state)
    x[1, 2] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(RuntimeWarning, match=r"non-finite batch statistics in 1 feature"):
            layer.forward(backend.put(x))
    expected = ref.train_step(x, state[0], state[1], int(state[2]), momentum=0.5)
    assert layer.nonfinite_batches == 1 and int(backend.get(layer.state.step)) == 2
    np.testing.assert_array_equal(expected["finite"], [True, True, False])
    assert rel_err(backend.get(layer.state.mean), expected["mean"]) < 1e-14
    assert rel_err(backend.get(layer.state.std), expected["std"]) < 1e-14
    np.testing.assert_array_equal(backend.get(layer.state.mean)[2], state[0][2])
    dx = layer.backward(backend.put(np.ones((6, 3))))  # the residuals are this step's
    assert np.all(np.isnan(backend.get(dx)[:, 2]))


def test_array_layer_bad_first_input_binds_nothing(backend) -> None:
    """A failing first call leaves the layer unmaterialized: the next input may come from
    another library (or device) and the layer lives there."""
    layer = BatchRenorm(3)
    for bad, error, message in (
            (np.ones((4, 3), np.int32), TypeError, r"^x must have a real floating dtype"),
            (np.ones((4, 5)), ValueError, r"^state\.mean has shape \(3,\) but x has \(5,\)")):
        with pytest.raises(error, match=message):
            layer.forward(backend.put(bad))
        assert layer.state is None and layer.weight is None and layer.bias is None
    x = np.random.default_rng(3).standard_normal((4, 3))
    good = _elsewhere(backend, x, "library")
    y = layer.forward(good)
    assert type(layer.state.mean) is type(good) and type(y) is type(good)
    assert rel_err(to_numpy(y), ref.train_step(x, np.zeros(3), np.ones(3), 0)["y"]) < 1e-6


def test_array_layer_backward_before_forward() -> None:
    with pytest.raises(RuntimeError, match=r"^backward needs a forward"):
        BatchRenorm(3).backward(np.ones((2, 3)))


def test_no_warning_on_finite_batches() -> None:
    layer = BatchRenorm(3, xp=np)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.forward(np.random.default_rng(0).standard_normal((4, 3)))


def test_layer_snapshot_sees_every_change() -> None:
    """The snapshot the tests above compare is sensitive to each thing it holds."""
    layer = _trained_layer(Backend("numpy"))
    changes: list[Callable[[BatchRenorm], None]] = [
        lambda m: m.forward(np.ones((4, 3)) + np.eye(4, 3)),
        lambda m: m.backward(np.ones((4, 3))),
        lambda m: setattr(m, "nonfinite_batches", 1),
    ]
    for change in changes:
        before = _layer_snapshot(layer)
        change(layer)
        with pytest.raises(AssertionError):
            _assert_snapshot(before, layer)
