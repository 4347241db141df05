"""The CrossQ critic examples run, learn, and normalize both halves of the joint batch
with the same statistics.

Each example trains a small ensemble for a few hundred steps (loss must fall); then one
more training step is held to a float64 computation: the first renorm layer's moving
statistics move toward the statistics of the *joint* (s, a) + (s', a') batch, once.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from conftest import rel_err

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STEPS, BATCH, CRITICS, HIDDEN = 200, 32, 3, 32
ALPHA, EPS = 0.01, 1e-3  # the examples' momentum (as the paper's alpha) and eps


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _joint_update(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> tuple:
    """The moving (mean, std) after one update from the batch ``x``, in float64."""
    x = np.asarray(x, np.float64)
    batch_mean, batch_std = x.mean(axis=0), np.sqrt(x.var(axis=0) + EPS)
    return mean + ALPHA * (batch_mean - mean), std + ALPHA * (batch_std - std)


def _check_losses(losses: list[float]) -> None:
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert np.isfinite(losses).all() and last < 0.5 * first, (first, last)


def test_jax_critic_example() -> None:
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    example = _load("crossq_critic_jax")
    result = example.train(STEPS, BATCH, CRITICS, HIDDEN)
    _check_losses(result["losses"])
    params, stats = result["variables"]["params"], result["variables"]["batch_stats"]
    assert set(stats) == {"BatchRenorm_0", "BatchRenorm_1", "BatchRenorm_2"}
    for layer in stats.values():  # one step per joint forward, per member
        assert np.array_equal(np.asarray(layer["step"]), [STEPS] * CRITICS)
    # every member sees the same input, so the input layer's statistics agree; the hidden
    # layers' statistics are each member's own
    first_mean = np.asarray(stats["BatchRenorm_0"]["mean"])
    assert rel_err(first_mean[1:], np.broadcast_to(first_mean[0], first_mean[1:].shape)) <= 1e-6
    hidden_mean = np.asarray(stats["BatchRenorm_1"]["mean"])
    assert np.min(np.abs(hidden_mean[0] - hidden_mean[1])) > 0.0
    assert np.max(np.abs(hidden_mean[0] - hidden_mean[1])) > 1e-2

    optimizer = optax.adam(1e-3)
    step = example.make_train_step(result["model"], optimizer, BATCH)
    _, new_stats, _, _, batch = step(params, stats, optimizer.init(params), result["buffer"],
                                     jax.random.key(99))
    x = np.asarray(example.joint_batch(batch))
    old = stats["BatchRenorm_0"]
    want_mean, want_std = _joint_update(x, np.asarray(old["mean"], np.float64),
                                        np.asarray(old["std"], np.float64))
    new = new_stats["BatchRenorm_0"]
    assert rel_err(np.asarray(new["mean"]), want_mean) <= 1e-5
    assert rel_err(np.asarray(new["std"]), want_std) <= 1e-5
    assert np.array_equal(np.asarray(new["step"]), [STEPS + 1] * CRITICS)
    # the check can tell: statistics of the (s, a) half alone would have moved elsewhere
    half_mean, _ = _joint_update(x[:BATCH], np.asarray(old["mean"], np.float64),
                                 np.asarray(old["std"], np.float64))
    assert rel_err(np.asarray(new["mean"]), half_mean) > 1e-3


def test_torch_critic_example() -> None:
    torch = pytest.importorskip("torch")
    example = _load("crossq_critic_torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    try:
        result = example.train(STEPS, BATCH, CRITICS, HIDDEN)
        model, optimizer = result["model"], result["optimizer"]
        _check_losses(result["losses"])
        firsts = [critic.net[0] for critic in model.critics]
        hiddens = [critic.net[3] for critic in model.critics]
        for critic in model.critics:
            for layer in (critic.net[0], critic.net[3], critic.net[6]):
                assert int(layer.num_batches_tracked) == STEPS
        for layer in firsts[1:]:
            assert rel_err(layer.running_mean.numpy(), firsts[0].running_mean.numpy()) <= 1e-6
        gap = (hiddens[0].running_mean - hiddens[1].running_mean).abs()
        assert gap.min() > 0.0 and gap.max() > 1e-2

        old = [(layer.running_mean.double().numpy(), layer.running_std.double().numpy())
               for layer in firsts]
        batch = result["batch"]
        example.train_step(model, optimizer, batch)
        x = example.joint_batch(batch).numpy()
        for layer, (mean, std) in zip(firsts, old, strict=True):
            want_mean, want_std = _joint_update(x, mean, std)
            assert rel_err(layer.running_mean.numpy(), want_mean) <= 1e-5
            assert rel_err(layer.running_std.numpy(), want_std) <= 1e-5
            assert int(layer.num_batches_tracked) == STEPS + 1
            half_mean, _ = _joint_update(x[:BATCH], mean, std)
            assert rel_err(layer.running_mean.numpy(), half_mean) > 1e-3
    finally:
        torch.set_num_threads(threads)
