"""Helpers shared by the PyTorch adapter tests (no tests here): running a layer and the
float64 reference side by side, step after step."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from portable_brn import schedules  # noqa: E402
from portable_brn.conformance import reference  # noqa: E402

from conftest import rel_err  # noqa: E402

BOUND = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@contextlib.contextmanager
def without_compiled_features(active: bool = True) -> Iterator[None]:
    """While active, the torch layers do their per-feature algebra in tensor operations,
    as on a machine without a C compiler."""
    from portable_brn.adapters.torch import compiled
    if not active:
        yield
        return
    with mock.patch.object(compiled, "library", lambda: None):
        yield


def numpy(tensor: Any) -> np.ndarray | None:
    """A float64 NumPy copy of a tensor, sharing no memory with it (None stays None)."""
    return None if tensor is None else tensor.detach().to(torch.float64, copy=True).cpu().numpy()


def schedule_spec(value: Any) -> Any:
    """A ``portable_brn.schedules`` value in the reference's own notation."""
    if isinstance(value, schedules.Linear):
        return {"kind": "linear", "start_value": value.start_value,
                "end_value": value.end_value, "start_step": value.start_step,
                "end_step": value.end_step}
    return value


def reference_options(layer: Any) -> dict[str, Any]:
    """The reference's keyword arguments for ``layer``'s configuration."""
    c = layer.config
    return {"eps": c.eps, "momentum": c.momentum, "r_max": schedule_spec(c.r_max),
            "d_max": schedule_spec(c.d_max), "r_min": schedule_spec(c.r_min),
            "warmup_steps": c.warmup_steps, "micro_batch": c.micro_batch,
            "output_clip": c.output_clip}


def batch(step: int, shape: tuple[int, ...], dtype: Any, *, channels_last: bool = False,
          column_major: bool = False, seed: int = 0) -> Any:
    """A batch whose per-feature mean and scale drift with ``step``, so that r and d clip
    in some steps and features and not in others; ``channels_last`` (4-d) or
    ``column_major`` (2-d, features not innermost) memory when asked."""
    generator = torch.Generator().manual_seed(seed * 1000 + step)
    channels = shape[1]
    view = (1, channels) + (1,) * (len(shape) - 2)
    phase = torch.arange(channels, dtype=torch.float64)
    shift = (2.0 * torch.sin(0.3 * step + phase)).reshape(view)
    scale = (1.0 + 1.5 * torch.cos(0.2 * step + 2 * phase) ** 2).reshape(view)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale + shift
    x = x.to(dtype)
    if column_major:
        return x.t().contiguous().t()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _clipped(expected: dict[str, Any], mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Per feature (and group): whether r or d differs from its unclipped value."""
    r = expected["batch_std"] / std
    d = (expected["batch_mean"] - mean) / std
    return ~(np.isclose(expected["r"], r) & np.isclose(expected["d"], d))


def check_training(layer: Any, shape: tuple[int, ...], dtype: Any, steps: int, *,
                   channels_last: bool = False, column_major: bool = False) -> float:
    """Train ``layer`` for ``steps`` steps next to the reference, each starting from the
    reference's own state; assert y, dx, dweight, dbias and the new state within specification
    section 6's bound each step; return the fraction of (step, feature) pairs where
    r or d was clipped."""
    bound, clipped = BOUND[dtype], []
    mean = numpy(layer.running_mean)
    std = numpy(layer.running_std)
    options = reference_options(layer)
    for step in range(steps):
        x = batch(step, shape, dtype, channels_last=channels_last,
                  column_major=column_major).requires_grad_(True)
        grad = batch(step, shape, dtype, seed=1)
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        y.backward(grad)
        expected = reference.train_step(numpy(x), mean, std, step, numpy(layer.weight),
                                        numpy(layer.bias), numpy(grad), **options)
        pairs = {"y": y, "dx": x.grad, "mean": layer.running_mean, "std": layer.running_std}
        if layer.affine:
            pairs.update(dweight=layer.weight.grad, dbias=layer.bias.grad)
        for name, actual in pairs.items():
            error = rel_err(numpy(actual), expected[name])
            assert error <= bound, f"step {step}: {name} relative error {error:.3g} > {bound}"
        assert y.dtype == dtype and x.grad.dtype == dtype
        clipped.append(_clipped(expected, mean, std))
        mean, std = expected["mean"], expected["std"]
    assert int(layer.num_batches_tracked) == steps
    return float(np.mean(clipped))


def random_affine(layer: Any, seed: int = 0) -> Any:
    """``layer`` with weight and bias drawn away from 1 and 0, so that both matter."""
    if layer.affine:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            layer.weight.copy_(0.5 + torch.rand(layer.num_features, generator=generator))
            layer.bias.copy_(torch.randn(layer.num_features, generator=generator))
    return layer


def state_of(layer: Any) -> dict[str, Any]:
    """A snapshot of every parameter and buffer of ``layer``."""
    return {name: value.detach().clone() for name, value in layer.state_dict().items()}


def assert_same_state(before: dict[str, Any], layer: Any) -> None:
    """``layer``'s parameters and buffers are bit for bit what ``before`` recorded."""
    after = layer.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), f"{name} changed"


def is_close(actual: Any, expected: Any, bound: float) -> bool:
    """Relative error within ``bound`` (NaN never is)."""
    error = rel_err(numpy(actual), expected if isinstance(expected, np.ndarray)
                    else numpy(expected))
    return math.isfinite(error) and error <= bound


def population_statistics(model: Any, inputs: list[Any]) -> dict[str, tuple[np.ndarray, ...]]:
    """Per renorm layer of ``model`` (by name), the float64 mean and
    ``sqrt(biased var + eps)`` of its input over all ``inputs`` concatenated, on a float64
    copy of the network in eval mode, with plain torch: independent of ``recalibrate``."""
    network = copy.deepcopy(model).double().eval()
    captured: dict[str, Any] = {}
    with torch.no_grad():
        hooks = [module.register_forward_pre_hook(
            lambda module, args, name=name: captured.update({name: args[0]}))
            for name, module in network.named_modules()
            if getattr(module, "running_std", None) is not None]
        network(torch.cat(list(inputs)).double())
    for hook in hooks:
        hook.remove()
    statistics = {}
    for name, x in captured.items():
        rows = x.transpose(0, 1).reshape(x.shape[1], -1)
        mean = rows.mean(dim=1)
        var = (rows - mean[:, None]).pow(2).mean(dim=1)
        std = torch.sqrt(var + network.get_submodule(name).eps)
        statistics[name] = (mean.numpy(), std.numpy())
    return statistics
