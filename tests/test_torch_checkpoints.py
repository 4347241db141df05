"""Batch-norm checkpoints load into renorm layers (``running_std = sqrt(running_var + eps)``)
and ``to_batchnorm`` turns renorm layers back into torch's batch norm.

``convert_batchnorm(model)`` followed by ``load_state_dict(batchnorm_model.state_dict())``,
the order most people write, loads strictly, and the eval outputs equal those of the
batch-norm model (torch's own ``nn.BatchNorm*d``); strict loading still refuses anything
else.  ``to_batchnorm``'s layers are held to a float64 inference computation and to the
renorm model they came from.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from portable_brn.adapters.torch import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    SyncBatchRenorm,
    _BatchRenorm,
    convert_batchnorm,
    to_batchnorm,
)

from conftest import rel_err


def _conv_net(dims: int) -> nn.Module:
    """A small ResNet-like stem: conv, batch norm, ReLU twice, pooled, a linear head with a
    BatchNorm1d; ``dims`` 2 or 3 picks Conv2d/BatchNorm2d or Conv3d/BatchNorm3d."""
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
    return nn.Sequential(
        conv(3, 8, 3, padding=1, bias=False), norm(8, eps=1e-5), nn.ReLU(),
        nn.Sequential(conv(8, 8, 3, padding=1, bias=False), norm(8, eps=2e-4), nn.ReLU()),
        pool, nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6, momentum=0.3), nn.Linear(6, 2))


def _input_shape(dims: int, batch: int) -> tuple[int, ...]:
    return (batch, 3, 6, 6) if dims == 2 else (batch, 3, 4, 4, 4)


def _pretrained(dims: int, dtype: torch.dtype) -> nn.Module:
    """A batch-norm net with non-trivial weights and running statistics, in eval mode."""
    torch.manual_seed(dims)
    net = _conv_net(dims).to(dtype)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        for _ in range(4):
            net(3.0 * torch.randn(_input_shape(dims, 16), dtype=dtype) + 1.0)
    return net.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dims", [2, 3])
def test_batchnorm_state_dict_loads_into_converted_model(dims, dtype) -> None:
    pretrained = _pretrained(dims, dtype)
    model = convert_batchnorm(_conv_net(dims).to(dtype)).eval()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    model.load_state_dict(pretrained.state_dict())  # strict
    x = 2.0 * torch.randn(_input_shape(dims, 5), dtype=dtype) + 1.0
    with torch.no_grad():
        expected, actual = pretrained(x), model(x)
    bound = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_err(actual.double().numpy(), expected.double().numpy()) <= bound
    for name, bn in pretrained.named_modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            renorm = model.get_submodule(name)
            wanted = np.sqrt(bn.running_var.double().numpy() + bn.eps)
            assert rel_err(renorm.running_std.double().numpy(), wanted) <= bound / 10
            assert int(renorm.num_batches_tracked) == int(bn.num_batches_tracked) == 4


def test_batchnorm_state_dict_without_metadata_loads() -> None:
    """A plain dict (no ``_metadata``, so no version) in batch norm's format loads too."""
    bn = _pretrained(2, torch.float32)[1]
    layer = BatchRenorm2d(8, eps=bn.eps)
    layer.load_state_dict({k: v.clone() for k, v in bn.state_dict().items()})
    assert torch.equal(layer.running_mean, bn.running_mean)
    wanted = np.sqrt(bn.running_var.double().numpy() + bn.eps)
    assert rel_err(layer.running_std.double().numpy(), wanted) <= 1e-7


def test_renorm_state_dict_still_round_trips() -> None:
    source = BatchRenorm1d(4, momentum=0.2)
    source(torch.randn(10, 4) * 3.0 + 2.0)
    target = BatchRenorm1d(4)
    target.load_state_dict(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_strict_loading_still_refuses_other_keys() -> None:
    bn_dict = nn.BatchNorm1d(4).state_dict()
    with pytest.raises(RuntimeError, match="running_extra"):
        BatchRenorm1d(4).load_state_dict({**bn_dict, "running_extra": torch.zeros(4)})
    missing = {k: v for k, v in bn_dict.items() if k != "running_var"}
    with pytest.raises(RuntimeError, match="running_std"):
        BatchRenorm1d(4).load_state_dict(missing)
    # a current renorm dict (version 3) is never converted: running_var is unexpected there
    renorm_dict = BatchRenorm1d(4).state_dict()
    renorm_dict["running_var"] = torch.ones(4)
    with pytest.raises(RuntimeError, match="running_var"):
        BatchRenorm1d(4).load_state_dict(renorm_dict)


def test_size_mismatch_is_reported_on_running_std() -> None:
    with pytest.raises(RuntimeError, match="running_std"):
        BatchRenorm1d(4).load_state_dict(nn.BatchNorm1d(5).state_dict())


# ---------------------------------------------------------------------------
# to_batchnorm: renorm layers back to torch's batch norm
# ---------------------------------------------------------------------------


def _trained_renorm_net(dims: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A renorm net trained a few steps with wide clips (so its statistics are renorm's own,
    not batch norm's), in eval mode."""
    torch.manual_seed(10 + dims)
    net = convert_batchnorm(_conv_net(dims).to(dtype), r_max=3.0, d_max=5.0, momentum=0.3)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, BatchRenorm1d | BatchRenorm2d | BatchRenorm3d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        for _ in range(5):
            net(3.0 * torch.randn(_input_shape(dims, 16), dtype=dtype) + 1.0)
    return net.eval()


@pytest.mark.parametrize("dims", [2, 3])
def test_to_batchnorm_keeps_inference_outputs(dims) -> None:
    renorm = _trained_renorm_net(dims)
    x = 2.0 * torch.randn(_input_shape(dims, 5)) + 1.0
    with torch.no_grad():
        expected = renorm(x)
        bn = to_batchnorm(renorm)
        actual = bn(x)
    assert not any(isinstance(m, _BatchRenorm) for m in bn.modules())
    assert rel_err(actual.numpy(), expected.numpy()) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_to_batchnorm_layer_matches_float64_inference(dtype) -> None:
    """Batch norm's own eval output against ``w * (x - mean) / std + b`` in float64."""
    torch.manual_seed(3)
    layer = BatchRenorm2d(5, eps=1e-3, dtype=dtype).eval()
    with torch.no_grad():
        layer.running_mean.uniform_(-2.0, 2.0)
        layer.running_std.uniform_(0.05, 3.0)
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1.0, 1.0)
    x = 4.0 * torch.randn(4, 5, 3, 3, dtype=dtype)
    bn = to_batchnorm(layer)
    assert type(bn) is nn.BatchNorm2d
    view = (1, -1, 1, 1)
    expected = ((x.double() - layer.running_mean.double().view(view))
                / layer.running_std.double().view(view) * layer.weight.double().view(view)
                + layer.bias.double().view(view))
    with torch.no_grad():
        assert rel_err(bn(x).double().numpy(), expected.numpy()) <= (
            1e-6 if dtype == torch.float32 else 1e-12)


def test_to_batchnorm_carries_options_modes_and_flags() -> None:
    model = nn.Sequential(
        BatchRenorm1d(3, eps=1e-4, momentum=None),
        BatchRenorm2d(4, momentum=0.2, affine=False),
        BatchRenorm3d(2, track_running_stats=False, dtype=torch.float64),
        SyncBatchRenorm(6, momentum=0.05))
    model[0].eval()
    model[0].bias.requires_grad_(False)
    with torch.no_grad():
        model[0].num_batches_tracked.fill_(7)
    bn = to_batchnorm(model)
    kinds = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm]
    assert [type(m) for m in bn] == kinds
    assert [m.training for m in bn] == [False, True, True, True]
    assert [m.momentum for m in bn] == [None, 0.2, 0.01, 0.05]
    assert [m.eps for m in bn] == [1e-4, 1e-3, 1e-3, 1e-3]
    assert [m.affine for m in bn] == [True, False, True, True]
    assert [m.track_running_stats for m in bn] == [True, True, False, True]
    assert bn[0].weight.requires_grad and not bn[0].bias.requires_grad
    assert int(bn[0].num_batches_tracked) == 7
    assert bn[2].weight.dtype == torch.float64 and bn[2].running_mean is None
    assert bn[1].running_var.dtype == torch.float32


def test_to_batchnorm_refuses_a_momentum_schedule() -> None:
    from portable_brn import schedules
    layer = BatchRenorm1d(3, momentum=schedules.linear(0.5, 0.1, 0, 10))
    with pytest.raises(ValueError, match="momentum"):
        to_batchnorm(layer)


def test_fuse_conv_bn_eval_works_on_the_result() -> None:
    renorm = _trained_renorm_net(2)
    x = 2.0 * torch.randn(_input_shape(2, 5)) + 1.0
    bn = to_batchnorm(renorm)
    conv, norm = bn[0], bn[1]
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, norm)
    with torch.no_grad():
        expected = renorm[1](renorm[0](x))
        assert rel_err(fused(x).numpy(), expected.numpy()) <= 1e-5


def test_round_trip_through_renorm_restores_batchnorm() -> None:
    pretrained = _pretrained(2, torch.float64)
    back = to_batchnorm(convert_batchnorm(_pretrained(2, torch.float64)))
    for key, value in pretrained.state_dict().items():
        assert rel_err(back.state_dict()[key].double().numpy(), value.double().numpy()) <= 1e-12


def test_a_running_var_that_is_no_tensor_is_refused_not_converted() -> None:
    bn_dict = dict(nn.BatchNorm1d(4).state_dict(), running_var=[1.0] * 4)
    with pytest.raises(RuntimeError, match="running_std"):
        BatchRenorm1d(4).load_state_dict(bn_dict)
