"""Bad input (SPEC section 7): the right error type, a message naming the argument,
and no state change."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import portable_brn as pb
from portable_brn.adapters.array import BatchRenorm


def _setup(features: int = 3, dtype=np.float64):
    state = pb.init_state(features, xp=np, dtype=dtype)
    return state, np.ones(features, dtype), np.zeros(features, dtype)


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex128])
def test_non_real_floating_x(dtype) -> None:
    state, w, b = _setup()
    with pytest.raises(TypeError, match=r"^x must have a real floating dtype"):
        pb.forward_train(np.ones((4, 3), dtype), state, w, b, pb.RenormConfig())
    with pytest.raises(TypeError, match=r"^x must have a real floating dtype"):
        pb.forward_infer(np.ones((4, 3), dtype), state, w, b, pb.RenormConfig())


def test_x_without_batch_axis() -> None:
    state, w, b = _setup()
    with pytest.raises(ValueError, match=r"^x must have at least 2 dimensions"):
        pb.forward_train(np.ones(3), state, w, b, pb.RenormConfig(feature_axis=0))


@pytest.mark.parametrize("name", ["state.mean", "state.std", "weight", "bias"])
def test_feature_size_mismatch(name) -> None:
    state, w, b = _setup()
    args = {"state.mean": state.mean, "state.std": state.std, "weight": w, "bias": b}
    args[name] = np.ones(4)
    state = pb.RenormState(args["state.mean"], args["state.std"], state.step)
    with pytest.raises(ValueError, match=rf"^{name} has shape \(4,\) but the input has \(3,\)"):
        pb.forward_train(np.ones((5, 3)), state, args["weight"], args["bias"], pb.RenormConfig())


@pytest.mark.parametrize("feature_axis", [2, -3, (1, -1)])
def test_feature_axis_out_of_range_or_repeated(feature_axis) -> None:
    state, w, b = _setup()
    with pytest.raises(ValueError, match=r"^feature_axis"):
        pb.forward_train(np.ones((5, 3)), state, w, b, pb.RenormConfig(feature_axis=feature_axis))


def test_feature_axis_repeated_at_construction() -> None:
    with pytest.raises(ValueError, match=r"^feature_axis has a repeated axis"):
        pb.RenormConfig(feature_axis=(1, 1))
    with pytest.raises(TypeError, match=r"^feature_axis must be an int"):
        pb.RenormConfig(feature_axis=1.0)


def test_one_value_per_feature_in_training() -> None:
    state, w, b = _setup()
    with pytest.raises(ValueError, match=r"^Expected more than 1 value per feature"):
        pb.forward_train(np.ones((1, 3)), state, w, b, pb.RenormConfig())
    with pytest.raises(ValueError, match=r"micro_batch=1"):
        pb.forward_train(np.ones((4, 3)), state, w, b, pb.RenormConfig(micro_batch=1))
    # inference on a single example is fine
    assert pb.forward_infer(np.ones((1, 3)), state, w, b, pb.RenormConfig()).shape == (1, 3)


def test_micro_batch_must_divide_batch() -> None:
    state, w, b = _setup()
    with pytest.raises(ValueError, match=r"^micro_batch=4 does not divide the batch size 6"):
        pb.forward_train(np.ones((6, 3)), state, w, b, pb.RenormConfig(micro_batch=4))


def test_mixed_libraries() -> None:
    strict = pytest.importorskip("array_api_strict")
    state, w, b = _setup()
    with pytest.raises(TypeError, match=r"different libraries.*x: array_api_strict"):
        pb.forward_train(strict.ones((4, 3), dtype=strict.float64), state, w, b,
                         pb.RenormConfig())


def test_mixed_devices() -> None:
    strict = pytest.importorskip("array_api_strict")
    dev = strict.Device("device1")
    state = pb.init_state(3, xp=strict, dtype=strict.float64)
    x = strict.ones((4, 3), dtype=strict.float64, device=dev)
    with pytest.raises(ValueError, match=r"^arrays on different devices in one call: x is on"):
        pb.forward_train(x, state, None, None, pb.RenormConfig())


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


def test_backward_dy_shape() -> None:
    state, w, b = _setup()
    _, _, residuals = pb.forward_train(np.ones((4, 3)), state, w, b, pb.RenormConfig())
    with pytest.raises(ValueError, match=r"^dy has shape \(4, 2\)"):
        pb.backward(residuals, np.ones((4, 2)))


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


def test_array_layer_counts_and_warns_on_non_finite_batch() -> None:
    layer = BatchRenorm(2, xp=np)
    x = np.ones((4, 2))
    x[0, 0] = np.nan
    with pytest.warns(RuntimeWarning, match=r"non-finite batch statistics in 1 feature"):
        layer.forward(x)
    assert layer.nonfinite_batches == 1
    assert np.all(np.isfinite(layer.state.mean)) and np.all(np.isfinite(layer.state.std))


def test_array_layer_state_untouched_by_failing_calls() -> None:
    layer = BatchRenorm(3, xp=np)
    layer.forward(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32))
    before = layer.state_dict()
    for bad in (np.ones((4, 5), np.float32), np.ones((1, 3), np.float32), np.ones((4, 3), int)):
        with pytest.raises((ValueError, TypeError)):
            layer.forward(bad)
    with pytest.raises(ValueError, match=r"^running_std has shape \(4,\)"):
        layer.load_state_dict({**before, "running_std": np.ones(4), "running_mean": before["bias"]})
    with pytest.raises(KeyError, match=r"missing \['bias'\]"):
        layer.load_state_dict({k: v for k, v in before.items() if k != "bias"})
    after = layer.state_dict()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value)


def test_array_layer_backward_before_forward() -> None:
    with pytest.raises(RuntimeError, match=r"backward needs a forward"):
        BatchRenorm(3).backward(np.ones((2, 3)))


def test_no_warning_on_finite_batches() -> None:
    layer = BatchRenorm(3, xp=np)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.forward(np.random.default_rng(0).standard_normal((4, 3)))
