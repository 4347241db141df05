"""The PyTorch layers as drop-ins for ``torch.nn.BatchNorm*``: construction, buffers,
modes, state dicts, bad input, and how they work with the rest of PyTorch."""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from test_torch_support import (  # noqa: E402
    BOUND,
    assert_same_state,
    batch,
    is_close,
    numpy,
    random_affine,
    reference_options,
    state_of,
)

from portable_brn import schedules  # noqa: E402
from portable_brn.adapters.torch import (  # noqa: E402
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    SyncBatchRenorm,
    _BatchRenorm,
)
from portable_brn.conformance import reference  # noqa: E402

LAYERS = [(BatchRenorm1d, (4, 3)), (BatchRenorm1d, (4, 3, 5)), (BatchRenorm2d, (4, 3, 2, 2)),
          (BatchRenorm3d, (2, 3, 2, 2, 2)), (SyncBatchRenorm, (4, 3, 2))]


def _train(layer, steps=3, shape=(4, 3, 2, 2), **batch_options):
    """A few training steps with ``batch``'s drifting data; returns the last output."""
    layer.train()
    for step in range(steps):
        y = layer(batch(step, shape, layer.running_mean.dtype, **batch_options))
    return y


# -- construction ------------------------------------------------------------------


def test_defaults_follow_the_paper_and_batch_norm():
    layer = BatchRenorm2d(5)
    assert isinstance(layer, _BatchRenorm)
    assert (layer.eps, layer.momentum, layer.affine, layer.track_running_stats) == (
        1e-3, 0.01, True, True)
    assert (layer.config.r_max, layer.config.d_max, layer.config.r_min) == (3.0, 5.0, None)
    assert torch.equal(layer.weight, torch.ones(5)) and torch.equal(layer.bias, torch.zeros(5))
    assert torch.equal(layer.running_mean, torch.zeros(5))
    assert torch.equal(layer.running_std, torch.ones(5))
    assert layer.num_batches_tracked.dtype == torch.long and int(layer.num_batches_tracked) == 0
    assert list(layer.state_dict()) == ["weight", "bias", "running_mean", "running_std",
                                        "num_batches_tracked"]


def test_factory_arguments_and_options():
    layer = BatchRenorm1d(3, dtype=torch.float64, device="cpu", r_max=2.0, d_max=1.0,
                          r_min=0.25, warmup_steps=7, micro_batch=2, output_clip=(-1, 1))
    assert layer.weight.dtype == layer.running_std.dtype == torch.float64
    c = layer.config
    assert (c.r_max, c.d_max, c.r_min, c.warmup_steps, c.micro_batch, c.output_clip) == (
        2.0, 1.0, 0.25, 7, 2, (-1.0, 1.0))


@pytest.mark.parametrize(("options", "error", "name"), [
    ({"eps": 0.0}, ValueError, "eps"),
    ({"eps": -1e-3}, ValueError, "eps"),
    ({"momentum": 0.0}, ValueError, "momentum"),
    ({"momentum": 1.5}, ValueError, "momentum"),
    ({"momentum": "0.1"}, TypeError, "momentum"),
    ({"r_max": 0.5}, ValueError, "r_max"),
    ({"d_max": -1.0}, ValueError, "d_max"),
    ({"r_min": 0.0}, ValueError, "r_min"),
    ({"r_min": 1.5}, ValueError, "r_min"),
    ({"warmup_steps": -1}, ValueError, "warmup_steps"),
    ({"micro_batch": 0}, ValueError, "micro_batch"),
    ({"output_clip": (1.0, -1.0)}, ValueError, "output_clip"),
    ({"num_features": 0}, ValueError, "num_features"),
    ({"num_features": 2.5}, TypeError, "num_features"),
])
def test_invalid_hyperparameters_name_the_argument(options, error, name):
    options = {"num_features": 3, **options}
    with pytest.raises(error, match=name):
        BatchRenorm2d(**options)


def test_eps_and_momentum_are_settable_and_validated():
    layer = BatchRenorm2d(2)
    layer.momentum = 0.1
    layer.eps = 1e-5
    assert (layer.config.momentum, layer.config.eps) == (0.1, 1e-5)
    with pytest.raises(ValueError, match="momentum"):
        layer.momentum = 2.0
    assert layer.momentum == 0.1


def test_extra_repr_shows_the_options():
    text = repr(BatchRenorm2d(4, momentum=0.1, warmup_steps=3, output_clip=(-2, 2)))
    for part in ("BatchRenorm2d(4", "eps=0.001", "momentum=0.1", "affine=True",
                 "track_running_stats=True", "r_max=3.0", "d_max=5.0", "warmup_steps=3",
                 "output_clip=(-2.0, 2.0)"):
        assert part in text
    assert "micro_batch" not in text


# -- modes and state -----------------------------------------------------------------


def test_train_moves_the_state_and_eval_uses_it():
    layer = random_affine(BatchRenorm2d(3, dtype=torch.float64, momentum=0.5))
    _train(layer)
    assert int(layer.num_batches_tracked) == 3
    before = state_of(layer)
    layer.eval()
    x = batch(9, (4, 3, 2, 2), torch.float64)
    view = (1, 3, 1, 1)
    expected = ((x - layer.running_mean.view(view)) / layer.running_std.view(view)
                * layer.weight.view(view) + layer.bias.view(view))
    assert is_close(layer(x), expected, 1e-13)
    assert_same_state(before, layer)


def test_reset_running_stats_and_parameters():
    layer = random_affine(BatchRenorm2d(3, momentum=0.5))
    _train(layer)
    layer.reset_running_stats()
    assert int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.running_std, torch.ones(3))
    assert not torch.equal(layer.weight, torch.ones(3))
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.ones(3)) and torch.equal(layer.bias, torch.zeros(3))


@pytest.mark.parametrize("options", [{}, {"output_clip": (-10.0, 10.0)}], ids=["native", "core"])
def test_without_running_stats_it_is_batch_norm_in_both_modes(options):
    """track_running_stats=False: batch statistics always, r = 1 and d = 0."""
    layer = random_affine(BatchRenorm2d(3, track_running_stats=False, dtype=torch.float64,
                                        **options))
    native = torch.nn.BatchNorm2d(3, eps=1e-3, track_running_stats=False, dtype=torch.float64)
    native.load_state_dict(layer.state_dict())
    assert layer.running_mean is None and layer.num_batches_tracked is None
    assert "running_std" not in layer.state_dict()
    for training in (True, False):
        layer.train(training)
        native.train(training)
        x = batch(0, (4, 3, 2, 2), torch.float64)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        grad = torch.randn_like(x)
        layer(xs[0]).backward(grad)
        expected = native(xs[1])
        expected.backward(grad)
        assert is_close(layer(x), expected, 1e-12)
        assert is_close(xs[0].grad, xs[1].grad, 1e-12)
        assert is_close(layer.weight.grad, native.weight.grad, 1e-12)


def test_state_dict_round_trips_through_torch_save_and_restores_the_step():
    options = {"warmup_steps": 4, "r_max": schedules.linear(1.0, 3.0, 4, 10), "momentum": 0.3}
    layer = random_affine(BatchRenorm2d(3, **options))
    _train(layer, steps=6)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    loaded = BatchRenorm2d(3, **options)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert int(loaded.num_batches_tracked) == 6
    x = batch(6, (4, 3, 2, 2), torch.float32)
    assert torch.equal(loaded(x), layer(x))  # same step: past warm-up, same r_max
    assert_same_state(state_of(layer), loaded)


# -- bad input: a clear error and no state change --------------------------------------


@pytest.mark.parametrize(("layer_class", "good_shape"), LAYERS)
def test_wrong_rank_raises_like_batch_norm(layer_class, good_shape):
    layer = layer_class(3)
    before = state_of(layer)
    bad = torch.randn(3) if layer_class is not BatchRenorm1d else torch.randn(2, 3, 2, 2)
    with pytest.raises(ValueError, match=r"expected .*D input \(got \dD input\)"):
        layer(bad)
    assert_same_state(before, layer)
    assert layer(torch.randn(good_shape)).shape == good_shape


@pytest.mark.parametrize(("x", "error", "match"), [
    (torch.ones(4, 3, 2, 2, dtype=torch.int64), TypeError, "floating point dtype"),
    (torch.ones(4, 3, 2, 2, dtype=torch.bool), TypeError, "floating point dtype"),
    (torch.ones(4, 3, 2, 2, dtype=torch.complex64), TypeError, "floating point dtype"),
    (torch.ones(4, 5, 2, 2), ValueError, "5 features along dim 1 .*num_features=3"),
    (torch.ones(1, 3, 1, 1), ValueError, "more than 1 value per channel"),
    (torch.ones(5, 3, 2, 2).numpy(), TypeError, "input must be a torch.Tensor"),
])
@pytest.mark.parametrize("options", [{}, {"micro_batch": 1, "output_clip": (-1, 1)}],
                         ids=["native", "core"])
def test_bad_input_raises_and_leaves_the_state(x, error, match, options):
    layer = BatchRenorm2d(3, **options)
    _train(layer, steps=1)
    before = state_of(layer)
    with pytest.raises(error, match=match):
        layer(x)
    assert_same_state(before, layer)


def test_micro_batch_that_does_not_divide_the_batch_raises_and_leaves_the_state():
    layer = BatchRenorm2d(3, micro_batch=3)
    before = state_of(layer)
    with pytest.raises(ValueError, match="micro_batch=3 does not divide the batch size 4"):
        layer(torch.randn(4, 3, 2, 2))
    assert_same_state(before, layer)


OTHER_DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", OTHER_DEVICES)
@pytest.mark.parametrize("options", [{}, {"micro_batch": 2, "output_clip": (-1, 1)}],
                         ids=["native", "core"])
def test_input_on_another_device_raises_and_leaves_the_state(device, options):
    layer = random_affine(BatchRenorm2d(3, momentum=0.5, **options))
    _train(layer, steps=2)
    before = state_of(layer)
    with pytest.raises(ValueError, match=rf"input is on {device}.* on cpu"):
        layer(torch.randn(4, 3, 2, 2, device=device))
    assert_same_state(before, layer)
    assert int(layer.num_batches_tracked) == 2


@pytest.mark.parametrize("options", [{}, {"micro_batch": 2}], ids=["native", "core"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 3e38])
def test_a_non_finite_batch_never_poisons_the_running_statistics(options, bad):
    layer = BatchRenorm2d(3, momentum=0.5, **options)
    _train(layer, steps=2)
    before = state_of(layer)
    x = torch.randn(4, 3, 2, 2)
    x[1, 1, 0, 0] = bad
    layer(x)
    assert layer.last_finite.tolist() == [True, False, True]
    assert torch.equal(layer.running_mean[1], before["running_mean"][1])
    assert torch.equal(layer.running_std[1], before["running_std"][1])
    assert not torch.equal(layer.running_mean[0], before["running_mean"][0])
    assert torch.isfinite(layer.running_std).all()
    assert int(layer.num_batches_tracked) == 3
    layer(torch.randn(4, 3, 2, 2))
    assert layer.last_finite.all()


# -- the rest of PyTorch ---------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"output_clip": (-3.0, 3.0)}], ids=["native", "core"])
def test_channels_last_keeps_its_memory_format(options):
    layer = BatchRenorm2d(3, **options)
    x = torch.randn(4, 3, 5, 6).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = layer(x)
    y.backward(torch.randn_like(y))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    layer.eval()
    assert layer(x).is_contiguous(memory_format=torch.channels_last)


def test_functional_call_uses_the_given_parameters_and_buffers():
    layer = BatchRenorm2d(3, momentum=0.5)
    weight = torch.full((3,), 2.0, requires_grad=True)
    buffers = {name: b.clone() for name, b in layer.named_buffers()}
    x = batch(0, (4, 3, 2, 2), torch.float32)
    y = torch.func.functional_call(layer, {"weight": weight, "bias": layer.bias, **buffers},
                                   (x,))
    y.sum().backward()
    expected = BatchRenorm2d(3, momentum=0.5)
    with torch.no_grad():
        expected.weight.fill_(2.0)
    assert torch.allclose(y, expected(x))
    assert weight.grad is not None and layer.weight.grad is None
    assert int(buffers["num_batches_tracked"]) == 1 and int(layer.num_batches_tracked) == 0
    assert torch.equal(buffers["running_mean"], expected.running_mean)


@pytest.mark.parametrize("options", [{}, {"micro_batch": 2}], ids=["plain", "micro-batch"])
def test_autocast_keeps_statistics_in_float32_and_output_in_the_input_dtype(options):
    conv = torch.nn.Conv2d(2, 3, 1)
    layer = BatchRenorm2d(3, momentum=0.5, **options)
    x = torch.randn(4, 2, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = conv(x)
        y = layer(hidden)
        y_float = layer(hidden.float())
    assert hidden.dtype == y.dtype == torch.bfloat16
    assert y_float.dtype == torch.float32
    assert layer.running_mean.dtype == layer.running_std.dtype == torch.float32
    y.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    reference = BatchRenorm2d(3, momentum=0.5, **options)
    expected = reference(hidden.detach().float())
    assert is_close(y, expected, BOUND[torch.bfloat16])


@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (8, 3)], ids=["2d", "rows"])
def test_double_backward_is_refused(shape):
    """The Python autograd.Function and the compiled (N, C) step alike."""
    from portable_brn.adapters.torch import compiled
    if len(shape) == 2 and compiled.library() is None:
        pytest.skip("features.cpp does not build here: rows take batch norm's own op")
    layer = BatchRenorm2d(3) if len(shape) == 4 else BatchRenorm1d(3)
    x = torch.randn(*shape, requires_grad=True)
    (dx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|does not require grad"):
        dx.sum().backward()


def test_plain_batch_norm_when_r_and_d_cannot_move():
    """r_max = 1 and d_max = 0: the training output is batch norm's (specification section 2)."""
    layer = random_affine(BatchRenorm2d(3, r_max=1.0, d_max=0.0, dtype=torch.float64))
    x = batch(2, (4, 3, 2, 2), torch.float64)
    expected = F.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, 1e-3)
    assert is_close(layer(x), expected, 1e-13)


# -- gradients: r, d and the running statistics are constants (specification section 4) ----------

# running (mean, std) per feature against batch(0)'s mean (-0.94, 1.77, 1.76) and std
# (2.85, 1.34, 1.32) with r_max = 1.5, d_max = 0.5; "some": feature 1 clips r only,
# feature 2 clips d only
GRADIENT_CASES = {
    "no-clip-binds": ([-0.5, 1.5, 2.0], [2.5, 1.2, 1.5]),
    "some-clips-bind": ([-0.5, 1.5, 40.0], [2.5, 30.0, 1.5]),
    "every-clip-binds": ([40.0, -40.0, 40.0], [30.0, 30.0, 0.05]),
}


def _section_4_gradients(x, grad, layer, mean, std):
    """dx, dweight, dbias of specification section 4 in float64 with plain torch (r and d
    constants), and the dx a layer would have if gradient flowed through r and d."""
    axes, view = [0, 2, 3], (1, 3, 1, 1)
    weight = layer.weight.detach().view(view)
    x = x.detach().requires_grad_(True)
    mu_b = x.mean(axes, keepdim=True)
    sigma_b = torch.sqrt((x - mu_b).pow(2).mean(axes, keepdim=True) + layer.eps)
    r_max, d_max = layer.config.r_max, layer.config.d_max
    r = (sigma_b / std.view(view)).clamp(1 / r_max, r_max)
    d = ((mu_b - mean.view(view)) / std.view(view)).clamp(-d_max, d_max)
    x_hat = (x - mu_b) / sigma_b
    (through_r_and_d,) = torch.autograd.grad(x_hat * r + d, x, weight * grad)
    x_hat, r, d = x_hat.detach(), r.detach(), d.detach()
    g_xhat = r * weight * grad
    dx = (g_xhat - g_xhat.mean(axes, keepdim=True)
          - x_hat * (g_xhat * x_hat).mean(axes, keepdim=True)) / sigma_b.detach()
    dweight = (grad * (x_hat * r + d)).sum(axes)
    return dx, dweight, grad.sum(axes), through_r_and_d


@pytest.mark.parametrize("options", [{}, {"output_clip": (-1e3, 1e3)}], ids=["native", "core"])
@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_no_gradient_flows_through_r_d_or_the_running_statistics(case, options):
    """dx is specification section 4's, which holds r and d constant: where a clip does not bind,
    a layer that differentiated through r and d would give another dx."""
    layer = random_affine(BatchRenorm2d(3, dtype=torch.float64, r_max=1.5, d_max=0.5,
                                        **options))
    mean, std = (torch.tensor(v, dtype=torch.float64) for v in GRADIENT_CASES[case])
    with torch.no_grad():
        layer.running_mean.copy_(mean)
        layer.running_std.copy_(std)
    x = batch(0, (6, 3, 2, 2), torch.float64).requires_grad_(True)
    grad = batch(0, (6, 3, 2, 2), torch.float64, seed=1)
    layer(x).backward(grad)
    dx, dweight, dbias, through_r_and_d = _section_4_gradients(x, grad, layer, mean, std)
    assert is_close(x.grad, dx, 1e-12)
    assert is_close(layer.weight.grad, dweight, 1e-12)
    assert is_close(layer.bias.grad, dbias, 1e-12)
    assert all(not b.requires_grad and b.grad is None for b in layer.buffers())
    can_tell = case != "every-clip-binds"
    assert is_close(through_r_and_d, dx, 1e-6) != can_tell


# -- every option is live or read-only ---------------------------------------------------

LIVE_SETTINGS = {"r_max": 1.2, "d_max": 0.1, "r_min": 0.9, "warmup_steps": 5,
                 "micro_batch": 2, "output_clip": (-0.5, 0.5), "eps": 0.5, "momentum": 0.9}


@pytest.mark.parametrize("name", list(LIVE_SETTINGS))
def test_setting_an_option_changes_the_next_step(name):
    """After one step, set the option: the next step is the float64 reference's with the
    new value (and differs from the step with the old one)."""
    def trained():
        layer = random_affine(BatchRenorm2d(3, momentum=0.5, dtype=torch.float64))
        _train(layer, steps=1, shape=(8, 3, 2, 2))
        return layer

    layer, unchanged = trained(), trained()
    setattr(layer, name, LIVE_SETTINGS[name])
    assert getattr(layer, name) == getattr(layer.config, name) == LIVE_SETTINGS[name]
    scale = 0.1 if name == "r_min" else 3.0  # a batch std r_min (r_max, d_max) binds on
    x = (scale * batch(1, (8, 3, 2, 2), torch.float64)).requires_grad_(True)
    grad = batch(1, (8, 3, 2, 2), torch.float64, seed=1)
    mean, std = numpy(layer.running_mean), numpy(layer.running_std)
    y = layer(x)
    y.backward(grad)
    expected = reference.train_step(numpy(x), mean, std, 1, numpy(layer.weight),
                                    numpy(layer.bias), numpy(grad),
                                    **reference_options(layer))
    assert is_close(y, expected["y"], 1e-12)
    assert is_close(x.grad, expected["dx"], 1e-12)
    assert is_close(layer.running_mean, expected["mean"], 1e-12)
    assert is_close(layer.running_std, expected["std"], 1e-12)
    old = unchanged(x.detach())
    assert not (torch.allclose(old, y) and torch.allclose(unchanged.running_std,
                                                          layer.running_std))


@pytest.mark.parametrize(("name", "bad", "error"), [
    ("r_max", 0.5, ValueError), ("d_max", -1.0, ValueError), ("r_min", 2.0, ValueError),
    ("warmup_steps", -1, ValueError), ("warmup_steps", 1.5, TypeError),
    ("micro_batch", 0, ValueError), ("output_clip", (1.0, -1.0), ValueError),
    ("eps", 0.0, ValueError), ("momentum", 1.5, ValueError), ("r_max", "3", TypeError),
])
def test_a_bad_setting_raises_naming_it_and_leaves_the_layer(name, bad, error):
    layer = random_affine(BatchRenorm2d(3, r_max=2.0, micro_batch=2))
    _train(layer, steps=1)
    config, before = layer.config, state_of(layer)
    with pytest.raises(error, match=name):
        setattr(layer, name, bad)
    assert layer.config is config
    assert_same_state(before, layer)


@pytest.mark.parametrize("name", ["num_features", "affine", "track_running_stats"])
def test_options_that_shape_the_buffers_are_read_only(name):
    layer = BatchRenorm2d(3)
    value = getattr(layer, name)
    with pytest.raises(AttributeError, match=rf"{name} of BatchRenorm2d is fixed at "
                                             rf"construction"):
        setattr(layer, name, 4 if name == "num_features" else not value)
    assert getattr(layer, name) == value


@pytest.mark.parametrize("layer_class", [BatchRenorm2d, SyncBatchRenorm])
@pytest.mark.parametrize("options", [{}, {"micro_batch": 2}], ids=["native", "core"])
def test_the_step_counter_advances_on_a_non_finite_batch(layer_class, options):
    """The documented choice: a non-finite batch leaves the statistics but counts as a
    step, so schedules and warm-up keep their pace."""
    layer = layer_class(3, **options)
    _train(layer, steps=2)
    before = state_of(layer)
    layer(torch.full((4, 3, 2, 2), float("nan")))
    assert not layer.last_finite.any()
    assert torch.equal(layer.running_mean, before["running_mean"])
    assert torch.equal(layer.running_std, before["running_std"])
    assert int(layer.num_batches_tracked) == 3
