"""``torch.compile(fullgraph=True)`` trains every configuration of the layers and matches
eager, without recompiling after the first step at a fixed shape.  Compiling is slow on
small machines, so three small models cover everything: the plain native path with
warm-up and a schedule; micro-batches, output clipping, channels-last input and no
running statistics; and a 16-bit input into float32 layers."""

from __future__ import annotations

import copy
import math

import pytest

torch = pytest.importorskip("torch")

from test_torch_support import BOUND, batch, is_close, random_affine  # noqa: E402
from torch import nn  # noqa: E402

from portable_brn import schedules  # noqa: E402
from portable_brn.adapters.torch import BatchRenorm1d, BatchRenorm2d  # noqa: E402

STEPS = 20
SHAPE = (6, 3, 4, 4)


def _plain_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        random_affine(BatchRenorm2d(4, momentum=0.3, r_max=1.5, d_max=0.5)),
        nn.ReLU(), nn.Flatten(), nn.Linear(16, 5, bias=False),
        random_affine(BatchRenorm1d(5, momentum=0.3, warmup_steps=2,
                                    r_max=schedules.linear(1.0, 2.0, 2, 4))))


def _options_model():
    """Micro-batches (2d and 1d), output clipping and no running statistics (with tanh
    between the layers: a norm layer's input gradient sums to zero per feature, which
    would leave the layer before it only cancelling gradient sums to compare)."""
    torch.manual_seed(0)
    return nn.Sequential(
        random_affine(BatchRenorm2d(3, momentum=0.3, r_max=1.5, d_max=0.5, micro_batch=2)),
        nn.Tanh(),
        random_affine(BatchRenorm2d(3, momentum=0.3, r_max=1.5, d_max=0.5,
                                    output_clip=(-1.0, 1.5))),
        nn.Tanh(),
        random_affine(BatchRenorm2d(3, track_running_stats=False, micro_batch=3)),
        nn.Tanh(), nn.Flatten(),
        random_affine(BatchRenorm1d(48, momentum=0.3, micro_batch=3, output_clip=(-2.0, 2.0))))


class _Parallel(nn.Module):
    """Layers applied side by side to one input, outputs concatenated along dim 1: each
    layer's gradients come straight from the loss, not through 16-bit arithmetic of the
    layers after it (whose rounding the compiler and eager mode do differently)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        return torch.cat([layer(x) for layer in self.layers], dim=1)


def _low_precision_model():
    """Float32 layers fed a 16-bit input: plain, and micro-batched with clipping."""
    torch.manual_seed(0)
    return _Parallel(
        random_affine(BatchRenorm2d(3, momentum=0.3, r_max=1.5, d_max=0.5)),
        random_affine(BatchRenorm2d(3, momentum=0.3, r_max=1.5, d_max=0.5, micro_batch=2,
                                    output_clip=(-1.5, 1.5))))


def _train_step(model, optimizer, step, dtype, channels_last):
    x = batch(step, SHAPE, dtype, channels_last=channels_last)
    optimizer.zero_grad()
    y = model(x)
    (y.float() ** 2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    return y.detach(), grads


def _check_compiled_matches_eager(eager, dtype=torch.float32, channels_last=False):
    """Train a compiled copy of ``eager`` next to it for ``STEPS`` steps, with no
    recompilation after the first, each step from eager's parameters and buffers (so that
    rounding differences do not compound): outputs, gradients and buffers match at every
    step, and so does inference afterwards."""
    bound = BOUND[dtype]
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (eager, compiled_model)]
    for step in range(STEPS):
        with torch.no_grad():
            for mine, theirs in zip(compiled_model.state_dict().values(),
                                    eager.state_dict().values(), strict=True):
                mine.copy_(theirs)
        y, grads = _train_step(eager, optimizers[0], step, dtype, channels_last)
        with torch.compiler.set_stance("fail_on_recompile" if step else "default"):
            y_compiled, grads_compiled = _train_step(compiled, optimizers[1], step, dtype,
                                                     channels_last)
        assert is_close(y_compiled, y, bound), step
        # the compiled statistics come from another kernel (var_mean): gradients whose
        # sums cancel (a norm layer before another) differ by its rounding times the
        # cancellation, so each is held to the bound relative to the largest gradient
        scale = max(float(grad.norm()) for grad in grads)
        for grad, grad_compiled in zip(grads, grads_compiled, strict=True):
            error = float((grad_compiled.double() - grad.double()).norm())
            assert math.isfinite(error) and error <= 10 * bound * scale, step
        for name, buffer in eager.named_buffers():
            if buffer.is_floating_point():
                assert is_close(compiled_model.get_buffer(name), buffer, 1e-5), (step, name)
            else:
                assert torch.equal(compiled_model.get_buffer(name), buffer), (step, name)
    eager.eval()
    compiled.eval()
    x = batch(STEPS, SHAPE, dtype, channels_last=channels_last)
    with torch.no_grad():
        assert is_close(compiled(x), eager(x), bound)


pytestmark = [pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:torch")]


def test_compiled_native_path_matches_eager():
    _check_compiled_matches_eager(_plain_model())


def test_compiled_micro_batches_clip_and_no_running_stats_match_eager():
    _check_compiled_matches_eager(_options_model(), channels_last=True)


def test_compiled_low_precision_input_matches_eager():
    _check_compiled_matches_eager(_low_precision_model(), dtype=torch.bfloat16)


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
