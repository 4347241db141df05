"""ONNX export of eval-mode models with renorm layers, and of their ``to_batchnorm``
conversion, run in onnxruntime with torch's outputs (within 1e-5)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from portable_brn.adapters.torch import BatchRenorm1d, BatchRenorm2d, to_batchnorm

from conftest import rel_err

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _model() -> nn.Module:
    """Conv, BatchRenorm2d, a linear head with a BatchRenorm1d; non-trivial statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), BatchRenorm2d(6), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 5), BatchRenorm1d(5))
    with torch.no_grad():
        for layer in (model[1], model[5]):
            layer.running_mean.uniform_(-1.0, 1.0)
            layer.running_std.uniform_(0.3, 2.0)
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _run_exported(model: nn.Module, x: torch.Tensor, path: str, dynamo: bool) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
        torch.onnx.export(model, (x,), path, dynamo=dynamo, input_names=["x"],
                          output_names=["y"])
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["y"], {"x": x.numpy()})[0])


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("convert", [False, True], ids=["renorm", "to_batchnorm"])
def test_onnxruntime_matches_torch(tmp_path, convert, dynamo) -> None:
    model = _model()
    x = 2.0 * torch.randn(4, 3, 6, 6) + 0.5
    with torch.no_grad():
        expected = model(x)
    if convert:
        model = to_batchnorm(model)
        assert not any(isinstance(m, BatchRenorm1d | BatchRenorm2d) for m in model.modules())
    actual = _run_exported(model, x, str(tmp_path / "model.onnx"), dynamo)
    assert rel_err(actual.numpy(), expected.numpy()) <= 1e-5
