"""Whole-model tools: ``convert_batchnorm``, ``convert_sync_batchrenorm``, ``recalibrate``."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from test_torch_support import batch, is_close, random_affine  # noqa: E402
from torch import nn  # noqa: E402

from portable_brn.adapters.torch import (  # noqa: E402
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    SyncBatchRenorm,
    convert_batchnorm,
    convert_sync_batchrenorm,
    recalibrate,
)
from portable_brn.conformance import reference  # noqa: E402


def _trained_batch_norm_model():
    """Batch norm of every rank in one model, trained a few steps, one layer frozen."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3, momentum=None), nn.Flatten(2),
        nn.BatchNorm1d(3, eps=1e-4), nn.Unflatten(2, (2, 2, 2)), nn.Flatten(2, 3),
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False), nn.Flatten(), nn.Linear(32, 5),
        nn.Sequential(nn.BatchNorm1d(5)))
    for _ in range(4):
        model(torch.randn(6, 2, 2, 2, 2) * 3 + 1).sum().backward()
    model[3].weight.requires_grad_(False)
    return model


def test_convert_batchnorm_carries_the_state_so_inference_is_unchanged():
    model = _trained_batch_norm_model().eval()
    x = torch.randn(5, 2, 2, 2, 2)
    expected = model(x)
    converted = convert_batchnorm(model, r_max=2.0)
    assert converted is model
    kinds = [type(m) for m in model.modules() if "norm" in type(m).__name__.lower()]
    assert kinds == [BatchRenorm3d, BatchRenorm1d, BatchRenorm2d, BatchRenorm1d]
    assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)
    first = model[1]
    assert int(first.num_batches_tracked) == 4 and first.momentum == 0.01  # momentum=None
    assert model[3].eps == 1e-4 and model[3].momentum == 0.1
    assert not model[3].weight.requires_grad and model[3].bias.requires_grad
    assert not model[7].affine and not model.training
    assert all(m.config.r_max == 2.0 for m in model.modules() if hasattr(m, "config"))


def test_convert_batchnorm_of_a_bare_layer_and_of_sync_batch_norm():
    bn = nn.BatchNorm2d(3).train()
    with torch.no_grad():
        bn.running_var.fill_(4.0)
    layer = convert_batchnorm(bn)
    assert isinstance(layer, BatchRenorm2d) and layer.training
    assert torch.allclose(layer.running_std, torch.full((3,), (4.0 + 1e-5) ** 0.5))
    sync = convert_batchnorm(nn.Sequential(nn.SyncBatchNorm(3)))
    assert isinstance(sync[0], SyncBatchRenorm)
    with pytest.raises(ValueError, match="not initialized"):
        convert_batchnorm(nn.LazyBatchNorm1d())


def test_convert_sync_batchrenorm_keeps_options_parameters_and_state():
    model = nn.Sequential(random_affine(BatchRenorm2d(3, momentum=0.5, warmup_steps=2)),
                          BatchRenorm1d(3, affine=False))
    model[0](batch(0, (4, 3, 2, 2), torch.float32))
    converted = convert_sync_batchrenorm(model, process_group=None)
    assert [type(m) for m in converted] == [SyncBatchRenorm, SyncBatchRenorm]
    assert converted[0].config.warmup_steps == 2 and converted[0].momentum == 0.5
    assert int(converted[0].num_batches_tracked) == 1
    assert not converted[1].affine
    x = batch(1, (4, 3, 2, 2), torch.float32)
    converted.eval()
    expected = BatchRenorm2d(3)
    expected.load_state_dict(converted[0].state_dict())
    assert torch.equal(converted[0](x), expected.eval()(x))


def test_recalibrate_a_layer_gives_the_exact_population_statistics():
    layer = random_affine(BatchRenorm2d(3, dtype=torch.float64)).train()
    batches = [batch(i, (5 + i, 3, 2, 3), torch.float64) for i in range(4)]
    step = int(layer.num_batches_tracked)
    assert recalibrate(layer, batches) is layer
    mean, std = reference.recalibrate([b.numpy() for b in batches], eps=1e-3)
    assert is_close(layer.running_mean, mean, 1e-12)
    assert is_close(layer.running_std, std, 1e-12)
    assert layer.training and int(layer.num_batches_tracked) == step


def test_recalibrate_a_model_uses_each_layers_inference_input_and_restores_modes():
    torch.manual_seed(0)
    first, second = BatchRenorm2d(3, dtype=torch.float64), BatchRenorm2d(3, dtype=torch.float64)
    with torch.no_grad():
        first.running_mean.fill_(0.5)
    model = nn.Sequential(nn.Conv2d(2, 3, 1, dtype=torch.float64), first, nn.Dropout(0.5),
                          nn.ReLU(), second, BatchRenorm2d(3, track_running_stats=False))
    model.train()
    model[2].eval()
    batches = [(batch(i, (4, 2, 3, 3), torch.float64), "label") for i in range(3)]
    with torch.no_grad():
        hidden = [model[0](x) for x, _ in batches]
        second_inputs = [torch.relu(first.eval()(h)) for h in hidden]
    first.train()
    recalibrate(model, batches)
    assert is_close(first.running_mean, reference.recalibrate(
        [h.numpy() for h in hidden])[0], 1e-12)
    assert is_close(second.running_std, reference.recalibrate(
        [h.numpy() for h in second_inputs])[1], 1e-12)
    assert [m.training for m in model] == [True, True, False, True, True, True]


def test_recalibrate_needs_a_batch_and_leaves_the_state_when_a_batch_fails():
    layer = BatchRenorm2d(3)
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate(layer, [])
    before = layer.running_mean.clone()
    with pytest.raises(ValueError, match="features along dim 1"):
        recalibrate(layer, [torch.randn(4, 3, 2, 2) + 5, torch.randn(4, 2, 2, 2)])
    assert torch.equal(layer.running_mean, before) and layer.training
