"""``portable_brn.adapters.torch.functional.batch_renorm``: the public function, in the
manner of ``torch.nn.functional.batch_norm``, against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_torch_support import batch, is_close, numpy  # noqa: E402

from portable_brn.adapters.torch.functional import batch_renorm  # noqa: E402
from portable_brn.conformance import reference  # noqa: E402


def _buffers(channels=3):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(channels, generator=generator),
            0.5 + torch.rand(channels, generator=generator), torch.tensor(4))


@pytest.mark.parametrize("options", [{}, {"micro_batch": 2, "output_clip": (-1.0, 1.0)}],
                         ids=["plain", "micro-batch-clip"])
def test_training_matches_the_reference_and_updates_the_buffers_in_place(options):
    mean, std, step = _buffers()
    weight = torch.tensor([0.5, 1.0, 1.5], requires_grad=True)
    bias = torch.tensor([0.1, -0.2, 0.3], requires_grad=True)
    x = batch(0, (4, 3, 3, 3), torch.float32).requires_grad_(True)
    grad = batch(0, (4, 3, 3, 3), torch.float32, seed=1)
    expected = reference.train_step(numpy(x), numpy(mean), numpy(std), 4, numpy(weight),
                                    numpy(bias), numpy(grad), r_max=1.5, d_max=0.5,
                                    momentum=0.1, **options)
    y = batch_renorm(x, mean, std, step, weight, bias, training=True, momentum=0.1,
                     r_max=1.5, d_max=0.5, **options)
    y.backward(grad)
    for name, actual in (("y", y), ("dx", x.grad), ("dweight", weight.grad),
                         ("dbias", bias.grad), ("mean", mean), ("std", std)):
        assert is_close(actual, expected[name], 1e-5), name
    assert int(step) == 5


def test_inference_and_batch_statistics():
    mean, std, _ = _buffers()
    x = batch(0, (4, 3, 3, 3), torch.float32)
    expected = reference.infer(numpy(x), numpy(mean), numpy(std))
    assert is_close(batch_renorm(x, mean, std), expected, 1e-5)
    plain = reference.train_step(numpy(x), np.zeros(3), np.ones(3), 0, r_max=1.0, d_max=0.0)
    assert is_close(batch_renorm(x, None, None, training=True), plain["y"], 1e-5)


@pytest.mark.parametrize(("arguments", "error", "match"), [
    ({"running_mean": torch.zeros(4)}, ValueError, "running_mean must have shape"),
    ({"weight": torch.ones(3)}, ValueError, "weight and bias"),
    ({"running_std": None}, ValueError, "running_std"),
    ({"num_batches_tracked": torch.tensor(1.0)}, TypeError, "num_batches_tracked"),
    ({"micro_batch": 3}, ValueError, "micro_batch=3 does not divide"),
    ({"momentum": 2.0}, ValueError, "momentum"),
])
def test_bad_arguments_raise_and_leave_the_buffers(arguments, error, match):
    mean, std, step = _buffers()
    call = {"running_mean": mean, "running_std": std, "num_batches_tracked": step,
            **arguments}
    before = [t.clone() for t in (mean, std, step)]
    with pytest.raises(error, match=match):
        batch_renorm(batch(0, (4, 3, 3, 3), torch.float32), training=True, **call)
    for old, new in zip(before, (mean, std, step), strict=True):
        assert torch.equal(old, new)
