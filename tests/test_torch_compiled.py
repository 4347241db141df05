"""``features.cpp``, the torch layers' compiled CPU code: it builds where a C++ compiler
exists, its rows equal the tensor-operation twin's (``functional``), it asks for a shift
before moving anything, autograd sees the state it moves, and without a compiler the
layers fall back with a warning.  (Its ``(N, C)`` training step is held to the reference
with every other path in ``test_torch_numerics``.)"""

from __future__ import annotations

import math
import shutil

import pytest

torch = pytest.importorskip("torch")

from portable_brn.adapters.torch import BatchRenorm1d, compiled, functional  # noqa: E402
from portable_brn.conformance.ci import in_ci  # noqa: E402
from portable_brn.state import RenormState  # noqa: E402

DTYPES = [torch.float32, torch.float64]
TOLERANCE = {torch.float32: 2e-6, torch.float64: 1e-14}


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """``library()`` looked up afresh in an empty cache (the tests that use it build
    nothing), and forgotten afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compiled.library.cache_clear()
    yield
    compiled.library.cache_clear()


def _arrays(dtype, channels=6, seed=0):
    """Batch statistics, state and parameters with a non-finite and a constant feature."""
    generator = torch.Generator().manual_seed(seed)

    def draw(low=-1.0, high=1.0):
        return (torch.rand(channels, generator=generator, dtype=torch.float64)
                * (high - low) + low).to(dtype)
    mean, var = draw(-1.5, 1.5), draw(0.2, 3.0)
    mean[0] = var[0] = math.nan  # a non-finite batch mean makes the variance so too
    var[1] = 0.0
    state = RenormState(draw(-1.0, 1.0), draw(0.5, 2.0), torch.tensor(7))
    return mean, var, state, draw(0.5, 1.5), draw()


def _close(actual, expected, dtype):
    return torch.allclose(actual, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype],
                          equal_nan=True)


def test_the_library_builds_where_a_compiler_exists():
    """CI has a C++ compiler and ninja: there the fast path must not silently fall back."""
    if not in_ci() and shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine")
    assert compiled.library() is not None


def _forward_rows(mean, var, state, weight, bias, finite, limits, eps, momentum, shift_above):
    """``features.cpp``'s forward rows (7, C) of ``train_step``, the state moved in place;
    None when x must be shifted first."""
    return compiled.library().forward_features(mean, var, None, state.mean, state.std, weight,
                                               bias, finite, state.step, eps, *limits,
                                               momentum, shift_above)


@pytest.mark.parametrize("weighted", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_forward_rows_and_state_equal_the_tensor_operations(dtype, weighted):
    mean, var, state, weight, bias = _arrays(dtype)
    if not weighted:
        weight = bias = None
    limits, eps, momentum = (0.6, 1.7, 0.5), 1e-3, 0.2
    tensor_state = RenormState(*(t.clone() for t in state))
    finite = torch.empty(mean.shape, dtype=torch.bool)
    rows = _forward_rows(mean, var, state, weight, bias, finite, limits, eps, momentum, 0.0)
    std = torch.add(var, eps).sqrt_()
    expected = functional._tensor_features(mean, std, None, tensor_state.mean,
                                           tensor_state.std, weight, bias, limits)
    for name, got, want in zip(("inv_std", "r", "d", "scale", "shift", "k", "offset"),
                               rows, expected, strict=True):
        assert _close(got, want, dtype), name
    tensor_finite = torch.empty_like(finite)
    functional._moved_state(tensor_state.mean, tensor_state.std, mean, std, tensor_state.step,
                            momentum, tensor_finite)
    assert torch.equal(finite, tensor_finite) and not finite[0] and finite[1:].all()
    assert _close(state.mean, tensor_state.mean, dtype)
    assert _close(state.std, tensor_state.std, dtype)
    assert int(state.step) == int(tensor_state.step) == 8


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_backward_rows_equal_the_tensor_operations(dtype):
    generator = torch.Generator().manual_seed(3)
    sums = [torch.randn(5, generator=generator, dtype=dtype) for _ in range(6)]
    sum_g_xhat, sum_g, inv_std, k, mean, r = sums
    d = torch.randn(5, generator=generator, dtype=dtype)
    rows = compiled.library().backward_features(sum_g_xhat, sum_g, inv_std.abs(), k, mean, r,
                                                d, 12.0)
    expected = functional._backward_features(sum_g_xhat, sum_g, inv_std.abs(), k, mean, r, d,
                                             12)
    for name, got, want in zip(("x_scale", "dx_shift", "dweight"), rows, expected,
                               strict=True):
        assert _close(got, want, dtype), name


def test_a_mean_beyond_the_threshold_asks_for_a_shift_and_moves_nothing():
    mean, var, state, weight, bias = _arrays(torch.float32)
    mean[0], var[0] = 4.0, 1.0  # |mean| = 4 std > SHIFT_ABOVE
    before = [t.clone() for t in state]
    finite = torch.ones(mean.shape, dtype=torch.bool)
    rows = _forward_rows(mean, var, state, weight, bias, finite, (0.5, 2.0, 1.0), 0.0, 0.1,
                         functional.SHIFT_ABOVE)
    assert rows is None
    assert all(torch.equal(a, b) for a, b in zip(state, before, strict=True))
    assert finite.all()


def test_autograd_sees_the_state_the_library_moves():
    """A graph that used running_mean before a training step refuses to backpropagate
    through its old value, as with ``nn.BatchNorm1d``."""
    layer = BatchRenorm1d(3)
    layer.running_mean.requires_grad_(False)
    weight = torch.ones(3, requires_grad=True)
    uses_state = (weight * layer.running_mean).sum()
    before = layer.running_mean._version
    layer(torch.randn(8, 3))
    assert layer.running_mean._version > before
    with pytest.raises(RuntimeError, match="inplace"):
        uses_state.backward()


def test_no_compile_setting_falls_back_to_tensor_operations(monkeypatch, fresh_library):
    monkeypatch.setenv("PORTABLE_BRN_NO_COMPILE", "1")
    assert compiled.library() is None


def test_without_a_compiler_the_layers_warn_once_and_still_train(monkeypatch, fresh_library):
    def no_compiler(name, directory, flags):
        raise RuntimeError("Error building extension 'portable_brn_features': c++: not found")
    monkeypatch.setattr(compiled, "_build", no_compiler)
    layer = BatchRenorm1d(4)
    x = torch.randn(16, 4) * 2 + 1
    with pytest.warns(RuntimeWarning, match="could not compile"):
        y = layer(x)
    # no clip binds (r ~ 2, d ~ 1): the output is (x - running_mean) / running_std = x
    assert torch.allclose(y, x, atol=1e-5)
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("step", [torch.tensor(5.0), torch.tensor(5, dtype=torch.int32)],
                         ids=["float", "int32"])
def test_a_step_counter_of_another_dtype_takes_the_tensor_path(step):
    """``features.cpp`` writes an int64 step: any other takes tensor operations, which count
    in the counter's own dtype."""
    layer = BatchRenorm1d(4)
    layer.num_batches_tracked = step.clone()
    layer(torch.randn(8, 4))
    assert layer.num_batches_tracked.dtype == step.dtype and int(layer.num_batches_tracked) == 6


def test_no_home_directory_falls_back_with_a_warning(monkeypatch):
    def homeless():
        raise RuntimeError("Could not determine home directory.")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(compiled.Path, "home", staticmethod(homeless))
    compiled.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="home directory"):
            assert compiled.library() is None
    finally:
        compiled.library.cache_clear()


def test_a_lock_left_by_a_killed_build_is_cleared(monkeypatch, tmp_path):
    """torch waits for its build lock to go away: one older than any build is removed
    (a fresh one, another process's build in progress, is kept)."""
    import os
    import time
    seen = {}

    def load(name, sources, **options):
        seen["lock"] = (tmp_path / "lock").exists()
        return "module"
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "load", load)
    (tmp_path / "lock").touch()
    compiled._build("name", tmp_path, ())
    assert seen["lock"]
    old = time.time() - 2 * compiled._STALE_LOCK_S
    os.utime(tmp_path / "lock", (old, old))
    assert compiled._build("name", tmp_path, ()) == "module"
    assert not seen["lock"]
