"""Tests of the float64 reference ``conformance/reference.py``.

The reference is the ground truth every backend is compared to, so these tests check
it against things that do not reuse its own formulas: central finite differences,
a hand-written batch norm built on ``np.var``, the paper's train/inference identity,
the null-space property of ``dx``, micro-batches as separate calls, and numbers worked
out by hand.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest


def _load_reference():
    """The installed ``portable_brn.conformance.reference``, else the file itself.

    Falling back to the file keeps these tests runnable before the package is
    installed and while the core is broken: the reference does not depend on it.
    """
    try:
        from portable_brn.conformance import reference
    except ImportError:
        path = Path(__file__).resolve().parents[1] / "conformance" / "reference.py"
        spec = importlib.util.spec_from_file_location("_portable_brn_reference", path)
        reference = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = reference
        spec.loader.exec_module(reference)
    return reference


ref = _load_reference()

# (shape, feature_axis): ranks 2 to 5, feature axis 1, -1 and tuples.
CASES = [
    ((8, 3), 1),
    ((6, 4), -1),
    ((4, 3, 5), 1),
    ((4, 5, 3), -1),
    ((3, 2, 3, 4), 1),
    ((3, 4, 3, 2), -1),
    ((3, 2, 3, 2), (1, 3)),
    ((2, 3, 2, 2, 3), 1),
    ((2, 2, 3, 2, 2), (1, -1)),
]
CASE_IDS = [f"{'x'.join(map(str, s))}-fa{fa}" for s, fa in CASES]


# ---------------------------------------------------------------------------
# Helpers written independently of the reference
# ---------------------------------------------------------------------------


def feature_axes(shape, fa):
    axes = (fa,) if isinstance(fa, int) else fa
    return tuple(sorted(a % len(shape) for a in axes))


def reduced_axes(shape, fa):
    keep = feature_axes(shape, fa)
    return tuple(a for a in range(len(shape)) if a not in keep)


def feature_shape(shape, fa):
    return tuple(shape[a] for a in feature_axes(shape, fa))


def bcast(a, shape, fa):
    """Reshape a feature-shaped array to broadcast against an array of ``shape``."""
    keep = feature_axes(shape, fa)
    return np.reshape(a, [shape[i] if i in keep else 1 for i in range(len(shape))])


def make_inputs(shape, fa, seed=0):
    """x with a per-feature offset and scale, plus state and parameters."""
    rng = np.random.default_rng(seed)
    fs = feature_shape(shape, fa)
    loc = bcast(rng.uniform(-2, 2, fs), shape, fa)
    scale = bcast(rng.uniform(0.5, 3.0, fs), shape, fa)
    x = loc + scale * rng.normal(size=shape)
    mean = rng.uniform(-1.5, 1.5, fs)
    std = rng.uniform(0.4, 4.0, fs)
    weight = rng.uniform(0.5, 2.0, fs) * rng.choice([-1.0, 1.0], fs)
    bias = rng.normal(size=fs)
    dy = rng.normal(size=shape)
    return x, mean, std, weight, bias, dy


def forward_fixed(x, r, d, weight, bias, fa, eps, output_clip=None):
    """Training forward with r and d held constant (they are stop_gradient)."""
    red = reduced_axes(x.shape, fa)
    mu = np.mean(x, axis=red, keepdims=True)
    var = np.mean((x - mu) ** 2, axis=red, keepdims=True)
    z = (x - mu) / np.sqrt(var + eps) * bcast(r, x.shape, fa) + bcast(d, x.shape, fa)
    if output_clip is not None:
        z = np.clip(z, *output_clip)
    y = z if weight is None else bcast(weight, x.shape, fa) * z
    return y if bias is None else y + bcast(bias, x.shape, fa)


def forward_fixed_groups(x, r, d, weight, bias, fa, eps, k, output_clip=None):
    """As forward_fixed, on contiguous groups of k examples along axis 0."""
    parts = [
        forward_fixed(x[g * k : (g + 1) * k], r[g], d[g], weight, bias, fa, eps, output_clip)
        for g in range(x.shape[0] // k)
    ]
    return np.concatenate(parts, axis=0)


def numeric_grad(loss, a, h=1e-6):
    """Central finite differences of the scalar loss(a) w.r.t. every element of a."""
    grad = np.zeros_like(a)
    for i in range(a.size):
        plus, minus = a.copy(), a.copy()
        plus.flat[i] += h
        minus.flat[i] -= h
        grad.flat[i] = (loss(plus) - loss(minus)) / (2 * h)
    return grad


def assert_close(actual, expected, rtol=1e-12, atol=1e-12):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# Gradients against finite differences
# ---------------------------------------------------------------------------

OPTIONS = {
    "default": {},
    "tight-clips": {"r_max": 1.2, "d_max": 0.1},
    "output-clip": {"output_clip": (-0.7, 0.9)},
    "affine-off": {"affine": False},
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize(("shape", "fa"), CASES, ids=CASE_IDS)
def test_gradients_match_finite_differences(shape, fa, option):
    opts = dict(OPTIONS[option])
    affine = opts.pop("affine", True)
    eps = 1e-3
    x, mean, std, weight, bias, dy = make_inputs(shape, fa, seed=1)
    if not affine:
        weight = bias = None
    out = ref.train_step(x, mean, std, 7, weight, bias, dy, feature_axis=fa, eps=eps, **opts)
    r, d, clip = out["r"], out["d"], opts.get("output_clip")

    y_fixed = forward_fixed(x, r, d, weight, bias, fa, eps, clip)
    assert_close(out["y"], y_fixed)

    def loss_x(xx):
        return np.sum(forward_fixed(xx, r, d, weight, bias, fa, eps, clip) * dy)

    np.testing.assert_allclose(out["dx"], numeric_grad(loss_x, x), rtol=1e-6, atol=1e-7)

    if affine:

        def loss_w(w):
            return np.sum(forward_fixed(x, r, d, w, bias, fa, eps, clip) * dy)

        def loss_b(b):
            return np.sum(forward_fixed(x, r, d, weight, b, fa, eps, clip) * dy)

        np.testing.assert_allclose(
            out["dweight"], numeric_grad(loss_w, weight), rtol=1e-6, atol=1e-7
        )
        np.testing.assert_allclose(out["dbias"], numeric_grad(loss_b, bias), rtol=1e-6, atol=1e-7)
    else:
        assert out["dweight"] is None and out["dbias"] is None

    if option == "tight-clips":  # the clips must actually bind for this case to mean anything
        assert np.any(np.isclose(r, 1.2) | np.isclose(r, 1 / 1.2))
        assert np.any(np.isclose(np.abs(d), 0.1))
    if option == "output-clip":
        assert np.any(y_fixed != forward_fixed(x, r, d, weight, bias, fa, eps))


@pytest.mark.parametrize(
    ("shape", "fa", "k", "clip"),
    [((8, 3), 1, 2, None), ((6, 2, 3), -1, 3, (-0.5, 0.5)), ((4, 2, 3, 2), 1, 2, None)],
)
def test_micro_batch_gradients_match_finite_differences(shape, fa, k, clip):
    eps = 1e-3
    x, mean, std, weight, bias, dy = make_inputs(shape, fa, seed=2)
    out = ref.train_step(
        x,
        mean,
        std,
        3,
        weight,
        bias,
        dy,
        feature_axis=fa,
        eps=eps,
        micro_batch=k,
        output_clip=clip,
    )
    r, d = out["r"], out["d"]
    assert r.shape == (shape[0] // k, *feature_shape(shape, fa))
    assert_close(out["y"], forward_fixed_groups(x, r, d, weight, bias, fa, eps, k, clip))

    def loss_x(xx):
        return np.sum(forward_fixed_groups(xx, r, d, weight, bias, fa, eps, k, clip) * dy)

    def loss_w(w):
        return np.sum(forward_fixed_groups(x, r, d, w, bias, fa, eps, k, clip) * dy)

    def loss_b(b):
        return np.sum(forward_fixed_groups(x, r, d, weight, b, fa, eps, k, clip) * dy)

    np.testing.assert_allclose(out["dx"], numeric_grad(loss_x, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["dweight"], numeric_grad(loss_w, weight), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["dbias"], numeric_grad(loss_b, bias), rtol=1e-6, atol=1e-7)


def test_output_clip_hand_computed_and_equality_not_bound():
    # x_hat = x exactly (mu = 0, var = 1, eps = 0, sigma = std = 1), so r = 1, d = 0, z = x.
    x = np.array([[-1.0], [-1.0], [1.0], [1.0]])
    dy = np.array([[1.0], [2.0], [3.0], [5.0]])
    state = (np.zeros(1), np.ones(1), 0)
    w, b = np.array([2.0]), np.array([0.5])

    free = ref.train_step(x, *state, w, b, dy, eps=0.0)
    assert_close(free["r"], [1.0])
    assert_close(free["d"], [0.0])
    # g_xhat = 2 g; dx = g_xhat - mean(g_xhat) - x_hat * mean(g_xhat * x_hat), by hand:
    assert_close(free["dx"][:, 0], [-1.0, 1.0, -2.0, 2.0])
    assert_close(free["dweight"], [-1 - 2 + 3 + 5])
    assert_close(free["dbias"], [11.0])

    # Bounds equal to z: equality is not "bound", so nothing changes.
    equal = ref.train_step(x, *state, w, b, dy, eps=0.0, output_clip=(-1.0, 1.0))
    for key in ("y", "dx", "dweight", "dbias"):
        assert_close(equal[key], free[key])

    # hi = 0.5 binds for the last two examples: their gradient into z is zero.
    clipped = ref.train_step(x, *state, w, b, dy, eps=0.0, output_clip=(-1.0, 0.5))
    assert_close(clipped["y"][:, 0], [2 * -1 + 0.5, 2 * -1 + 0.5, 2 * 0.5 + 0.5, 2 * 0.5 + 0.5])
    assert_close(clipped["dx"][:, 0], [-1.0, 1.0, 0.0, 0.0])
    assert_close(clipped["dweight"], [-1 - 2 + 0.5 * 3 + 0.5 * 5])
    assert_close(clipped["dbias"], [11.0])


# ---------------------------------------------------------------------------
# Batch norm, inference identity, null space
# ---------------------------------------------------------------------------


def batch_norm_train(x, weight, bias, fa, eps):
    red = reduced_axes(x.shape, fa)
    mu = x.mean(axis=red, keepdims=True)
    var = x.var(axis=red, keepdims=True)
    return bcast(weight, x.shape, fa) * (x - mu) / np.sqrt(var + eps) + bcast(bias, x.shape, fa)


@pytest.mark.parametrize(("shape", "fa"), CASES, ids=CASE_IDS)
def test_r_max_1_d_max_0_is_batch_norm(shape, fa):
    eps, momentum = 1e-3, 0.1
    x, mean, std, weight, bias, _ = make_inputs(shape, fa, seed=3)
    expected = batch_norm_train(x, weight, bias, fa, eps)
    out = ref.train_step(
        x,
        mean,
        std,
        5,
        weight,
        bias,
        feature_axis=fa,
        eps=eps,
        momentum=momentum,
        r_max=1.0,
        d_max=0.0,
    )
    assert_close(out["y"], expected)
    np.testing.assert_array_equal(out["r"], 1.0)
    np.testing.assert_array_equal(out["d"], 0.0)
    assert out["dx"] is None and out["dweight"] is None and out["dbias"] is None

    # State: the batch statistics are np.mean and sqrt(np.var + eps).
    red = reduced_axes(shape, fa)
    bm, bs = x.mean(axis=red), np.sqrt(x.var(axis=red) + eps)
    assert_close(out["batch_mean"], bm)
    assert_close(out["batch_std"], bs)
    assert_close(out["mean"], (1 - momentum) * mean + momentum * bm)
    assert_close(out["std"], (1 - momentum) * std + momentum * bs)
    assert out["step"] == 6
    assert out["finite"].dtype == bool and out["finite"].all()


@pytest.mark.parametrize(("shape", "fa"), CASES[::3], ids=CASE_IDS[::3])
def test_warmup_is_exact_batch_norm(shape, fa):
    x, mean, std, weight, bias, _ = make_inputs(shape, fa, seed=4)
    during = ref.train_step(x, mean, std, 9, weight, bias, feature_axis=fa, warmup_steps=10)
    np.testing.assert_array_equal(during["r"], 1.0)
    np.testing.assert_array_equal(during["d"], 0.0)
    assert_close(during["y"], batch_norm_train(x, weight, bias, fa, 1e-3))
    assert during["step"] == 10
    assert not np.allclose(during["mean"], mean)  # the state still moves during warm-up

    after = ref.train_step(x, mean, std, 10, weight, bias, feature_axis=fa, warmup_steps=10)
    assert not np.allclose(after["y"], during["y"])


@pytest.mark.parametrize(("shape", "fa"), CASES, ids=CASE_IDS)
def test_train_equals_infer_when_no_clip_binds(shape, fa):
    x, mean, std, weight, bias, _ = make_inputs(shape, fa, seed=5)
    out = ref.train_step(
        x, mean, std, 0, weight, bias, feature_axis=fa, r_max=1e6, r_min=1e-6, d_max=1e6
    )
    assert_close(out["y"], ref.infer(x, mean, std, weight, bias, feature_axis=fa), rtol=1e-11)
    # infer against the formula written out by hand
    expected = bcast(weight, shape, fa) * (x - bcast(mean, shape, fa)) / bcast(std, shape, fa)
    assert_close(
        ref.infer(x, mean, std, weight, bias, feature_axis=fa), expected + bcast(bias, shape, fa)
    )
    assert_close(
        ref.infer(x, mean, std, feature_axis=fa),
        (x - bcast(mean, shape, fa)) / bcast(std, shape, fa),
    )


@pytest.mark.parametrize("clip", [None, (-0.5, 0.5)])
@pytest.mark.parametrize(("shape", "fa"), CASES, ids=CASE_IDS)
def test_dx_orthogonal_to_ones_and_x(shape, fa, clip):
    # Exact with eps = 0 (paper, section 3). With eps > 0, mean(x_hat**2) = var / (var + eps),
    # so dx . x = m * mean(g_xhat * x_hat) * eps / (var + eps): checked below as well.
    x, mean, std, weight, bias, dy = make_inputs(shape, fa, seed=6)
    red = reduced_axes(shape, fa)
    dx = ref.train_step(
        x, mean, std, 0, weight, bias, dy, feature_axis=fa, eps=0.0, output_clip=clip
    )["dx"]
    scale = np.sqrt(np.sum(dx**2, axis=red)) * np.sqrt(np.sum(x**2, axis=red))
    assert np.sum(dx**2) > 0  # a feature may be all clipped, not the whole batch
    assert np.all(np.abs(np.sum(dx, axis=red)) <= 1e-12 * scale)
    assert np.all(np.abs(np.sum(dx * x, axis=red)) <= 1e-12 * scale)

    eps = 0.5
    out = ref.train_step(
        x, mean, std, 0, weight, bias, dy, feature_axis=fa, eps=eps, output_clip=clip
    )
    dx = out["dx"]
    assert np.all(np.abs(np.sum(dx, axis=red)) <= 1e-12 * scale)
    # Residual of the x-projection, from quantities computed here with np.var:
    mu = np.mean(x, axis=red, keepdims=True)
    var = np.var(x, axis=red, keepdims=True)
    x_hat = (x - mu) / np.sqrt(var + eps)
    z_raw = x_hat * bcast(out["r"], shape, fa) + bcast(out["d"], shape, fa)
    g_z = bcast(weight, shape, fa) * dy
    if clip is not None:
        g_z = np.where((z_raw < clip[0]) | (z_raw > clip[1]), 0.0, g_z)
    g_xhat = bcast(out["r"], shape, fa) * g_z
    expected = np.sum(g_xhat * x_hat, axis=red) * eps / np.squeeze(var + eps, axis=red)
    assert_close(np.sum(dx * x, axis=red), expected, rtol=1e-9, atol=1e-12 * scale.max())


# ---------------------------------------------------------------------------
# Micro-batches
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "fa", "k"),
    [
        ((8, 3), 1, 4),
        ((6, 4), -1, 2),
        ((6, 3, 5), 1, 3),
        ((8, 2, 3, 2), -1, 2),
        ((4, 2, 2, 3, 2), (1, 3), 2),
    ],
)
def test_micro_batch_equals_separate_calls(shape, fa, k):
    momentum = 0.2
    x, mean, std, weight, bias, dy = make_inputs(shape, fa, seed=7)
    kw = {"feature_axis": fa, "momentum": momentum, "r_max": 1.5, "d_max": 0.5}
    out = ref.train_step(x, mean, std, 4, weight, bias, dy, micro_batch=k, **kw)
    groups = shape[0] // k
    parts = [
        ref.train_step(
            x[g * k : (g + 1) * k], mean, std, 4, weight, bias, dy[g * k : (g + 1) * k], **kw
        )
        for g in range(groups)
    ]
    assert_close(out["y"], np.concatenate([p["y"] for p in parts]))
    assert_close(out["dx"], np.concatenate([p["dx"] for p in parts]))
    assert_close(out["dweight"], sum(p["dweight"] for p in parts))
    assert_close(out["dbias"], sum(p["dbias"] for p in parts))
    for key in ("r", "d", "batch_mean", "batch_std"):
        assert out[key].shape == (groups, *feature_shape(shape, fa))
        assert_close(out[key], np.stack([p[key] for p in parts]))
    # One update toward the mean over groups == the mean of the per-group updates (linear).
    assert_close(out["mean"], np.mean([p["mean"] for p in parts], axis=0))
    assert_close(out["std"], np.mean([p["std"] for p in parts], axis=0))
    assert out["step"] == 5


def test_micro_batch_not_divisible_raises():
    x, mean, std, *_ = make_inputs((6, 3), 1)
    with pytest.raises(ValueError, match="micro_batch"):
        ref.train_step(x, mean, std, 0, micro_batch=4)


# ---------------------------------------------------------------------------
# Hand-computed values, schedules, the non-finite guard
# ---------------------------------------------------------------------------


def test_hand_computed_step():
    # One feature, x = [1, 3]: mu_B = 2, sigma_B = 1 (eps = 0); state mean 0, std 4.
    x = np.array([[1.0], [3.0]])
    mean, std = np.array([0.0]), np.array([4.0])
    out = ref.train_step(x, mean, std, 0, eps=0.0)
    assert_close(out["batch_mean"], [2.0])
    assert_close(out["batch_std"], [1.0])
    assert_close(out["r"], [1 / 3])  # sigma_B / std = 0.25, clipped up to 1 / r_max
    assert_close(out["d"], [0.5])  # (2 - 0) / 4
    assert_close(out["y"][:, 0], [-1 / 3 + 0.5, 1 / 3 + 0.5])
    assert_close(out["mean"], [0.02])  # 0 + 0.01 * (2 - 0)
    assert_close(out["std"], [3.97])  # 4 + 0.01 * (1 - 4)
    assert out["step"] == 1

    explicit = ref.train_step(x, mean, std, 0, eps=0.0, r_min=0.1, d_max=0.25)
    assert_close(explicit["r"], [0.25])
    assert_close(explicit["d"], [0.25])


@pytest.mark.parametrize(
    ("step", "r_max", "d_max"),
    [
        (0, 1.0, 0.0),
        (4999, 1.0, 0.0),
        (5000, 1.0, 0.0),
        (15000, 1.0 + 2.0 * 10000 / 35000, 5.0 * 10000 / 20000),  # 11/7 and 2.5
        (25000, 1.0 + 2.0 * 20000 / 35000, 5.0),  # 15/7
        (40000, 3.0, 5.0),
        (50000, 3.0, 5.0),
    ],
)
def test_paper_schedule(step, r_max, d_max):
    assert ref.evaluate_schedule({"kind": "paper_r_max"}, step) == pytest.approx(r_max, rel=1e-15)
    assert ref.evaluate_schedule({"kind": "paper_d_max"}, step) == pytest.approx(
        d_max, rel=1e-15, abs=1e-15
    )


def test_paper_schedule_hand_values():
    assert ref.evaluate_schedule({"kind": "paper_r_max"}, 15000) == pytest.approx(11 / 7)
    assert ref.evaluate_schedule({"kind": "paper_r_max"}, 25000) == pytest.approx(15 / 7)
    assert ref.evaluate_schedule({"kind": "paper_d_max"}, 15000) == pytest.approx(2.5)


def test_schedule_kinds():
    lin = {
        "kind": "linear",
        "start_value": 2.0,
        "end_value": 4.0,
        "start_step": 10,
        "end_step": 20,
    }
    assert ref.evaluate_schedule(lin, 0) == 2.0
    assert ref.evaluate_schedule(lin, 15) == pytest.approx(3.0)
    assert ref.evaluate_schedule(lin, 99) == 4.0
    assert ref.evaluate_schedule({"kind": "constant", "value": 2.5}, 7) == 2.5
    assert ref.evaluate_schedule(1.5, 7) == 1.5
    assert ref.evaluate_schedule(lambda t: 0.5 * t, 7) == 3.5
    with pytest.raises(ValueError):
        ref.evaluate_schedule({"kind": "cosine"}, 0)


def test_schedules_use_pre_update_step_and_default_r_min():
    x = np.array([[1.0], [3.0]])  # sigma_B / std = 0.25 with std 4, eps 0
    mean, std = np.array([0.0]), np.array([4.0])

    def r_max(t):
        return 1.0 if t < 10 else 2.0

    assert_close(ref.train_step(x, mean, std, 9, eps=0.0, r_max=r_max)["r"], [1.0])
    assert_close(ref.train_step(x, mean, std, 10, eps=0.0, r_max=r_max)["r"], [0.5])
    paper = {"r_max": {"kind": "paper_r_max"}, "d_max": {"kind": "paper_d_max"}, "eps": 0.0}
    early = ref.train_step(x, mean, std, 4999, **paper)
    assert_close(early["r"], [1.0])
    assert_close(early["d"], [0.0])
    late = ref.train_step(x, mean, std, 40000, **paper)
    assert_close(late["r"], [1 / 3])
    assert_close(late["d"], [0.5])


def test_non_finite_guard_is_per_feature():
    x, mean, std, weight, bias, _ = make_inputs((6, 3, 2), 1, seed=8)
    x[2, 1, 0] = np.nan
    x[4, 2, 1] = np.inf
    out = ref.train_step(x, mean, std, 3, weight, bias, momentum=0.5)
    np.testing.assert_array_equal(out["finite"], [True, False, False])
    np.testing.assert_array_equal(out["mean"][1:], mean[1:])
    np.testing.assert_array_equal(out["std"][1:], std[1:])
    assert np.all(np.isfinite(out["mean"])) and np.all(np.isfinite(out["std"]))
    assert not np.isclose(out["mean"][0], mean[0])
    assert out["step"] == 4

    # With micro-batches, one bad group is enough to skip the feature.
    grouped = ref.train_step(x, mean, std, 3, micro_batch=2, momentum=0.5)
    np.testing.assert_array_equal(grouped["finite"], [True, False, False])
    assert np.isfinite(grouped["batch_mean"][0, 1]) and not np.isfinite(grouped["batch_mean"][1, 1])
    np.testing.assert_array_equal(grouped["mean"][1:], mean[1:])


# ---------------------------------------------------------------------------
# Recalibration and deferred (recurrent) updates
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "fa"), CASES, ids=CASE_IDS)
def test_recalibrate_matches_concatenation(shape, fa):
    rng = np.random.default_rng(9)
    batches = [
        3.0 + 2.0 * rng.normal(size=(n, *shape[1:])) for n in (shape[0], 1, 2 * shape[0] + 1)
    ]
    x = np.concatenate(batches, axis=0)
    red = reduced_axes(x.shape, fa)
    mean, std = ref.recalibrate((b for b in batches), feature_axis=fa, eps=1e-2)
    assert_close(mean, np.mean(x, axis=red))
    assert_close(std, np.sqrt(np.var(x, axis=red) + 1e-2))
    assert mean.shape == feature_shape(shape, fa)


@pytest.mark.parametrize(("shape", "fa"), [((4, 3), 1), ((3, 2, 4), -1), ((2, 3, 2, 2), (1, 3))])
def test_recurrent_steps_defer_the_update(shape, fa):
    rng = np.random.default_rng(10)
    xs = [rng.normal(loc=t, scale=1 + t, size=shape) for t in range(4)]
    _, mean, std, weight, bias, _ = make_inputs(shape, fa, seed=10)
    opts = {"feature_axis": fa, "eps": 1e-3, "momentum": 0.3, "r_max": 2.0, "d_max": 1.0}
    out = ref.recurrent_steps(xs, mean, std, 12, weight, bias, **opts)

    assert len(out["ys"]) == len(xs)
    for x, y in zip(xs, out["ys"], strict=True):
        assert_close(y, ref.train_step(x, mean, std, 12, weight, bias, **opts)["y"])
    x_all = np.concatenate(xs, axis=0)
    red = reduced_axes(x_all.shape, fa)
    pooled_mean, pooled_std = np.mean(x_all, axis=red), np.sqrt(np.var(x_all, axis=red) + 1e-3)
    assert_close(out["mean"], 0.7 * mean + 0.3 * pooled_mean)
    assert_close(out["std"], 0.7 * std + 0.3 * pooled_std)
    assert out["step"] == 13


# ---------------------------------------------------------------------------
# Conventions and independence
# ---------------------------------------------------------------------------


def test_feature_axis_tuple_order_and_negative_axes():
    x, mean, std, weight, bias, dy = make_inputs((3, 2, 3, 4), (1, 3), seed=11)
    a = ref.train_step(x, mean, std, 0, weight, bias, dy, feature_axis=(1, 3))
    b = ref.train_step(x, mean, std, 0, weight, bias, dy, feature_axis=(-1, 1))
    for key in ("y", "dx", "dweight", "dbias", "mean", "std", "r", "d"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["mean"].shape == (2, 4)


def test_inputs_are_cast_to_float64():
    x, mean, std, weight, bias, dy = make_inputs((4, 3), 1, seed=12)
    f32 = [a.astype(np.float32) for a in (x, mean, std, weight, bias, dy)]
    out = ref.train_step(*f32[:3], 0, *f32[3:])
    for key in ("y", "dx", "dweight", "dbias", "mean", "std", "r", "d", "batch_mean", "batch_std"):
        assert out[key].dtype == np.float64, key
    assert ref.infer(*f32[:3]).dtype == np.float64
    assert all(a.dtype == np.float64 for a in ref.recalibrate([f32[0]]))


def test_reference_does_not_import_the_core():
    source = Path(ref.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0] if node.level == 0 else ".")
    assert imported <= {"__future__", "math", "collections", "typing", "numpy"}, imported


def test_recurrent_steps_skip_non_finite_features():
    rng = np.random.default_rng(13)
    xs = [rng.normal(size=(4, 3)) for _ in range(3)]
    xs[1][2, 0] = np.nan
    mean, std = np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0, 3.0])
    out = ref.recurrent_steps(xs, mean, std, 0, momentum=0.5)
    np.testing.assert_array_equal(out["finite"], [False, True, True])
    assert out["mean"][0] == mean[0] and out["std"][0] == std[0]
    assert np.all(out["mean"][1:] != mean[1:])
    assert out["step"] == 1
