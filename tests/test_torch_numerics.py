"""Numerics of the PyTorch layers against the float64 reference (specification section 6), and of
the native fast path against the core's generic path (specification section 4)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_torch_support import (  # noqa: E402
    BOUND,
    batch,
    check_training,
    is_close,
    numpy,
    random_affine,
    without_compiled_features,
)
from torch import nn  # noqa: E402

from portable_brn import schedules  # noqa: E402
from portable_brn.adapters.torch import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d  # noqa: E402
from portable_brn.adapters.torch.functional import _core_train, _native_train  # noqa: E402
from portable_brn.state import RenormState  # noqa: E402

from conftest import rel_err  # noqa: E402

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


@pytest.mark.usefixtures("features")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("layer_class", "shape", "options"),
                         [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_fifty_steps_match_the_reference(layer_class, shape, options, dtype):
    layer = random_affine(layer_class(shape[1], dtype=dtype, **options))
    clipped = check_training(layer, shape, dtype, STEPS)
    assert 0.1 < clipped < 0.9  # clipping binds in some steps and features, not all


@pytest.mark.usefixtures("features")
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
       double=st.booleans(), compiled_features=st.booleans())
def test_native_path_equals_core_path(rows, channels, spatial, rank, r_max, d_max, momentum,
                                      step, seed, double, compiled_features):
    """The fast path, with ``features.cpp`` or tensor ops, is held to the core's generic
    path: output, gradients and state."""
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
    with without_compiled_features(not compiled_features):
        native = _one_step(lambda *a: _native_train(*a), *args)
    core = _one_step(lambda x, w, b, s, c, f: _core_train(x, w, b, s, c, None, f), *args)
    assume(_cancellation(x, grad, weight, bias, core) <= 10)
    for name, value in core.items():
        if value.dtype in (torch.bool, torch.int64):
            assert torch.equal(native[name], value), name
        elif name == "mean":  # old + momentum * (mu_B - old) may cancel to near zero:
            # hold it to the bound relative to what was added, not to the small result
            scale = float(mean.double().norm() + value.double().norm() + 1.0)
            error = float((native[name].double() - value.double()).norm())
            assert math.isfinite(error) and error <= BOUND[dtype] * scale, name
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
    """specification section 4: dx is orthogonal to the constant vector and to x, per feature,
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


# -- every configuration on the native kernels -------------------------------------------

NATIVE_CONFIGS = [
    ("2d", BatchRenorm2d, (4, 3, 4, 4), {}, False),
    ("2d-channels-last", BatchRenorm2d, (4, 3, 4, 4), {}, True),
    ("1d-rows", BatchRenorm1d, (16, 5), {}, False),
    ("no-affine-2d", BatchRenorm2d, (4, 3, 3, 3), {"affine": False}, False),
    ("micro-batch-2d", BatchRenorm2d, (8, 3, 3, 3), {"micro_batch": 2}, False),
    ("micro-batch-channels-last", BatchRenorm2d, (8, 3, 3, 3), {"micro_batch": 4}, True),
    ("micro-batch-1d-rows", BatchRenorm1d, (12, 4), {"micro_batch": 3}, False),
    ("micro-batch-1d-sequence", BatchRenorm1d, (6, 3, 5), {"micro_batch": 2}, False),
    ("micro-batch-3d", BatchRenorm3d, (4, 2, 3, 2, 3), {"micro_batch": 2}, False),
    ("output-clip-2d", BatchRenorm2d, (4, 3, 4, 4), {"output_clip": (-1.0, 1.5)}, False),
    ("output-clip-channels-last", BatchRenorm2d, (4, 3, 4, 4), {"output_clip": (-1.0, 1.5)},
     True),
    ("output-clip-micro-batch-1d", BatchRenorm1d, (12, 4),
     {"output_clip": (-1.0, 1.0), "micro_batch": 6}, False),
    ("no-affine-clip", BatchRenorm2d, (4, 3, 3, 3), {"affine": False, "output_clip": (-1.0, 1.0)},
     False),
]


@pytest.fixture(params=["compiled", "tensor"])
def features(request, monkeypatch):
    """Each native step twice: per-feature algebra by ``features.cpp`` and by tensor ops."""
    from portable_brn.adapters.torch import compiled
    if request.param == "tensor":
        monkeypatch.setattr(compiled, "library", lambda: None)
    elif compiled.library() is None:
        from portable_brn.conformance.ci import in_ci
        assert not in_ci(), "features.cpp did not build"
        pytest.skip("features.cpp does not build here (no C++ compiler or ninja)")
    return request.param


@pytest.fixture
def core_path_forbidden(monkeypatch):
    """The core's generic path raises: what runs is the native one."""
    from portable_brn.adapters.torch import functional

    def forbidden(*args):
        raise AssertionError("the core's generic path ran")
    monkeypatch.setattr(functional._CoreRenorm, "apply", forbidden)


@pytest.mark.usefixtures("features")
@pytest.mark.usefixtures("core_path_forbidden")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize(("layer_class", "shape", "options", "channels_last"),
                         [c[1:] for c in NATIVE_CONFIGS], ids=[c[0] for c in NATIVE_CONFIGS])
def test_every_configuration_runs_natively_and_matches_the_reference(
        layer_class, shape, options, channels_last, dtype):
    """16-bit inputs train a float32 layer: float32 statistics and state, output and
    gradients in the input dtype, all within specification section 6 of the float64 reference."""
    layer = random_affine(layer_class(shape[1], r_max=1.3, d_max=0.4, momentum=0.3,
                                      **options))
    check_training(layer, shape, dtype, 10, channels_last=channels_last)
    assert layer.running_mean.dtype == torch.float32 == layer.running_std.dtype


@pytest.mark.usefixtures("core_path_forbidden")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("options", [{"micro_batch": 2}, {"output_clip": (-1.0, 1.0)},
                                     {"micro_batch": 3, "output_clip": (-0.5, 2.0)}],
                         ids=["micro-batch", "output-clip", "both"])
def test_no_running_stats_runs_natively_and_matches_the_reference(options, dtype):
    """track_running_stats=False: batch statistics alone (r = 1, d = 0) with the
    configuration's micro-batches and clip, in both modes."""
    from portable_brn.conformance import reference
    layer = random_affine(BatchRenorm2d(3, track_running_stats=False, **options))
    x = batch(0, (6, 3, 4, 4), dtype).requires_grad_(True)
    grad = batch(0, (6, 3, 4, 4), dtype, seed=1)
    expected = reference.train_step(numpy(x), np.zeros(3), np.ones(3), 0, numpy(layer.weight),
                                    numpy(layer.bias), numpy(grad), eps=layer.eps,
                                    r_max=1.0, d_max=0.0, **options)
    for training in (True, False):
        layer.train(training)
        x.grad = layer.weight.grad = layer.bias.grad = None
        y = layer(x)
        y.backward(grad)
        for name, actual in (("y", y), ("dx", x.grad), ("dweight", layer.weight.grad),
                             ("dbias", layer.bias.grad)):
            assert is_close(actual, expected[name], BOUND[dtype]), (training, name)


@pytest.mark.usefixtures("core_path_forbidden")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_autocast_input_runs_natively_and_matches_the_reference(dtype):
    """Under ``torch.autocast`` a convolution hands the layer a 16-bit tensor; the layer
    keeps float32 state and returns the input's dtype, within the specification's 16-bit
    bound of the reference on that same input."""
    from portable_brn.conformance import reference
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    layer = random_affine(BatchRenorm2d(4, r_max=1.3, d_max=0.4, micro_batch=2))
    seen = {}
    layer.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    x = batch(0, (4, 3, 6, 6), torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(conv(x))
    assert seen["x"].dtype == dtype and y.dtype == dtype
    expected = reference.train_step(numpy(seen["x"]), np.zeros(4), np.ones(4), 0,
                                    numpy(layer.weight), numpy(layer.bias), r_max=1.3,
                                    d_max=0.4, micro_batch=2, eps=layer.eps,
                                    momentum=layer.momentum)
    assert is_close(y, expected["y"], BOUND[dtype])
    assert layer.running_mean.dtype == torch.float32
    assert is_close(layer.running_mean, expected["mean"], 1e-5)
    assert is_close(layer.running_std, expected["std"], 1e-5)


# -- float32 accuracy at large offsets ----------------------------------------------------

OFFSET_LAYOUTS = {"nchw": ((16, 8, 6, 6), False), "channels-last": ((16, 8, 6, 6), True),
                  "rows": ((256, 32), False)}


def _offset_step(train, layout, offset, **options):
    """One float32 step at ``x = offset + N(0, 1)`` (state near the data) by ``train``, and
    the relative error of each result against the float64 reference on the same inputs."""
    from portable_brn.conformance import reference
    shape, channels_last = OFFSET_LAYOUTS[layout]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=generator) + offset
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape, generator=generator)
    channels = shape[1]
    weight = torch.rand(channels, generator=generator) + 0.5
    bias = torch.randn(channels, generator=generator)
    mean = offset + 0.1 * torch.randn(channels, generator=generator)
    std = torch.rand(channels, generator=generator) + 0.5
    config = BatchRenorm1d(channels, r_max=1.5, d_max=0.5, momentum=0.1, **options).config
    expected = reference.train_step(numpy(x), numpy(mean), numpy(std), 3, numpy(weight),
                                    numpy(bias), numpy(grad), r_max=1.5, d_max=0.5,
                                    momentum=0.1, eps=config.eps, **options)
    got = _one_step(train, x, grad, weight, bias, mean, std, torch.tensor(3), config)
    names = {"y": "y", "dx": "dx", "dweight": "dweight", "dbias": "dbias", "mean": "mean",
             "std": "std"}
    return {name: rel_err(numpy(got[name]), expected[key]) for name, key in names.items()}


def _native(*args):
    return _native_train(*args)


def _core(x, weight, bias, state, config, finite):
    return _core_train(x, weight, bias, state, config, None, finite)


@pytest.mark.usefixtures("features")
@pytest.mark.parametrize("layout", list(OFFSET_LAYOUTS))
def test_float32_at_offset_100_is_within_spec(layout):
    """x = 100 + N(0, 1): y, dx, the gradients and the new state within the specification's
    1e-5 of a float64 computation of the same step on the same float32 inputs."""
    errors = _offset_step(_native, layout, 100.0)
    assert all(error <= 1e-5 for error in errors.values()), errors


@pytest.mark.usefixtures("features")
@pytest.mark.parametrize("options", [{"micro_batch": 4}, {"output_clip": (-1.0, 1.0)}],
                         ids=["micro-batch", "output-clip"])
@pytest.mark.parametrize("layout", list(OFFSET_LAYOUTS))
def test_float32_options_at_offset_100_are_within_spec(layout, options):
    """Micro-batches and output clipping keep the specification's 1e-5 at x = 100 + N(0, 1) too."""
    errors = _offset_step(_native, layout, 100.0, **options)
    assert all(error <= 1e-5 for error in errors.values()), errors


@pytest.mark.usefixtures("features")
@pytest.mark.parametrize("layout", list(OFFSET_LAYOUTS))
def test_float32_at_offset_1e4_is_no_worse_than_twice_the_generic_path(layout):
    """x = 1e4 + N(0, 1): float32 itself limits the batch mean; the native path's error is
    at most twice the core's generic path's.  Errors that owe nothing to the offset
    (float32 sums such as dbias, where the core accumulates in float64) may reach a
    tenth of the specification's bound."""
    native = _offset_step(_native, layout, 1e4)
    core = _offset_step(_core, layout, 1e4)
    for name, error in native.items():
        assert math.isfinite(error) and error <= max(2 * core[name], 1e-6), (name, native,
                                                                                core)


@pytest.mark.usefixtures("features")
@pytest.mark.parametrize("options", [{}, {"micro_batch": 4}, {"output_clip": (-1.0, 1.0)}],
                         ids=["plain", "micro-batch", "output-clip"])
@pytest.mark.parametrize("layout", list(OFFSET_LAYOUTS))
@pytest.mark.parametrize("offset", [2.9, 3.2], ids=["below-shift", "above-shift"])
def test_float32_near_the_shift_threshold_is_within_spec(layout, options, offset):
    """x = offset + N(0, 1) on either side of ``SHIFT_ABOVE`` (unshifted below it, shifted
    above): the specification's 1e-5 both ways."""
    from portable_brn.adapters.torch.functional import SHIFT_ABOVE
    assert abs(offset - SHIFT_ABOVE) < 0.3
    errors = _offset_step(_native, layout, offset, **options)
    assert all(error <= 1e-5 for error in errors.values()), errors


@pytest.mark.usefixtures("core_path_forbidden")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("options", [{"micro_batch": 2}, {"micro_batch": 2,
                                                          "output_clip": (-1.0, 1.5)}],
                         ids=["micro-batch", "micro-batch-clip"])
def test_large_micro_batches_run_slice_by_slice_and_match_the_reference(options,
                                                                      channels_last, dtype):
    """Micro-batches of 64 Ki values or more take batch norm's kernels one slice at a
    time (``_slice_by_slice``), held to the reference like the grouped views above."""
    from portable_brn.adapters.torch.functional import _slice_by_slice
    shape = (4, 8, 96, 96)
    assert _slice_by_slice(torch.empty(shape), 2)
    layer = random_affine(BatchRenorm2d(8, r_max=1.3, d_max=0.4, momentum=0.3, **options))
    check_training(layer, shape, dtype, 3, channels_last=channels_last)
