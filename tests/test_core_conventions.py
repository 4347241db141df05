"""The conventions written once: keyword translations, the fresh state, host copies."""

from __future__ import annotations

import numpy as np
import pytest

import portable_brn as pb
from portable_brn import schedules
from portable_brn.conventions import config_from_flax, flax_options, torch_options
from portable_brn.host import to_host
from portable_brn.state import init_params

CONFIG = pb.RenormConfig(feature_axis=-1, eps=2e-3, momentum=0.25, r_max=schedules.Linear(
    1.0, 3.0, 10, 20), d_max=0.5, r_min=0.5, warmup_steps=3, micro_batch=4,
    output_clip=(-2.0, 2.0))


def test_torch_keywords_round_trip() -> None:
    options = torch_options(CONFIG)
    assert options["momentum"] == 0.25 and options["eps"] == 2e-3
    assert pb.RenormConfig(feature_axis=-1, **options) == CONFIG


def test_flax_keywords_round_trip_with_momentum_as_the_decay() -> None:
    options = flax_options(CONFIG)
    assert options["momentum"] == 0.75 and options["epsilon"] == 2e-3
    assert options["axis"] == -1 and "eps" not in options
    assert config_from_flax(**options) == CONFIG


@pytest.mark.parametrize(("momentum", "error"), [
    (1.0, ValueError), (-0.1, ValueError), (True, TypeError), ("0.9", TypeError)])
def test_flax_momentum_is_checked_as_a_decay(momentum, error) -> None:
    with pytest.raises(error, match="momentum"):
        config_from_flax(axis=-1, momentum=momentum, epsilon=1e-3)


@pytest.mark.parametrize(("dtype", "expected"), [
    (None, np.float32), (np.float16, np.float32), (np.float32, np.float32),
    (np.float64, np.float64)])
def test_fresh_state_keeps_statistics_in_float32_or_wider(dtype, expected) -> None:
    state = pb.init_state((2, 3), xp=np, dtype=dtype)
    assert state.mean.dtype == expected and state.std.dtype == expected
    np.testing.assert_array_equal(state.mean, np.zeros((2, 3)))
    np.testing.assert_array_equal(state.std, np.ones((2, 3)))
    assert int(state.step) == 0
    weight, bias = init_params(state, dtype=np.float16)
    assert weight.dtype == bias.dtype == np.float16 and weight.shape == (2, 3)
    np.testing.assert_array_equal(weight, 1.0)
    np.testing.assert_array_equal(bias, 0.0)


def test_host_copies_keep_the_dtype_and_own_their_memory() -> None:
    x = np.arange(6, dtype=np.float16).reshape(2, 3)
    host = to_host(x)
    assert host.dtype == np.float16 and host.flags.writeable
    host[0, 0] = 9
    assert x[0, 0] == 0
    assert to_host(None) is None


def test_host_copies_from_another_device_and_of_bfloat16() -> None:
    strict = pytest.importorskip("array_api_strict")
    a = strict.asarray([1.5, -2.0], dtype=strict.float32, device=strict.Device("device1"))
    host = to_host(a)
    assert host.dtype == np.float32 and host.tolist() == [1.5, -2.0]
    torch = pytest.importorskip("torch")
    b = torch.tensor([1.5, -2.0], dtype=torch.bfloat16, requires_grad=True)
    host = to_host(b)
    assert host.dtype == np.float32 and host.tolist() == [1.5, -2.0]  # exact in bfloat16
