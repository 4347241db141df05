"""Masks in the torch modules and the functional API (``mask=``, True where an element
counts), held to the float64 reference; the synchronised case is in
``test_torch_distributed.py``."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_torch_support import batch, is_close, numpy, random_affine  # noqa: E402

from portable_brn.adapters.torch import BatchRenorm1d, BatchRenorm2d  # noqa: E402
from portable_brn.adapters.torch.functional import batch_renorm  # noqa: E402
from portable_brn.conformance import reference  # noqa: E402

OPTIONS = {"momentum": 0.2, "r_max": 1.5, "d_max": 0.5}
# (layer, input shape, mask shape, extra options)
CASES = {
    "padded-rows": (BatchRenorm1d, (12, 4), (12, 1), {}),
    "padded-steps": (BatchRenorm1d, (6, 4, 5), (6, 1, 5), {"micro_batch": 3}),
    "pixels-clip": (BatchRenorm2d, (4, 3, 3, 3), (4, 1, 3, 3), {"output_clip": (-1.0, 1.0)}),
}


def _mask(step: int, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + step)
    mask = torch.rand(shape, generator=generator) < 0.6
    mask.view(-1)[0] = True  # every group counts something
    return mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(CASES))
def test_module_with_mask_matches_the_reference(name, dtype) -> None:
    cls, shape, mask_shape, extra = CASES[name]
    layer = random_affine(cls(shape[1], dtype=dtype, **OPTIONS, **extra))
    mean, std = numpy(layer.running_mean), numpy(layer.running_std)
    bound = 1e-12 if dtype == torch.float64 else 1e-5
    for step in range(3):
        x = (batch(step, shape, dtype) + 2.0).requires_grad_()
        grad, mask = batch(step, shape, dtype, seed=1), _mask(step, mask_shape)
        layer.zero_grad()
        y = layer(x, mask=mask)
        y.backward(grad)
        expected = reference.train_step(numpy(x), mean, std, step, numpy(layer.weight),
                                        numpy(layer.bias), numpy(grad), mask=mask.numpy(),
                                        feature_axis=1, eps=layer.eps, **OPTIONS, **extra)
        for got, key in ((y, "y"), (x.grad, "dx"), (layer.weight.grad, "dweight"),
                         (layer.bias.grad, "dbias"), (layer.running_mean, "mean"),
                         (layer.running_std, "std")):
            assert is_close(got.detach(), expected[key], bound), (step, key)
        mean, std = expected["mean"], expected["std"]
    layer.eval()
    with torch.no_grad():  # inference transforms every element alike, mask or not
        x = batch(9, shape, dtype)
        assert torch.equal(layer(x, mask=_mask(9, mask_shape)), layer(x))


def test_functional_with_mask_updates_the_buffers_as_the_reference() -> None:
    x = batch(0, (10, 3), torch.float64).requires_grad_()
    grad, mask = batch(0, (10, 3), torch.float64, seed=1), _mask(0, (10, 1))
    mean = torch.full((3,), 0.5, dtype=torch.float64)
    std = torch.full((3,), 2.0, dtype=torch.float64)
    step = torch.tensor(0)
    y = batch_renorm(x, mean, std, step, training=True, momentum=0.1, mask=mask)
    y.backward(grad)
    expected = reference.train_step(numpy(x), np.full(3, 0.5), np.full(3, 2.0), 0, None, None,
                                    numpy(grad), mask=mask.numpy(), feature_axis=1, eps=1e-3,
                                    momentum=0.1)
    assert is_close(y.detach(), expected["y"], 1e-12)
    assert is_close(x.grad, expected["dx"], 1e-12)
    assert is_close(mean, expected["mean"], 1e-12) and is_close(std, expected["std"], 1e-12)
    assert int(step) == 1


@pytest.mark.parametrize(("mask", "error", "match"), [
    (torch.ones(8, 3), TypeError, "mask must be a boolean torch.Tensor"),
    (torch.ones(8, 2, dtype=torch.bool), ValueError, "mask has shape"),
    (np.ones((8, 3), dtype=bool), TypeError, "mask must be a boolean torch.Tensor"),
])
def test_a_bad_mask_is_refused_naming_it_and_the_layer_is_unchanged(mask, error, match) -> None:
    layer = random_affine(BatchRenorm1d(3))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(error, match=match):
        layer(torch.randn(8, 3), mask=mask)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
