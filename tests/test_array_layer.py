"""The array layer's dtype, live settings and ``xp=`` (issue 13, items 2, 4, 5), against
the float64 reference."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

import portable_brn as pb
from portable_brn.adapters.array import BatchRenorm
from portable_brn.conformance import reference as ref

from conftest import rel_err


def _reference_run(xs: list[np.ndarray], dys: list[np.ndarray], **options: Any) -> list[dict]:
    """The float64 reference over ``xs`` from a fresh state (weight 1, bias 0), carrying
    its own state and parameters from step to step (no parameter updates)."""
    features = xs[0].shape[1]
    mean, std, step = np.zeros(features), np.ones(features), 0
    results = []
    for x, dy in zip(xs, dys, strict=True):
        out = ref.train_step(x, mean, std, step, np.ones(features), np.zeros(features), dy,
                             **options)
        mean, std, step = out["mean"], out["std"], out["step"]
        results.append(out)
    return results


def _batches(steps: int, shape: tuple[int, ...], seed: int = 0) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    xs = [rng.normal(2.0, 3.0, shape) for _ in range(steps)]
    return xs, [rng.standard_normal(shape) for _ in range(steps)]


def test_float64_input_gives_float64_state_within_1e12(backend) -> None:
    """Bound to a float64 input, 50 steps match the float64 reference within 1e-12 (with
    float32 state the error was 1e-7)."""
    options = {"momentum": 0.1, "r_max": 1.5, "d_max": 0.5}
    xs, dys = _batches(50, (16, 3))
    layer = BatchRenorm(3, **options)
    worst = 0.0
    for x, dy, expected in zip(xs, dys, _reference_run(xs, dys, **options), strict=True):
        y = layer.forward(backend.put(x))
        dx = layer.backward(backend.put(dy))
        errors = [rel_err(backend.get(y), expected["y"]), rel_err(backend.get(dx), expected["dx"]),
                  rel_err(backend.get(layer.state.mean), expected["mean"]),
                  rel_err(backend.get(layer.state.std), expected["std"]),
                  rel_err(backend.get(layer.grad_weight), expected["dweight"])]
        assert not any(np.isnan(errors)), errors
        worst = max(worst, *errors)
    assert worst < 1e-12
    assert layer.dtype == backend.xp.float64 and layer.weight.dtype == backend.xp.float64
    assert int(backend.get(layer.state.step)) == 50


@pytest.mark.parametrize(("x_dtype", "state_dtype"), [
    ("float16", "float32"), ("float32", "float32"), ("float64", "float64")])
def test_state_dtype_is_the_first_inputs_at_least_float32(backend, x_dtype, state_dtype) -> None:
    xp = backend.xp
    if not hasattr(xp, x_dtype):
        pytest.skip(f"{backend.name} has no {x_dtype}")
    layer = BatchRenorm(3)
    x = xp.astype(backend.put(np.ones((4, 3)) + np.eye(4, 3)), getattr(xp, x_dtype))
    layer.forward(x)
    wanted = getattr(xp, state_dtype)
    assert layer.state.mean.dtype == wanted and layer.state.std.dtype == wanted
    assert layer.weight.dtype == wanted and layer.bias.dtype == wanted


def test_bfloat16_input_gives_float32_state() -> None:
    torch = pytest.importorskip("torch")
    layer = BatchRenorm(3)
    layer.forward(torch.randn(4, 3, dtype=torch.bfloat16))
    assert layer.state.mean.dtype == torch.float32 and layer.weight.dtype == torch.float32


def test_dtype_argument_wins_over_the_input() -> None:
    layer = BatchRenorm(3, dtype=np.float32)
    layer.forward(np.random.default_rng(0).standard_normal((4, 3)))
    assert layer.state.mean.dtype == np.float32 and layer.weight.dtype == np.float32


def _torch_namespace() -> Any:
    return pytest.importorskip("torch")


def _jax_namespace() -> Any:
    return pytest.importorskip("jax.numpy")


@pytest.mark.parametrize("framework", [_torch_namespace, lambda: np, _jax_namespace],
                         ids=["torch", "numpy", "jax.numpy"])
def test_framework_module_as_xp(framework) -> None:
    """``xp=torch`` (the module, not a namespace) works like its Array API namespace, in
    the layer and in ``init_state``."""
    module = framework()
    state = pb.init_state(3, xp=module, dtype=module.float32)
    assert int(np.asarray(state.step)) == 0 and tuple(state.mean.shape) == (3,)
    layer = BatchRenorm(3, xp=module, dtype=module.float32)
    x = np.random.default_rng(1).standard_normal((8, 3)).astype(np.float32)
    y = layer.forward(module.asarray(x))
    assert type(y) is type(layer.state.mean)
    expected = ref.train_step(x, np.zeros(3), np.ones(3), 0, np.ones(3), np.zeros(3))
    assert rel_err(np.asarray(y), expected["y"]) < 1e-5
    assert rel_err(np.asarray(layer.state.std), expected["std"]) < 1e-6


@pytest.mark.parametrize("bad", [__import__("math"), "numpy", 3])
def test_non_namespace_xp_is_refused(bad) -> None:
    message = r"^xp must be an Array API namespace \(numpy, jax\.numpy"
    with pytest.raises(TypeError, match=message):
        BatchRenorm(3, xp=bad)
    with pytest.raises(TypeError, match=message):
        pb.init_state(3, xp=bad)


SETTINGS = {  # option: (new value, the RenormConfig that value makes)
    "momentum": 0.5, "eps": 1e-2, "r_max": 1.25, "d_max": 0.25, "r_min": 0.9,
    "warmup_steps": 2, "micro_batch": 4, "output_clip": (-1.0, 1.0), "feature_axis": -1,
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_setting_an_option_takes_effect_from_the_next_call(name) -> None:
    """``layer.momentum = 0.5`` (and every other option) changes the computation: the
    next step matches the reference with the new value (a narrow batch far from the
    moving mean, so that every clip binds)."""
    xs, dys = _batches(2, (8, 3, 3), seed=2)
    xs[1] = 2.0 + 0.1 * (xs[1] - 2.0)
    layer = BatchRenorm(3, dtype=np.float64)
    layer.forward(xs[0])
    mean, std = layer.state.mean.copy(), layer.state.std.copy()
    setattr(layer, name, SETTINGS[name])
    assert getattr(layer, name) == SETTINGS[name]
    assert layer.config == dataclasses.replace(pb.RenormConfig(), **{name: SETTINGS[name]})
    y = layer.forward(xs[1])
    dx = layer.backward(dys[1])
    expected = ref.train_step(xs[1], mean, std, 1, np.ones(3), np.zeros(3), dys[1],
                              **dataclasses.asdict(layer.config))
    default = ref.train_step(xs[1], mean, std, 1, np.ones(3), np.zeros(3), dys[1])
    assert rel_err(y, expected["y"]) < 1e-12 and rel_err(dx, expected["dx"]) < 1e-12
    assert rel_err(layer.state.std, expected["std"]) < 1e-12
    changed = [rel_err(a, b) for a, b in ((y, default["y"]), (dx, default["dx"]),
                                          (layer.state.std, default["std"]))]
    assert max(changed) > 1e-6, f"{name} had no effect"


@pytest.mark.parametrize(("name", "value", "error", "message"), [
    ("momentum", 1.5, ValueError, r"^momentum must be in \(0\.0, 1\.0\]"),
    ("r_max", 0.5, ValueError, r"^r_max must be in \[1\.0, inf\]"),
    ("eps", "big", TypeError, r"^eps must be a real number"),
    ("micro_batch", 0, ValueError, r"^micro_batch must be >= 1"),
])
def test_setting_a_bad_value_is_refused_and_changes_nothing(name, value, error, message) -> None:
    layer = BatchRenorm(3, xp=np)
    before = layer.config
    with pytest.raises(error, match=message):
        setattr(layer, name, value)
    assert layer.config is before


@pytest.mark.parametrize("name", ["num_features", "affine", "xp", "dtype", "device"])
def test_fixed_attributes_are_read_only(name) -> None:
    layer = BatchRenorm(3, xp=np)
    before = getattr(layer, name)
    with pytest.raises(AttributeError, match=rf"^BatchRenorm\.{name} cannot be changed: "):
        setattr(layer, name, 4)
    assert getattr(layer, name) is before or getattr(layer, name) == before


def test_config_can_be_replaced_whole() -> None:
    layer = BatchRenorm(3, xp=np)
    layer.config = pb.RenormConfig(momentum=0.3)
    assert layer.momentum == 0.3
    with pytest.raises(TypeError, match=r"^config must be a RenormConfig"):
        layer.config = {"momentum": 0.3}
