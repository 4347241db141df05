"""Masks (``mask=``: True where an element counts) in the core and the array layer,
held to the float64 reference, whose masked gradient is itself checked by finite
differences; the JAX and Flax wiring is in ``test_flax_masks.py``."""

from __future__ import annotations

import numpy as np
import pytest

import portable_brn as pb
from portable_brn.adapters.array import BatchRenorm
from portable_brn.conformance import reference as ref

from conftest import rel_err

# (name, x shape, mask shape, core options)
CASES = [
    ("rows", (8, 3), (8, 3), dict(feature_axis=1)),
    ("padded-rows", (8, 3), (8, 1), dict(feature_axis=1)),
    ("nchw-pixels-microbatch", (8, 3, 4, 5), (8, 1, 4, 5), dict(feature_axis=1, micro_batch=4)),
    ("channels-last-clip", (6, 4, 5, 3), (6, 4, 5, 1),
     dict(feature_axis=-1, output_clip=(-1.0, 1.0))),
    ("tuple-axes-microbatch", (6, 2, 3, 4), (6, 2, 3, 4), dict(feature_axis=(1, 2), micro_batch=2)),
    ("warmup", (10, 4), (10, 1), dict(feature_axis=1, warmup_steps=20)),
]
LIMITS = dict(momentum=0.1, r_max=1.5, d_max=0.5)


def _features(shape: tuple[int, ...], feature_axis) -> tuple[int, ...]:
    axes = (feature_axis,) if isinstance(feature_axis, int) else feature_axis
    return tuple(shape[a % len(shape)] for a in sorted(a % len(shape) for a in axes))


def _problem(shape, mask_shape, feature_axis, seed=0, dtype=np.float64) -> dict:
    rng = np.random.default_rng(seed)
    features = _features(shape, feature_axis)
    mask = rng.random(mask_shape) < 0.6
    mask.flat[0] = True  # at least one counted element in the first group
    return dict(x=(2.0 * rng.standard_normal(shape) + 1.0).astype(dtype),
                dy=rng.standard_normal(shape).astype(dtype), mask=mask,
                mean=0.3 * rng.standard_normal(features),
                std=np.exp(0.3 * rng.standard_normal(features)),
                weight=1.0 + 0.3 * rng.standard_normal(features),
                bias=0.2 * rng.standard_normal(features))


def _reference(p: dict, options: dict, step: int = 7) -> dict:
    return ref.train_step(p["x"], p["mean"], p["std"], step, p["weight"], p["bias"], p["dy"],
                          mask=p["mask"], **options)


def _core(backend, p: dict, options: dict, step: int = 7) -> dict:
    config = pb.RenormConfig(**options)
    x, dy, mask, mean, std, weight, bias = backend.put(p["x"], p["dy"], p["mask"], p["mean"],
                                                       p["std"], p["weight"], p["bias"])
    state = pb.RenormState(mean, std, backend.put(np.asarray(step)))
    y, new, residuals = pb.forward_train(x, state, weight, bias, config, mask=mask)
    dx, dweight, dbias = pb.backward(residuals, dy)
    return {"y": y, "dx": dx, "dweight": dweight, "dbias": dbias, "mean": new.mean,
            "std": new.std, "finite": residuals.finite}


@pytest.mark.parametrize(("name", "shape", "mask_shape", "options"), CASES,
                         ids=[c[0] for c in CASES])
def test_core_with_mask_matches_reference(backend, name, shape, mask_shape, options) -> None:
    p = _problem(shape, mask_shape, options["feature_axis"])
    options = {**LIMITS, **options}
    expected, out = _reference(p, options), _core(backend, p, options)
    for key in ("y", "dx", "dweight", "dbias", "mean", "std"):
        assert rel_err(backend.get(out[key]), expected[key]) <= 1e-12, key
    np.testing.assert_array_equal(backend.get(out["finite"]), expected["finite"])


def test_float32_with_mask_within_spec_bound() -> None:
    p = _problem((32, 6, 5), (32, 1, 5), 1, dtype=np.float32)
    options = {**LIMITS, "feature_axis": 1}
    expected = _reference(p, options)
    backend_out = _core(_NUMPY, {**p, **{k: p[k].astype(np.float32)
                                         for k in ("mean", "std", "weight", "bias")}}, options)
    for key in ("y", "dx", "dweight", "dbias", "mean", "std"):
        assert rel_err(backend_out[key], expected[key]) <= 1e-5, key


class _Numpy:
    """The plain-NumPy backend, for tests that need only one."""

    import array_api_compat.numpy as xp

    @staticmethod
    def put(*arrays):
        moved = tuple(np.asarray(a) for a in arrays)
        return moved if len(moved) > 1 else moved[0]

    @staticmethod
    def get(array):
        return np.asarray(array)


_NUMPY = _Numpy()


def test_all_true_mask_is_no_mask() -> None:
    p = _problem((8, 3, 4), (8, 3, 4), 1)
    p["mask"] = np.ones((8, 3, 4), dtype=bool)
    options = {**LIMITS, "feature_axis": 1, "micro_batch": 2}
    masked = _core(_NUMPY, p, options)
    plain = ref.train_step(p["x"], p["mean"], p["std"], 7, p["weight"], p["bias"], p["dy"],
                           **options)
    for key in ("y", "dx", "dweight", "dbias", "mean", "std"):
        assert rel_err(masked[key], plain[key]) <= 1e-12, key


def test_feature_or_group_with_nothing_counted_keeps_the_state() -> None:
    p = _problem((8, 3), (8, 3), 1)
    p["mask"][:, 1] = False          # feature 1: nothing counted anywhere
    p["mask"][4:, 2] = False         # feature 2: nothing counted in the second group
    p["mask"][:4, 2] = True
    options = {**LIMITS, "feature_axis": 1, "micro_batch": 4}
    out, expected = _core(_NUMPY, p, options), _reference(p, options)
    np.testing.assert_array_equal(out["finite"], [True, False, False])
    np.testing.assert_array_equal(expected["finite"], [True, False, False])
    np.testing.assert_array_equal(out["mean"][1:], p["mean"][1:])
    np.testing.assert_array_equal(out["std"][1:], p["std"][1:])
    assert rel_err(out["mean"][:1], expected["mean"][:1]) <= 1e-12


def test_reference_masked_gradient_by_finite_differences() -> None:
    """In warm-up (r = 1, d = 0 exactly) nothing is held constant, so the reference's
    masked dx must be the derivative of its own masked forward."""
    p = _problem((6, 2), (6, 1), 1)
    options = dict(feature_axis=1, warmup_steps=100, eps=1e-3)

    def loss(x):
        out = ref.train_step(x, p["mean"], p["std"], 0, p["weight"], p["bias"], **options,
                             mask=p["mask"])
        return float(np.sum(out["y"] * p["dy"]))

    dx = _reference(p, options, step=0)["dx"]
    numeric = np.zeros_like(p["x"])
    h = 1e-6
    for index in np.ndindex(p["x"].shape):
        up, down = p["x"].copy(), p["x"].copy()
        up[index] += h
        down[index] -= h
        numeric[index] = (loss(up) - loss(down)) / (2 * h)
    assert rel_err(dx, numeric) <= 1e-7


def test_moments_and_recalibrate_with_masks() -> None:
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((n, 4)) * 3 + 1 for n in (5, 7, 6)]
    masks = [rng.random((n, 1)) < 0.7 for n in (5, 7, 6)]
    masks[1][:] = False             # a batch that counts nothing adds nothing
    counted = np.concatenate([b[m[:, 0]] for b, m in zip(batches, masks, strict=True)])
    one = pb.moments(batches[0], 1, mask=masks[0])
    np.testing.assert_allclose(one.mean, batches[0][masks[0][:, 0]].mean(0), rtol=1e-13)
    np.testing.assert_allclose(one.var, batches[0][masks[0][:, 0]].var(0), rtol=1e-13)
    np.testing.assert_array_equal(one.count, np.full(4, masks[0].sum()))
    config = pb.RenormConfig(feature_axis=1, eps=1e-3)
    state = pb.recalibrate(batches, config, masks=masks)
    np.testing.assert_allclose(state.mean, counted.mean(0), rtol=1e-13)
    np.testing.assert_allclose(state.std, np.sqrt(counted.var(0) + 1e-3), rtol=1e-13)


def test_recalibrate_keeps_the_state_where_nothing_was_counted() -> None:
    x = np.arange(12.0).reshape(6, 2)
    mask = np.array([[True, False]] * 6)
    old = pb.RenormState(np.array([5.0, 6.0]), np.array([2.0, 3.0]), np.asarray(4))
    new = pb.recalibrate([x], pb.RenormConfig(feature_axis=1), state=old, masks=[mask])
    np.testing.assert_allclose(new.mean, [x[:, 0].mean(), 6.0], rtol=1e-15)
    np.testing.assert_allclose(new.std, [np.sqrt(x[:, 0].var() + 1e-3), 3.0], rtol=1e-15)
    assert int(new.step) == 4


@pytest.mark.parametrize("mask_count", [2, 4])
def test_recalibrate_with_one_mask_too_few_or_many_names_masks(mask_count) -> None:
    batches = [np.ones((4, 2))] * 3
    with pytest.raises(ValueError, match=r"^masks must hold one mask per batch"):
        pb.recalibrate(batches, pb.RenormConfig(), masks=[np.ones((4, 1), bool)] * mask_count)


def test_recalibrate_blames_a_bad_batch_on_batches_not_masks() -> None:
    batches = [np.ones((4, 2)), np.ones(4)]  # the second has no axis 1
    with pytest.raises(ValueError, match=r"^batches\[1\]: feature_axis"):
        pb.recalibrate(batches, pb.RenormConfig(), masks=[np.ones((4, 1), bool)] * 2)
    with pytest.raises(ValueError, match=r"^masks\[1\]: mask has shape"):
        pb.recalibrate(batches[:1] * 2, pb.RenormConfig(),
                       masks=[np.ones((4, 1), bool), np.ones((3, 1), bool)])


@pytest.mark.parametrize(("mask", "error", "match"), [
    (np.ones((8, 3), dtype=np.float64), TypeError, "mask must be a boolean array"),
    (np.ones((8, 2), dtype=bool), ValueError, "mask has shape"),
    ([[True] * 3] * 8, TypeError, "mask"),
])
def test_bad_mask_is_refused_naming_it(mask, error, match) -> None:
    x = np.ones((8, 3))
    state = pb.init_state(3, xp=_NUMPY.xp, dtype=np.float64)
    with pytest.raises(error, match=match):
        pb.forward_train(x, state, None, None, pb.RenormConfig(), mask=mask)
    with pytest.raises(error, match=match):
        pb.forward_infer(x, state, None, None, pb.RenormConfig(), mask=mask)


def test_array_layer_with_mask_matches_reference() -> None:
    p = _problem((12, 4, 3), (12, 1, 3), 1)
    options = {**LIMITS, "feature_axis": 1}
    layer = BatchRenorm(4, xp=_NUMPY.xp, dtype=np.float64, **options)
    layer.load_state_dict({"running_mean": p["mean"], "running_std": p["std"],
                           "num_batches_tracked": np.asarray(0), "weight": p["weight"],
                           "bias": p["bias"]})
    y = layer.forward(p["x"], mask=p["mask"])
    dx = layer.backward(p["dy"])
    expected = _reference(p, options, step=0)
    for out, key in ((y, "y"), (dx, "dx"), (layer.grad_weight, "dweight"),
                     (layer.grad_bias, "dbias"), (layer.state.mean, "mean"),
                     (layer.state.std, "std")):
        assert rel_err(out, expected[key]) <= 1e-12, key
    inferred = layer.forward(p["x"], training=False, mask=p["mask"])
    assert rel_err(inferred, ref.infer(p["x"], expected["mean"], expected["std"], p["weight"],
                                    p["bias"])) <= 1e-12
