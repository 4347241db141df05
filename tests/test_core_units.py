"""Unit tests of the core's parts: schedules, config, state, moments, recalibration,
deferred update, warm-up, low precision, the NumPy kernels and the array layer."""

from __future__ import annotations

import dataclasses
import sys
import warnings

import numpy as np
import pytest
from array_api_compat import is_numpy_namespace

import portable_brn as pb
from portable_brn import schedules
from portable_brn.adapters.array import BatchRenorm
from portable_brn.conformance import reference as ref
from portable_brn.kernels import GenericKernel, kernel_for, kernel_forced
from portable_brn.layout import make_layout
from portable_brn.numpy_kernel import NumpyKernel

from conftest import rel_err


@pytest.mark.parametrize(("step", "r_max", "d_max"), [
    (0, 1.0, 0.0), (4999, 1.0, 0.0), (5000, 1.0, 0.0), (12000, 1.4, 1.75),
    (25000, 1.0 + 2.0 * 20000 / 35000, 5.0), (40000, 3.0, 5.0), (90000, 3.0, 5.0),
])
def test_paper_schedule(step, r_max, d_max) -> None:
    paper = schedules.paper()
    t = np.asarray(float(step))
    assert float(paper["r_max"](t)) == pytest.approx(r_max, rel=1e-12)
    assert float(paper["d_max"](t)) == pytest.approx(d_max, rel=1e-12)


def test_constant_schedule_and_ranges() -> None:
    assert schedules.constant(2.0)(np.asarray(7.0)) == 2.0
    assert schedules.linear(3.0, 1.0, 0, 4).value_range() == (1.0, 3.0)
    assert float(schedules.linear(3.0, 1.0, 0, 4)(np.asarray(1.0))) == 2.5


def test_config_is_frozen_and_normalized() -> None:
    config = pb.RenormConfig(feature_axis=[1, 2], output_clip=[-1, 2])
    assert config.feature_axis == (1, 2) and config.output_clip == (-1.0, 2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.eps = 1.0
    assert pb.RenormConfig(**schedules.paper()).r_max == schedules.linear(1, 3, 5000, 40000)


def test_init_state() -> None:
    state = pb.init_state((2, 3), xp=np)
    assert state.mean.shape == (2, 3) and state.mean.dtype == np.float32
    assert np.all(state.std == 1) and int(state.step) == 0 and state.step.dtype == np.int64
    with pytest.raises(ValueError, match=r"^num_features must be a positive int"):
        pb.init_state(0, xp=np)


def test_moments_and_micro_batches() -> None:
    x = np.random.default_rng(0).normal(2.0, 3.0, (8, 3, 5))
    m = pb.moments(x, 1)
    np.testing.assert_allclose(m.mean, x.mean((0, 2)), rtol=1e-13)
    np.testing.assert_allclose(m.var, x.var((0, 2)), rtol=1e-13)
    assert m.count == 40
    grouped = pb.moments(x, 1, micro_batch=2)
    assert grouped.mean.shape == (4, 3) and grouped.count == 10
    np.testing.assert_allclose(grouped.var[1], x[2:4].var((0, 2)), rtol=1e-13)


def test_merge_moments_equals_concatenation() -> None:
    rng = np.random.default_rng(1)
    parts = [rng.normal(i, 1 + i, (n, 4)) for i, n in enumerate((3, 17, 1, 9))]
    merged = pb.merge_moments(pb.moments(p, 1) if len(p) > 1 else
                              pb.Moments(p[0], np.zeros(4), 1) for p in parts)
    whole = np.concatenate(parts)
    assert merged.count == len(whole)
    np.testing.assert_allclose(merged.mean, whole.mean(0), rtol=1e-13)
    np.testing.assert_allclose(merged.var, whole.var(0), rtol=1e-12)
    with pytest.raises(ValueError, match=r"^parts must not be empty"):
        pb.merge_moments([])


def test_recalibrate_matches_reference() -> None:
    rng = np.random.default_rng(2)
    batches = [rng.normal(1.0, 2.0, (n, 3, 4)) for n in (5, 2, 9)]
    state = pb.RenormState(np.zeros(3, np.float32), np.ones(3, np.float32), np.asarray(12))
    new = pb.recalibrate(iter(batches), pb.RenormConfig(eps=1e-4), state=state)
    mean, std = ref.recalibrate(batches, feature_axis=1, eps=1e-4)
    assert rel_err(new.mean, mean) < 1e-6 and rel_err(new.std, std) < 1e-6
    assert new.mean.dtype == np.float32 and int(new.step) == 12
    exact = pb.recalibrate(batches, pb.RenormConfig(eps=1e-4))
    assert rel_err(exact.mean, mean) < 1e-13 and rel_err(exact.std, std) < 1e-13
    with pytest.raises(ValueError, match=r"^batches must not be empty"):
        pb.recalibrate([], pb.RenormConfig())
    with pytest.raises(ValueError, match=r"^batches\[1\] has shape \(2,\) but batches\[0\] "
                                         r"has \(3,\)"):
        pb.recalibrate([batches[0], np.ones((4, 2, 4))], pb.RenormConfig())


def test_deferred_update_matches_reference_recurrent_steps() -> None:
    rng = np.random.default_rng(3)
    xs = [rng.normal(t * 0.3, 1.0 + 0.1 * t, (4, 5)) for t in range(6)]
    weight, bias = rng.normal(size=5), rng.normal(size=5)
    mean, std = rng.normal(size=5) * 0.1, 1.0 + rng.random(5)
    options = dict(momentum=0.1, r_max=1.5, d_max=0.5)
    expected = ref.recurrent_steps(xs, mean, std, 4, weight, bias, **options)
    config = pb.RenormConfig(**options)
    state = pb.RenormState(mean, std, np.asarray(4))
    parts = []
    for x, y_ref in zip(xs, expected["ys"], strict=True):
        y, same, residuals = pb.forward_train(x, state, weight, bias, config, defer_update=True)
        assert same is state
        assert rel_err(y, y_ref) < 1e-12
        parts.append(residuals.moments)
    new, finite = pb.deferred_update(state, parts, config)
    assert np.all(finite) and int(new.step) == expected["step"]
    assert rel_err(new.mean, expected["mean"]) < 1e-12
    assert rel_err(new.std, expected["std"]) < 1e-12


def test_warmup_is_exactly_batch_norm() -> None:
    rng = np.random.default_rng(4)
    state = pb.RenormState(np.full(3, 5.0), np.full(3, 0.1), np.asarray(2))
    config = pb.RenormConfig(warmup_steps=3)
    _, after, residuals = pb.forward_train(rng.standard_normal((6, 3)), state, None, None, config)
    assert np.all(residuals.r == 1.0) and np.all(residuals.d == 0.0)
    _, _, residuals = pb.forward_train(rng.standard_normal((6, 3)), after, None, None, config)
    assert np.all(residuals.r == 3.0) and np.all(residuals.d == -5.0)


def test_float16_keeps_float32_statistics() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(0.5, 2.0, (16, 4, 3)).astype(np.float16)
    dy = rng.standard_normal(x.shape).astype(np.float16)
    state = pb.init_state(4, xp=np)
    weight, bias = np.ones(4, np.float16), np.zeros(4, np.float16)
    y, new, residuals = pb.forward_train(x, state, weight, bias, pb.RenormConfig(r_max=1.2))
    dx, dweight, _ = pb.backward(residuals, dy)
    assert y.dtype == dx.dtype == dweight.dtype == np.float16
    assert new.mean.dtype == new.std.dtype == residuals.r.dtype == np.float32
    expected = ref.train_step(x, state.mean, state.std, 0, weight, bias, dy, r_max=1.2)
    for actual, key in ((y, "y"), (dx, "dx"), (new.mean, "mean"), (new.std, "std")):
        assert rel_err(actual, expected[key]) < 1e-2, key


@pytest.mark.parametrize(("shape", "feature_axis", "micro_batch"), [
    ((8, 6, 5, 4), 1, None), ((8, 6, 5, 4), -1, 2), ((64, 7), 1, None), ((6, 4, 5), (1, 2), 3),
])
@pytest.mark.parametrize("kernel_name", ["NumpyKernel", "NumbaKernel"])
def test_numpy_kernel_agrees_with_generic(shape, feature_axis, micro_batch,
                                          kernel_name) -> None:
    import array_api_compat.numpy as xp
    rng = np.random.default_rng(6)
    layout = make_layout(shape, feature_axis, micro_batch)
    view = np.reshape(rng.normal(0.3, 2.0, shape), layout.view_shape)
    grad = rng.standard_normal(layout.view_shape)
    fast, generic = _numpy_kernel(kernel_name), GenericKernel()
    mean, var = generic.moments(xp, view, layout, None)
    for a, b in zip(fast.moments(xp, view, layout, None), (mean, var), strict=True):
        assert rel_err(a, b) < 1e-13
    inv = 1 / np.sqrt(var + 1e-3)
    for a, b in zip(fast.grad_sums(xp, grad, view, mean, inv, layout),
                    generic.grad_sums(xp, grad, view, mean, inv, layout), strict=True):
        assert rel_err(a, b) < 1e-12
    scale, shift = rng.standard_normal(mean.shape), rng.standard_normal(mean.shape)
    assert rel_err(fast.affine(xp, view, scale, shift, view.dtype, layout),
                   generic.affine(xp, view, scale, shift, view.dtype, layout)) < 1e-14
    for offset in (0.0, 5.0):  # the kernel's uncentered and centered forms
        args = (view + offset, mean + offset, inv, scale, inv, shift, view.dtype, layout)
        assert rel_err(fast.grad_input(xp, grad, *args),
                       generic.grad_input(xp, grad, *args)) < 1e-14


@pytest.mark.parametrize(("rows", "features", "fold"), [
    (1024, 512, 16), (100, 96, 50), (1000, 768, 10), (97, 100, 1), (256, 20000, 1)])
def test_numpy_kernel_folds_rows_up_to_a_wide_row(rows, features, fold) -> None:
    """Rows stand side by side for the elementwise passes only up to about 8,192 values
    a row (never a full-size copy of a per-feature array), and the passes still match
    the generic kernel."""
    x = np.random.default_rng(3).standard_normal((rows, features)).astype(np.float32)
    layout = make_layout(x.shape, 1)
    canon = NumpyKernel._canonical(layout, x).widened()
    assert canon.fold == fold and canon.shape[2] == features * fold
    assert canon.per_feature(np.ones(features, np.float32)).size == features * fold
    import array_api_compat.numpy as xp
    scale, shift = np.full(features, 1.5, np.float32), np.arange(features, dtype=np.float32)
    args = (xp, x, scale.reshape(1, -1), shift.reshape(1, -1), np.float32, layout)
    assert rel_err(NumpyKernel().affine(*args), GenericKernel().affine(*args)) < 1e-7


def _numpy_kernel(name: str) -> NumpyKernel:
    """A fresh NumPy kernel by class name (the Numba one skips where Numba is missing)."""
    if name == "NumbaKernel":
        pytest.importorskip("numba", reason="the Numba kernel needs portable-brn[numba]")
        from portable_brn.numba_kernel import NumbaKernel
        return NumbaKernel()
    return NumpyKernel()


def test_numba_kernel_serves_numpy_when_installed() -> None:
    pytest.importorskip("numba", reason="the Numba kernel needs portable-brn[numba]")
    import array_api_compat.numpy as xp

    from portable_brn.numba_kernel import NumbaKernel
    assert isinstance(kernel_for(xp), NumbaKernel) and isinstance(kernel_for(np), NumbaKernel)
    with kernel_forced(is_numpy_namespace, NumpyKernel()):
        assert type(kernel_for(xp)) is NumpyKernel
    assert isinstance(kernel_for(xp), NumbaKernel)


def test_numpy_keeps_the_ufunc_kernel_when_numba_does_not_import(monkeypatch) -> None:
    pytest.importorskip("numba", reason="the Numba kernel needs portable-brn[numba]")
    from portable_brn import numba_kernel
    monkeypatch.setitem(sys.modules, "numba", None)  # importing it now raises ImportError
    numba_kernel._numba_import_error.cache_clear()
    monkeypatch.setattr(numba_kernel, "_WARNED", set())
    try:
        with pytest.warns(RuntimeWarning, match="Numba is installed but does not import"):
            assert type(kernel_for(np)) is NumpyKernel
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once: the next call just falls back
            assert type(kernel_for(np)) is NumpyKernel
    finally:
        numba_kernel._numba_import_error.cache_clear()


@pytest.mark.parametrize("kernel_name", ["NumpyKernel", "NumbaKernel"])
@pytest.mark.parametrize("shape", [(32, 8, 6, 6), (256, 8)])
def test_numpy_kernel_stays_exact_for_large_means(kernel_name, shape) -> None:
    """One-pass sums would lose every digit here; the kernel falls back to two passes."""
    rng = np.random.default_rng(7)
    x = (1000.0 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    state = pb.RenormState(np.full(8, 1000.0, np.float32), np.ones(8, np.float32),
                           np.asarray(0))
    with kernel_forced(is_numpy_namespace, _numpy_kernel(kernel_name)):
        y, new, residuals = pb.forward_train(x, state, None, None, pb.RenormConfig())
        dx, _, _ = pb.backward(residuals, dy)
    expected = ref.train_step(x, state.mean, state.std, 0, dy=dy)
    assert rel_err(y, expected["y"]) < 1e-4 and rel_err(dx, expected["dx"]) < 1e-4
    assert rel_err(new.std, expected["std"]) < 1e-5


@pytest.mark.parametrize("kernel_name", ["NumpyKernel", "NumbaKernel"])
def test_numpy_kernel_recenters_when_squares_overflow(kernel_name) -> None:
    """x * x overflows float32 here though the batch and its spread are finite: the
    kernel must still give the finite statistics, not a batch the guard would skip."""
    rng = np.random.default_rng(9)
    x = (2e19 + 1e17 * rng.standard_normal((64, 4))).astype(np.float32)
    state = pb.init_state(4, xp=np, dtype=np.float32)
    with kernel_forced(is_numpy_namespace, _numpy_kernel(kernel_name)):
        y, new, _ = pb.forward_train(x, state, None, None, pb.RenormConfig())
    expected = ref.train_step(x, state.mean, state.std, 0)
    for actual, key in ((y, "y"), (new.mean, "mean"), (new.std, "std")):
        assert rel_err(actual, expected[key]) < 1e-5, key


@pytest.mark.parametrize("kernel_name", ["NumpyKernel", "NumbaKernel"])
def test_numpy_kernel_broadcasts_per_group_arrays(kernel_name) -> None:
    """Per-feature arguments may have any shape that broadcasts against the statistics:
    here one value per micro-batch, and one for everything."""
    import array_api_compat.numpy as xp
    layout = make_layout((12, 3, 5), 1, 4)  # 3 groups of 4 rows, 3 features
    view = np.random.default_rng(10).standard_normal(layout.view_shape)
    for scale in (np.arange(1.0, 4.0).reshape(3, 1, 1, 1), np.full((1, 1, 1, 1), 2.0)):
        args = (xp, view, scale, scale + 1.0, view.dtype, layout)
        assert rel_err(_numpy_kernel(kernel_name).affine(*args),
                       GenericKernel().affine(*args)) < 1e-15


@pytest.mark.parametrize("kernel_name", ["NumpyKernel", "NumbaKernel"])
@pytest.mark.parametrize("shape", [(0, 4), (0, 4, 3, 3), (2, 4, 0)])
def test_numpy_kernel_infers_on_empty_inputs(kernel_name, shape) -> None:
    state = pb.init_state(4, xp=np, dtype=np.float32)
    with kernel_forced(is_numpy_namespace, _numpy_kernel(kernel_name)):
        y = pb.forward_infer(np.ones(shape, np.float32), state, None, None, pb.RenormConfig())
    assert y.shape == shape and y.dtype == np.float32


def test_non_contiguous_input() -> None:
    rng = np.random.default_rng(8)
    x = np.transpose(rng.standard_normal((5, 6, 4, 8)), (0, 3, 1, 2))  # NCHW view of NHWC
    state = pb.init_state(8, xp=np, dtype=np.float64)
    y, _, _ = pb.forward_train(x, state, None, None, pb.RenormConfig())
    assert rel_err(y, ref.train_step(x, state.mean, state.std, 0)["y"]) < 1e-12


def test_array_layer_round_trips_through_npz(tmp_path) -> None:
    rng = np.random.default_rng(9)
    layer = BatchRenorm(4, r_max=2.0, warmup_steps=3, micro_batch=2)
    for _ in range(3):
        layer.forward(rng.standard_normal((6, 4)).astype(np.float32))
        layer.backward(np.ones((6, 4), np.float32))
    layer.weight = layer.weight - 0.1 * layer.grad_weight
    np.savez(tmp_path / "layer.npz", **layer.state_dict())
    loaded = BatchRenorm(4, xp=np, r_max=2.0, warmup_steps=3, micro_batch=2)
    loaded.load_state_dict(np.load(tmp_path / "layer.npz"))
    x = rng.standard_normal((6, 4)).astype(np.float32)
    np.testing.assert_array_equal(loaded.forward(x, training=False),
                                  layer.forward(x, training=False))
    assert int(loaded.state.step) == 3
    assert repr(loaded) == ("BatchRenorm(4, feature_axis=1, eps=0.001, momentum=0.01, "
                            "r_max=2.0, d_max=5.0, micro_batch=2, warmup_steps=3, affine=True)")


def test_array_layer_lives_where_its_input_lives(backend) -> None:
    layer = BatchRenorm(3, feature_axis=-1, affine=False)
    x = backend.put(np.random.default_rng(10).standard_normal((4, 5, 3)))
    y = layer.forward(x)
    assert type(layer.state.mean) is type(x) and type(y) is type(x)
    dx = layer.backward(y)
    assert layer.grad_weight is None and layer.grad_bias is None
    assert backend.get(dx).shape == (4, 5, 3)
    layer.reset_running_stats()
    assert int(backend.get(layer.state.step)) == 0
