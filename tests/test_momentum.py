"""``momentum`` as a schedule of the step in the core, and torch's ``momentum=None``.

The core's schedules (the cumulative average ``1 / (t + 1)`` and a linear ramp) are held
to the float64 reference over consecutive steps, eagerly and under ``jax.jit``; the torch
layers with ``momentum=None`` to ``nn.BatchNorm1d(momentum=None)`` in the batch-norm limit
(r_max=1, d_max=0) on both of their paths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import portable_brn as pb
from portable_brn import schedules
from portable_brn.adapters.torch import BatchRenorm1d, BatchRenorm2d, convert_batchnorm
from portable_brn.conformance import reference as ref

from conftest import TOLERANCE, rel_err

STEPS = 12
SHAPE = (8, 3, 5)
# (core momentum, the same momentum as the reference's schedule spec)
MOMENTA = {
    "cumulative": (schedules.cumulative_average(), {"kind": "cumulative_average"}),
    "linear": (schedules.linear(0.5, 0.1, 2, 8),
               {"kind": "linear", "start_value": 0.5, "end_value": 0.1, "start_step": 2,
                "end_step": 8}),
}


def _batches(seed: int, shape: tuple[int, ...], steps: int = STEPS) -> list[np.ndarray]:
    """Batches whose mean and scale drift, so each step's statistics differ."""
    rng = np.random.default_rng(seed)
    return [1.5 * np.sin(t / 3.0) + np.exp(0.5 * np.cos(t / 2.0)) * rng.standard_normal(shape)
            for t in range(steps)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("momentum", MOMENTA, ids=list(MOMENTA))
def test_core_momentum_schedule_matches_reference(backend, momentum, dtype) -> None:
    core_momentum, ref_momentum = MOMENTA[momentum]
    config = pb.RenormConfig(momentum=core_momentum, r_max=1.5, d_max=0.5)
    features = (SHAPE[1],)
    state = pb.RenormState(*backend.put(np.zeros(features, dtype), np.ones(features, dtype),
                                        np.asarray(0)))
    ref_state = {"mean": np.zeros(features), "std": np.ones(features), "step": 0}
    worst = 0.0
    for x in _batches(1, SHAPE):
        x = x.astype(dtype)
        expected = ref.train_step(x, ref_state["mean"], ref_state["std"], ref_state["step"],
                                  momentum=ref_momentum, r_max=1.5, d_max=0.5)
        _, state, _ = pb.forward_train(backend.put(x), state, None, None, config)
        ref_state = {k: expected[k] for k in ("mean", "std", "step")}
        worst = max(worst, rel_err(backend.get(state.mean), expected["mean"]),
                    rel_err(backend.get(state.std), expected["std"]))
        assert int(backend.get(state.step)) == expected["step"]
    assert worst <= TOLERANCE[dtype], worst


def test_core_momentum_schedule_under_jit() -> None:
    """The schedule reads the traced step: one compiled step serves every t."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    config = pb.RenormConfig(momentum=schedules.cumulative_average(), r_max=1.5, d_max=0.5)
    step_fn = jax.jit(lambda x, s: pb.forward_train(x, s, None, None, config)[1])
    state = pb.RenormState(jnp.zeros(3), jnp.ones(3), jnp.asarray(0))
    ref_state = {"mean": np.zeros(3), "std": np.ones(3), "step": 0}
    for x in _batches(2, SHAPE):
        x = x.astype(np.float32)
        state = step_fn(jnp.asarray(x), state)
        expected = ref.train_step(x, ref_state["mean"], ref_state["std"], ref_state["step"],
                                  momentum={"kind": "cumulative_average"}, r_max=1.5, d_max=0.5)
        ref_state = {k: expected[k] for k in ("mean", "std", "step")}
    assert rel_err(np.asarray(state.mean), ref_state["mean"]) <= TOLERANCE[np.float32]
    assert rel_err(np.asarray(state.std), ref_state["std"]) <= TOLERANCE[np.float32]


def test_cumulative_average_values() -> None:
    step = np.asarray([0.0, 1.0, 4.0, 99.0])
    assert np.array_equal(schedules.cumulative_average()(step), [1.0, 0.5, 0.2, 0.01])


@pytest.mark.parametrize("momentum", [0.0, 1.5, -0.1])
def test_momentum_out_of_range_is_a_value_error(momentum) -> None:
    with pytest.raises(ValueError, match="momentum"):
        pb.RenormConfig(momentum=momentum)


@pytest.mark.parametrize("momentum", ["0.1", True])
def test_momentum_of_wrong_type_is_a_type_error(momentum) -> None:
    with pytest.raises(TypeError, match="momentum"):
        BatchRenorm1d(3, momentum=momentum)


def _batchnorm_limit_pair(dtype: torch.dtype, **options) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3, eps=1e-3, momentum=None, dtype=dtype)
    renorm = BatchRenorm1d(3, eps=1e-3, momentum=None, dtype=dtype, r_max=1.0, d_max=0.0,
                           **options)
    return bn, renorm


def _numpy_dtype(dtype: torch.dtype) -> type:
    return {torch.float32: np.float32, torch.float64: np.float64}[dtype]


# the native path (float32/float64 of the layer's dtype) and the core's (output_clip)
PATHS = {"native": {}, "core": {"output_clip": (-1e9, 1e9)}}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("path", PATHS, ids=list(PATHS))
def test_momentum_none_is_batchnorms_cumulative_average(path, dtype) -> None:
    bn, renorm = _batchnorm_limit_pair(dtype, **PATHS[path])
    assert renorm.momentum is None
    batches = _batches(3, SHAPE)
    for x in batches:
        x = torch.from_numpy(x).to(dtype)
        torch.testing.assert_close(renorm(x), bn(x), rtol=0, atol=5e-5 if dtype == torch.float32
                                   else 1e-12)
    # the expected std: the plain mean, in float64, of the batches' sqrt(biased var + eps)
    batch_std = [np.sqrt(x.astype(_numpy_dtype(dtype)).astype(np.float64).var(axis=(0, 2))
                         + 1e-3) for x in batches]
    expected_std = np.mean(batch_std, axis=0)
    tol = TOLERANCE[_numpy_dtype(dtype)]
    assert rel_err(renorm.running_mean.double().numpy(), bn.running_mean.double().numpy()) <= tol
    assert rel_err(renorm.running_std.double().numpy(), expected_std) <= tol
    assert int(renorm.num_batches_tracked) == int(bn.num_batches_tracked) == STEPS


def test_momentum_none_property_repr_and_setter() -> None:
    layer = BatchRenorm2d(4, momentum=None)
    assert layer.momentum is None and "momentum=None" in repr(layer)
    layer.momentum = 0.1
    assert layer.momentum == 0.1 and "momentum=0.1" in repr(layer)
    layer.momentum = None
    assert layer.momentum is None


def test_convert_batchnorm_carries_momentum_none() -> None:
    """A converted BN(momentum=None) model keeps averaging cumulatively from its step."""
    torch.manual_seed(1)
    bn = nn.BatchNorm1d(3, eps=1e-3, momentum=None, dtype=torch.float64)
    batches = [torch.from_numpy(x) for x in _batches(4, SHAPE)]
    for x in batches[:5]:
        bn(x)
    renorm = convert_batchnorm(bn, r_max=1.0, d_max=0.0)
    assert renorm.momentum is None and int(renorm.num_batches_tracked) == 5
    for x in batches[5:]:
        bn(x)
        renorm(x)
    assert rel_err(renorm.running_mean.numpy(), bn.running_mean.numpy()) <= 1e-12


def test_momentum_schedule_out_of_range_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="momentum"):
        pb.RenormConfig(momentum=schedules.linear(0.5, 1.5, 0, 10))


def test_momentum_none_compiles_whole() -> None:
    """The native path with the schedule's per-step rate traces with ``fullgraph=True``."""
    bn, renorm = _batchnorm_limit_pair(torch.float64)
    torch._dynamo.reset()  # see below: a fresh compile, not a recompile
    compiled = torch.compile(renorm, fullgraph=True)
    try:
        for x in _batches(5, SHAPE, steps=4):
            x = torch.from_numpy(x).requires_grad_()  # as in training
            compiled(x).sum().backward()
            bn(x)
    finally:  # a later compile of another shape would recompile with dynamic shapes,
        torch._dynamo.reset()  # which the native path's statistics op does not support
    assert rel_err(renorm.running_mean.numpy(), bn.running_mean.numpy()) <= 1e-12
    assert int(renorm.num_batches_tracked) == 4
