"""``torch.compile(fullgraph=True)`` trains the layers and matches eager on the native
path; the core's generic path compiles with graph breaks.  Compiling is slow on small
machines, so one small model covers the native path, warm-up and a schedule (one graph),
and both modes, and one more covers the generic path."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from test_torch_support import batch, is_close, random_affine  # noqa: E402
from torch import nn  # noqa: E402

from portable_brn import schedules  # noqa: E402
from portable_brn.adapters.torch import BatchRenorm1d, BatchRenorm2d  # noqa: E402

STEPS = 4


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        random_affine(BatchRenorm2d(4, momentum=0.3, r_max=1.5, d_max=0.5)),
        nn.ReLU(), nn.Flatten(), nn.Linear(16, 5, bias=False),
        random_affine(BatchRenorm1d(5, momentum=0.3, warmup_steps=2,
                                    r_max=schedules.linear(1.0, 2.0, 2, 4))))


def _train_step(model, optimizer, step):
    x = batch(step, (6, 3, 4, 4), torch.float32)
    optimizer.zero_grad()
    y = model(x)
    (y * y).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    return y.detach(), grads


def _generic_model():
    """Micro-batches and output clipping: the core's generic path."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        random_affine(BatchRenorm2d(4, momentum=0.3, r_max=1.5, d_max=0.5, micro_batch=2,
                                    output_clip=(-1.0, 1.5))))


def _check_compiled_matches_eager(eager, fullgraph):
    """Train a compiled copy of ``eager`` next to it: outputs, gradients and buffers
    match at every step, and so does inference afterwards."""
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=fullgraph)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (eager, compiled_model)]
    for step in range(STEPS):
        y, grads = _train_step(eager, optimizers[0], step)
        y_compiled, grads_compiled = _train_step(compiled, optimizers[1], step)
        assert is_close(y_compiled, y, 1e-5)
        for grad, grad_compiled in zip(grads, grads_compiled, strict=True):
            assert is_close(grad_compiled, grad, 1e-4)
    for name, buffer in eager.named_buffers():
        assert is_close(compiled_model.get_buffer(name), buffer, 1e-5), name
    eager.eval()
    compiled.eval()
    x = batch(STEPS, (6, 3, 4, 4), torch.float32)
    with torch.no_grad():
        assert is_close(compiled(x), eager(x), 1e-5)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch")
def test_compiled_training_and_inference_match_eager():
    _check_compiled_matches_eager(_model(), fullgraph=True)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch")
def test_compiled_generic_path_with_graph_breaks_matches_eager():
    _check_compiled_matches_eager(_generic_model(), fullgraph=False)


def test_fullgraph_training_survives_a_new_batch_size() -> None:
    """A smaller last batch makes dynamo recompile with symbolic shapes; the native path
    still compiles whole and stays batch norm in the batch-norm limit."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4, eps=1e-3, momentum=0.1, dtype=torch.float64)
    renorm = BatchRenorm1d(4, eps=1e-3, momentum=0.1, r_max=1.0, d_max=0.0,
                           dtype=torch.float64)
    compiled = torch.compile(renorm, fullgraph=True)
    try:
        for step, rows in enumerate((16, 16, 12, 10)):
            x = batch(step, (rows, 4), torch.float64).requires_grad_()
            x_bn = x.detach().clone().requires_grad_()
            y = compiled(x)
            y.backward(torch.cos(x.detach()))
            want = bn(x_bn)
            want.backward(torch.cos(x_bn.detach()))
            assert is_close(y.detach(), want.detach(), 1e-12)
            assert is_close(x.grad, x_bn.grad, 1e-12)
    finally:
        torch._dynamo.reset()
    assert is_close(renorm.running_mean, bn.running_mean, 1e-12)
