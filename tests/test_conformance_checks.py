"""The conformance suite's own machinery: the error measure, backend plumbing, and that
its checks and properties do catch a wrong result."""

from __future__ import annotations

import math
import types
from collections import Counter

import numpy as np
import pytest

from portable_brn.conformance import backends, checks, golden, properties, registry
from portable_brn.conformance.arrays import to_numpy

CASE = {case.name: case for case in golden.load()}["rank3_features_middle"]


def test_relative_error_is_the_spec_measure() -> None:
    ref = np.array([3.0, 4.0])
    assert checks.relative_error(ref, ref) == 0.0
    assert checks.relative_error(ref + np.array([0.0, 5e-3]), ref) == pytest.approx(1e-3)
    assert checks.relative_error(np.zeros(2), np.zeros(2)) == 0.0
    assert checks.relative_error(np.ones(2), np.zeros(2)) == math.inf
    assert checks.relative_error(np.ones(3), ref) == math.inf
    assert checks.relative_error(np.ones((1, 2)), ref) == math.inf  # would broadcast


def test_nan_never_passes() -> None:
    ref = np.array([1.0, 2.0])
    assert not checks.Worst(checks.relative_error(np.array([1.0, np.nan]), ref)).passes(1.0)
    assert not checks.Worst(checks.relative_error(ref, np.array([1.0, np.nan]))).passes(1.0)
    # Inf, not NaN, so a plain max over errors keeps it (max(0.0, nan) is 0.0).
    huge = np.full(2, 1e300)
    with np.errstate(over="ignore"):
        pairs = [(np.array([1.0, np.nan]), ref), (np.array([np.inf, 2.0]), ref),
                 (np.ones(3), ref)]
        assert [max(0.0, checks.relative_error(out, want)) for out, want in pairs] == [
            math.inf] * len(pairs)
    # Near float64's range the norms would overflow: the measure scales first, so it gives
    # the true error (here exactly 1) rather than inf / inf.
    assert checks.relative_error(2.0 * huge, huge) == 1.0
    assert checks.relative_error(huge * (1 + 1e-15), huge) < 1e-14
    # Where the expected value is not finite, the output must be the same non-finite value.
    assert checks.relative_error(np.array([np.nan, 2.0]), np.array([np.inf, 2.0])) == math.inf
    assert checks.relative_error(np.array([-np.inf, 2.0]), np.array([np.inf, 2.0])) == math.inf
    assert checks.relative_error(np.array([np.nan, 2.0]), np.array([np.nan, 2.0])) == 0.0
    assert checks.relative_error(np.array([np.inf, 2.0]), np.array([np.inf, 2.0])) == 0.0


def test_worst_keeps_nan_over_any_number() -> None:
    worst = checks.Worst(1.0, "a") | checks.Worst(math.nan, "b") | checks.Worst(5.0, "c")
    assert worst.where == "b"


def test_step_and_finite_must_match_exactly() -> None:
    outputs = [dict(op.expected) for op in CASE.ops]
    outputs[0]["step"] = outputs[0]["step"] + 1
    assert checks.compare_to_expected(CASE, outputs)["state"].error == math.inf


def test_an_output_a_backend_does_not_report_fails_its_check() -> None:
    outputs = [dict(op.expected) for op in CASE.ops]
    del outputs[0]["finite"]
    worst = checks.compare_to_expected(CASE, outputs)["state"]
    assert math.isnan(worst.error) and worst.where == f"{CASE.name} op 0 finite not reported"


@pytest.mark.parametrize("name", ["layer-numpy", "torch-modules", "jax-adapter",
                                  "flax-linen", "flax-nnx"])
def test_adapter_backends_report_the_finite_flags(name: str) -> None:
    [backend] = registry.resolve([name])
    if backend.skip_reason:
        pytest.skip(f"{name}: {backend.skip_reason}")
    nonfinite = {case.name: case for case in golden.load()}["nonfinite"]
    outputs = backend.run(nonfinite, "float64")
    flags = [out["finite"].tolist() for out in outputs[:3]]
    assert flags == [[True, False, True, True], [True, True, True, False], [True] * 4]


def test_a_perturbed_output_fails_the_float64_bound() -> None:
    outputs = [dict(op.expected) for op in CASE.ops]
    assert all(w.passes(0.0) for w in checks.compare_to_expected(CASE, outputs).values())
    outputs[1]["dx"] = outputs[1]["dx"] * (1.0 + 1e-11)
    worst = checks.compare_to_expected(CASE, outputs)["gradients"]
    assert not worst.passes(checks.TOLERANCE["float64"])
    assert worst.where == f"{CASE.name} op 1 dx"


def test_every_backend_runs_every_case_it_supports_at_float64() -> None:
    cases = golden.load()
    for backend in registry.all_backends():
        for case in cases:
            assert backend.applies(case, "float64") == backend.supports(case), backend.name
    jax = backends.JaxBackend()
    warmup = next(case for case in cases if case.name == "warmup")
    assert jax.applies(warmup, "float32") == ("outside the float32 quick subset of jax "
                                              "(see --all-cases)")
    assert jax.applies(warmup, "float32", all_cases=True) is None


def test_jax_traces_each_step_function_once_per_case() -> None:
    """55 training steps and 55 inference calls: one compile each, not one per step."""
    backend = backends.JaxBackend()
    if backend.skip_reason:
        pytest.skip(backend.skip_reason)
    traces: Counter[str] = Counter()
    jit = backend.compile

    def counting(fn):
        def traced(*args):
            traces[fn.__name__] += 1  # runs only while JAX traces
            return fn(*args)
        return jit(traced)

    backend.compile = counting
    long_run = next(case for case in golden.load() if case.name == "long_run")
    backend.run(long_run, "float64")
    assert traces == {"train": 1, "infer": 1}


def test_read_only_backend_refuses_in_place_writes() -> None:
    backend = backends.ReadOnlyNumpyBackend()
    assert backend.skip_reason is None
    source = np.ones(3)
    array = backend.asarray(source, np.float64)
    with pytest.raises(ValueError, match="read-only"):
        array[0] = 2.0
    assert source.flags.writeable, "the caller's array itself is left alone"


def test_outputs_come_back_as_float64_numpy() -> None:
    backend = registry.resolve(["torch"])[0]
    if backend.skip_reason:
        pytest.skip(backend.skip_reason)
    outputs = backend.run(CASE, "bfloat16")
    assert outputs[0]["y"].dtype == np.float64
    assert outputs[0]["step"].dtype.kind == "i"


def test_resolve_accepts_lists_and_modules() -> None:
    names = [b.name for b in registry.resolve(["numpy,strict", "numpy", "torch"])]
    assert names == ["numpy", "strict", "torch"]
    [third_party] = registry.resolve(["array_api_compat.numpy"])
    assert third_party.skip_reason is None
    assert third_party.available_dtypes() == ("float64", "float32", "float16")


def test_a_module_that_is_no_namespace_is_skipped_with_the_reason() -> None:
    [missing] = registry.resolve(["no_such_module_anywhere"])
    assert "cannot import 'no_such_module_anywhere'" in missing.skip_reason
    with pytest.raises(backends.Unavailable, match="not an Array API namespace"):
        backends.namespace_of_module(types.ModuleType("plain"))


def test_namespace_of_a_module_without_array_api_version() -> None:
    torch = pytest.importorskip("torch")
    xp = backends.namespace_of_module(torch)
    assert xp.__name__ == "array_api_compat.torch"


def test_properties_hold_on_numpy() -> None:
    errors = properties.run_all(np)
    assert all(errors[name] <= bound for name, bound in properties.TOLERANCE.items())


def test_properties_catch_a_wrong_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    right = properties.backward

    def off_by_a_constant(residuals, dy):
        dx, dweight, dbias = right(residuals, dy)
        return dx + 1e-3, dweight, dbias

    monkeypatch.setattr(properties, "backward", off_by_a_constant)
    errors = properties.run_all(np)
    assert errors["finite_difference"] > properties.TOLERANCE["finite_difference"]
    assert errors["dx_orthogonality"] > properties.TOLERANCE["dx_orthogonality"]


def test_to_numpy_brings_strict_arrays_home_from_another_device() -> None:
    strict = pytest.importorskip("array_api_strict")
    array = strict.asarray([1.0, 2.0], device=strict.Device("device1"))
    np.testing.assert_array_equal(to_numpy(array), [1.0, 2.0])
