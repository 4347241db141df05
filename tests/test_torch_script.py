"""Graphs of a model holding the renorm layers: ``torch.jit.script`` compiles their
inference (and refuses training with a message naming the supported paths);
``torch.jit.trace`` and ``torch.export.export`` of an eval-mode model match eager."""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")

from test_torch_support import batch, is_close  # noqa: E402
from torch import nn  # noqa: E402

from portable_brn.adapters.torch import (  # noqa: E402
    BatchRenorm1d,
    BatchRenorm2d,
    SyncBatchRenorm,
)


def _trained_model(affine: bool = True) -> nn.Module:
    """Conv - renorm - ReLU - sync renorm - Linear - renorm, trained a few steps (float64)
    so that the running statistics are far from 0 and 1; then eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1, dtype=torch.float64),
        BatchRenorm2d(4, momentum=0.5, affine=affine, dtype=torch.float64), nn.ReLU(),
        SyncBatchRenorm(4, momentum=0.5, dtype=torch.float64), nn.Flatten(),
        nn.Linear(36, 5, dtype=torch.float64), BatchRenorm1d(5, momentum=0.5,
                                                              dtype=torch.float64))
    for step in range(4):
        model(batch(step, (8, 3, 3, 3), torch.float64))
    return model.eval()


def _inputs():
    return [batch(step, (6, 3, 3, 3), torch.float64) for step in (7, 8)]


def _float64_inference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The eval-mode model by hand: every renorm layer as (x - mean) / std * w + b."""
    for layer in model:
        if hasattr(layer, "running_std"):
            view = (1, -1) + (1,) * (x.dim() - 2)
            x = (x - layer.running_mean.view(view)) / layer.running_std.view(view)
            if layer.affine:
                x = x * layer.weight.view(view) + layer.bias.view(view)
        else:
            x = layer(x)
    return x


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.filterwarnings("ignore:`torch.jit.(save|load)` is deprecated")
def test_script_compiles_inference_and_matches_eager(affine):
    model = _trained_model(affine)
    scripted = torch.jit.script(model)
    for x in _inputs():
        with torch.no_grad():
            assert is_close(scripted(x), _float64_inference(model, x), 1e-13)
            assert is_close(scripted(x), model(x), 1e-13)
    buffer = io.BytesIO()  # a scripted model saves and loads without Python
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = _inputs()[0]
    assert torch.equal(loaded(x), scripted(x))
    assert isinstance(model[1], BatchRenorm2d)  # the eager model is left as it was
    model.train()
    model(x)


def test_scripted_training_raises_naming_the_supported_paths():
    scripted = torch.jit.script(_trained_model())
    scripted.train()
    with pytest.raises(torch.jit.Error, match=r"(?s)inference only.*torch\.jit\.trace or "
                                           r"torch\.export\.export"):
        scripted(_inputs()[0])


def test_scripted_layer_without_running_stats_raises_naming_the_supported_paths():
    scripted = torch.jit.script(BatchRenorm1d(3, track_running_stats=False).eval())
    with pytest.raises(torch.jit.Error, match=r"(?s)track_running_stats=True.*torch\.jit\.trace"):
        scripted(torch.randn(4, 3))


def test_trace_of_an_eval_model_matches_eager():
    model = _trained_model()
    traced = torch.jit.trace(model, (_inputs()[0],))
    for x in _inputs():
        with torch.no_grad():
            assert is_close(traced(x), _float64_inference(model, x), 1e-13)


def test_export_of_an_eval_model_matches_eager():
    model = _trained_model()
    exported = torch.export.export(model, (_inputs()[0],))
    for x in _inputs():
        with torch.no_grad():
            assert is_close(exported.module()(x), _float64_inference(model, x), 1e-13)
