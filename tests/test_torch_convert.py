"""Whole-model tools: ``convert_batchnorm``, ``convert_sync_batchrenorm``, ``recalibrate``."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from test_torch_support import (  # noqa: E402
    BOUND,
    assert_same_state,
    batch,
    is_close,
    population_statistics,
    random_affine,
    state_of,
)
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
    assert int(first.num_batches_tracked) == 4 and first.momentum is None  # carried
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


def _stacked_renorm_model(dtype):
    """Three renorm layers with convolutions and a linear layer between them, running
    statistics far from the data's, a dropout in eval mode, one layer without state."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, dtype=dtype), BatchRenorm2d(3, dtype=dtype), nn.ReLU(),
        nn.Dropout(0.5), nn.Conv2d(3, 4, 1, dtype=dtype), BatchRenorm2d(4, dtype=dtype),
        nn.Flatten(), nn.Linear(36, 5, dtype=dtype), BatchRenorm1d(5, dtype=dtype),
        BatchRenorm1d(5, track_running_stats=False, dtype=dtype))
    for index, layer in enumerate(m for m in model if getattr(m, "running_std", None) is not None):
        random_affine(layer, seed=index)
        with torch.no_grad():
            layer.running_mean.uniform_(-2.0, 2.0)
            layer.running_std.uniform_(0.3, 3.0)
            layer.num_batches_tracked.fill_(7)
    model.train()
    model[3].eval()
    return model


RENORM_NAMES = ("1", "5", "8")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_recalibrate_stacked_layers_gives_each_the_statistics_of_the_final_network(dtype):
    """Each layer ends with the exact statistics of its input under the recalibrated
    network in inference mode, not under the network as it was before the call."""
    model = _stacked_renorm_model(dtype)
    inputs = [batch(i, (4 + i, 2, 3, 3), dtype) for i in range(3)]
    before = population_statistics(model, inputs)
    if dtype == torch.float64:
        batches = [(x, "label") for x in inputs]
    else:  # a DataLoader is re-iterable too; its batches are [input, label] lists
        dataset = torch.utils.data.TensorDataset(torch.cat(inputs), torch.zeros(15))
        batches = torch.utils.data.DataLoader(dataset, batch_size=4)
    assert recalibrate(model, batches) is model
    expected = population_statistics(model, inputs)
    for name in RENORM_NAMES:
        layer = model.get_submodule(name)
        mean, std = expected[name]
        assert is_close(layer.running_mean, mean, BOUND[dtype]), name
        assert is_close(layer.running_std, std, BOUND[dtype]), name
        assert int(layer.num_batches_tracked) == 7
    for name in RENORM_NAMES[1:]:  # one pass under the old statistics would be far off
        assert not is_close(torch.from_numpy(before[name][1]), expected[name][1], 1e-2)
    assert [m.training for m in model] == [True] * 3 + [False] + [True] * 6


class _FailsOnSecondPass:
    """Batches that can be iterated once; the second pass fails after one batch."""

    def __init__(self, batches):
        self.batches = batches
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        yield self.batches[0]
        if self.passes > 1:
            raise RuntimeError("the data went away")
        yield from self.batches[1:]


def test_recalibrate_restores_every_layer_when_a_later_pass_fails():
    model = _stacked_renorm_model(torch.float64)
    before = [state_of(model.get_submodule(name)) for name in RENORM_NAMES]
    batches = _FailsOnSecondPass([batch(i, (4, 2, 3, 3), torch.float64) for i in range(2)])
    with pytest.raises(RuntimeError, match="went away"):
        recalibrate(model, batches)
    assert batches.passes == 2
    for name, state in zip(RENORM_NAMES, before, strict=True):
        assert_same_state(state, model.get_submodule(name))
    assert [m.training for m in model] == [True] * 3 + [False] + [True] * 6


def test_recalibrate_refuses_a_one_shot_iterator_for_several_layers():
    model = _stacked_renorm_model(torch.float64)
    inputs = [batch(i, (4, 2, 3, 3), torch.float64) for i in range(2)]
    before = state_of(model)
    with pytest.raises(TypeError, match=r"batches must be re-iterable .*3 layers.*generator"):
        recalibrate(model, (x for x in inputs))
    assert_same_state(before, model)
    layer = BatchRenorm2d(2, dtype=torch.float64)
    recalibrate(layer, iter(inputs))  # one layer needs one pass: any iterable will do
    mean, std = reference.recalibrate([x.numpy() for x in inputs])
    assert is_close(layer.running_mean, mean, 1e-12) and is_close(layer.running_std, std, 1e-12)


class _ReadOnce:
    """An iterable (not an iterator) that hands out the same iterator every time, so only
    its first pass sees the batches, as some streaming loaders do."""

    def __init__(self, batches):
        self.iterator = iter(batches)

    def __iter__(self):
        return self.iterator


def test_recalibrate_refuses_an_iterable_that_changes_between_passes():
    model = _stacked_renorm_model(torch.float64)
    before = state_of(model)
    batches = _ReadOnce([batch(i, (4, 2, 3, 3), torch.float64) for i in range(2)])
    with pytest.raises(ValueError, match=r"^batches yielded 2 batches on the first pass but "
                                         r"0 on pass 2"):
        recalibrate(model, batches)
    assert_same_state(before, model)


def test_recalibrate_needs_a_batch_and_leaves_the_state_when_a_batch_fails():
    layer = BatchRenorm2d(3)
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate(layer, [])
    before = layer.running_mean.clone()
    with pytest.raises(ValueError, match="features along dim 1"):
        recalibrate(layer, [torch.randn(4, 3, 2, 2) + 5, torch.randn(4, 2, 2, 2)])
    assert torch.equal(layer.running_mean, before) and layer.training


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_converted_running_std_is_the_checkpoint_loads_float64_rounded_once(dtype) -> None:
    """convert_batchnorm and loading a batch-norm state dict give the same running_std:
    sqrt(running_var + eps) in float64, rounded once to the layer's dtype."""
    bn = torch.nn.BatchNorm1d(64, eps=1e-5, dtype=dtype)
    with torch.no_grad():
        bn.running_var.copy_(torch.linspace(1e-4, 3.0, 64, dtype=torch.float64))
    wanted = torch.sqrt(bn.running_var.double() + 1e-5).to(dtype)
    converted = convert_batchnorm(copy.deepcopy(bn))
    assert torch.equal(converted.running_std, wanted)
    loaded = convert_batchnorm(copy.deepcopy(bn))
    loaded.load_state_dict(bn.state_dict())
    assert torch.equal(loaded.running_std, wanted)
