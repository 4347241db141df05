"""Numerics of the PyTorch layers against the float64 reference (SPEC section 6), and of
the native fast path against the core's generic path (SPEC section 4)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_torch_support import BOUND, check_training, is_close, random_affine  # noqa: E402

from portable_brn import schedules  # noqa: E402
from portable_brn.adapters.torch import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d  # noqa: E402
from portable_brn.adapters.torch.functional import _core_train, _native_train  # noqa: E402
from portable_brn.state import RenormState  # noqa: E402

STEPS = 50

CLIPS = {"r_max": 1.5, "d_max": 1.0, "momentum": 0.3}  # clip binds in 25-40% of cases

# (id, layer class, input shape, options): every option, both paths, ranks 2 to 5.
CONFIGS = [
    ("clip-binds", BatchRenorm2d, (6, 3, 4, 4), CLIPS),
    ("1d-rows", BatchRenorm1d, (16, 5), CLIPS),
    ("1d-sequence", BatchRenorm1d, (4, 3, 6), CLIPS),
    ("3d", BatchRenorm3d, (3, 2, 3, 2, 4), CLIPS),
    ("no-affine", BatchRenorm2d, (4, 3, 3, 3), {"affine": False, **CLIPS}),
    ("warmup-schedules", BatchRenorm2d, (4, 3, 3, 3),
     {"warmup_steps": 10, "r_max": schedules.linear(1.0, 2.0, 10, 30),
      "d_max": schedules.linear(0.0, 1.0, 12, 40), "r_min": 0.7, "momentum": 0.3}),
    ("micro-batch", BatchRenorm2d, (8, 3, 3, 3), {"micro_batch": 4, **CLIPS}),
    ("output-clip", BatchRenorm2d, (4, 3, 4, 4), {"output_clip": (-1.5, 2.0), **CLIPS}),
    ("micro-batch-clip-1d", BatchRenorm1d, (12, 4),
     {"micro_batch": 3, "output_clip": (-1.0, 1.0), "warmup_steps": 5, "momentum": 0.1}),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("layer_class", "shape", "options"),
                         [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_fifty_steps_match_the_reference(layer_class, shape, options, dtype):
    layer = random_affine(layer_class(shape[1], dtype=dtype, **options))
    clipped = check_training(layer, shape, dtype, STEPS)
    assert 0.1 < clipped < 0.9  # clipping binds in some steps and features, not all


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("options", [{}, {"output_clip": (-1.0, 1.5)}], ids=["native", "core"])
def test_channels_last_matches_the_reference(options, dtype):
    layer = random_affine(BatchRenorm2d(3, dtype=dtype, r_max=1.3, d_max=0.4, momentum=0.1,
                                        **options))
    check_training(layer, (4, 3, 3, 5), dtype, 10, channels_last=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_rows_with_features_not_innermost_match_the_reference(dtype):
    """(N, C) rows whose feature stride is not 1 (a transposed tensor) take the native
    path's batch-norm kernels rather than its one-pass rows form, in both directions."""
    layer = random_affine(BatchRenorm1d(5, dtype=dtype, r_max=1.3, d_max=0.4, momentum=0.1))
    check_training(layer, (16, 5), dtype, 10, column_major=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("options", [{}, {"micro_batch": 2}], ids=["plain", "micro-batch"])
def test_low_precision_matches_the_reference(options, dtype):
    layer = random_affine(BatchRenorm2d(3, r_max=1.3, d_max=0.4, momentum=0.1, **options))
    check_training(layer, (4, 3, 4, 4), dtype, 10)
    assert layer.running_mean.dtype == torch.float32
    assert layer.running_std.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_inference_matches_the_reference(dtype):
    from portable_brn.conformance import reference
    for layer_class, shape in ((BatchRenorm1d, (5, 4)), (BatchRenorm2d, (3, 4, 2, 3))):
        for affine in (True, False):
            layer = random_affine(layer_class(4, affine=affine, dtype=dtype))
            with torch.no_grad():
                layer.running_mean.copy_(torch.randn(4))
                layer.running_std.copy_(0.5 + torch.rand(4))
            layer.eval()
            x = torch.randn(shape, dtype=dtype)
            expected = reference.infer(
                x.double().numpy(), layer.running_mean.double().numpy(),
                layer.running_std.double().numpy(),
                None if layer.weight is None else layer.weight.double().detach().numpy(),
                None if layer.bias is None else layer.bias.double().detach().numpy())
            assert is_close(layer(x), expected, BOUND[dtype])


def _one_step(train, x, grad, weight, bias, mean, std, step, config):
    """Run one training step function on copies; return everything it produced."""
    x = x.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    state = RenormState(mean.clone(), std.clone(), step.clone())
    finite = torch.empty(mean.shape, dtype=torch.bool)
    y = train(x, weight, bias, state, config, finite)
    y.backward(grad)
    return {"y": y, "dx": x.grad, "dweight": weight.grad, "dbias": bias.grad,
            "mean": state.mean, "std": state.std, "step": state.step, "finite": finite}


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(2, 9), channels=st.integers(1, 4), spatial=st.integers(1, 3),
       rank=st.integers(2, 4), r_max=st.floats(1.0, 3.0), d_max=st.floats(0.0, 2.0),
       momentum=st.floats(0.01, 1.0), step=st.integers(0, 20), seed=st.integers(0, 2**16),
       double=st.booleans())
def test_native_path_equals_core_path(rows, channels, spatial, rank, r_max, d_max, momentum,
                                      step, seed, double):
    """The fast path is held to the core's generic path, output, gradients and state."""
    assume(rows * spatial ** (rank - 2) >= 4)  # m = 2 or 3: dx is rounding noise
    dtype = torch.float64 if double else torch.float32
    generator = torch.Generator().manual_seed(seed)
    shape = (rows, channels) + (spatial,) * (rank - 2)
    x = torch.randn(shape, generator=generator, dtype=dtype) * 2 + 1
    grad = torch.randn(shape, generator=generator, dtype=dtype)
    weight, bias = torch.rand(channels, dtype=dtype) + 0.5, torch.randn(channels, dtype=dtype)
    mean, std = torch.randn(channels, dtype=dtype), torch.rand(channels, dtype=dtype) + 0.3
    layer = BatchRenorm1d(channels, eps=1e-9, r_max=r_max, d_max=d_max, momentum=momentum,
                          warmup_steps=5)
    args = (x, grad, weight, bias, mean, std, torch.tensor(step), layer.config)
    native = _one_step(lambda *a: _native_train(*a), *args)
    core = _one_step(lambda x, w, b, s, c, f: _core_train(x, w, b, s, c, None, f), *args)
    assume(_cancellation(x, grad, weight, bias, core) <= 10)
    for name, value in core.items():
        if value.dtype in (torch.bool, torch.int64):
            assert torch.equal(native[name], value), name
        else:
            assert is_close(native[name], value, BOUND[dtype]), name
    _assert_dx_orthogonal(native["dx"], x, grad * weight.reshape((1, -1) + (1,) * (rank - 2)))


def _cancellation(x, grad, weight, bias, result) -> float:
    """How much the gradient sums cancel (sum of |terms| over |sum|, worst feature): two
    correct float evaluations may differ by that much times the rounding unit."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    axes = tuple(a for a in range(x.dim()) if a != 1)
    z = (result["y"].detach() - bias.reshape(view)) / weight.reshape(view)
    ratios = [grad.abs().sum(axes) / grad.sum(axes).abs(),
              (grad * z).abs().sum(axes) / (grad * z).sum(axes).abs(),
              3 * (grad * weight.reshape(view)).norm() / (x.std(axes, correction=0).min()
                                                          * result["dx"].norm())]
    return max(float(torch.max(r)) for r in ratios)


def _assert_dx_orthogonal(dx, x, weighted_grad):
    """SPEC section 4: dx is orthogonal to the constant vector and to x, per feature,
    up to rounding of terms as large as r_max * |weight * g| * (1 + |x|) / sigma_B and
    to eps / sigma_B**2 (the layer's eps is 1e-9: with eps, mean(x_hat**2) < 1)."""
    axes = tuple(a for a in range(x.dim()) if a != 1)
    sigma = x.std(axes, correction=0) + 1e-3
    scale = 3 * (weighted_grad.abs() * (1 + x.abs())).sum(axes) / sigma
    tolerance = 1e-4 if dx.dtype == torch.float32 else 1e-8
    assert torch.all(dx.sum(axes).abs() <= tolerance * scale)
    assert torch.all((dx * x).sum(axes).abs() <= tolerance * scale)


def test_training_output_equals_inference_when_no_clip_binds():
    """The paper's central property, on the native path."""
    layer = random_affine(BatchRenorm2d(3, dtype=torch.float64, r_max=100.0, d_max=100.0))
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        layer.running_std.copy_(torch.tensor([2.0, 0.5, 1.5]))
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    layer.eval()
    expected = layer(x)
    layer.train()
    assert is_close(layer(x), expected.detach().numpy(), 1e-12)
