"""Which kernel runs: chosen from the array namespace, never from what was imported.

Each scenario runs in a fresh process that imports some adapters first (or none), with
JAX's x64 mode on or off, then trains one step on every backend; every scenario must
give the same bits, and those bits must match the float64 reference.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from array_api_compat import is_numpy_namespace

import portable_brn as pb
from portable_brn.conformance import reference as ref
from portable_brn.kernels import (
    GenericKernel,
    builtin_kernel,
    fast_kernels_disabled,
    kernel_for,
    kernel_forced,
    register_kernel,
)
from portable_brn.numpy_kernel import NUMPY_KERNEL

from conftest import TOLERANCE, rel_err

_SCRIPT = r"""
import importlib, sys
for name in sys.argv[2:]:  # the adapters imported before anything else
    importlib.import_module(name)
import numpy as np
import portable_brn as pb
from portable_brn.host import to_host
from portable_brn.kernels import kernel_for

rng = np.random.default_rng(0)
host = {"x": rng.normal(0.5, 2.0, (64, 6)), "dy": rng.standard_normal((64, 6)),
        "mean": np.linspace(-0.2, 0.2, 6), "std": np.linspace(0.8, 1.2, 6)}
config = pb.RenormConfig(momentum=0.1, r_max=1.5, d_max=0.5)


def step(x, mean, std, dy, zero):
    y, state, residuals = pb.forward_train(x, pb.RenormState(mean, std, zero), None, None,
                                           config)
    dx, _, _ = pb.backward(residuals, dy)
    return y, dx, state.mean, state.std


def namespaces():
    import array_api_compat.numpy
    import array_api_compat.torch
    import array_api_strict
    import jax
    import jax.numpy as jnp
    yield "numpy", array_api_compat.numpy, lambda f: f
    yield "strict", array_api_strict, lambda f: f
    yield "torch", array_api_compat.torch, lambda f: f
    yield "jax", jnp, lambda f: f
    yield "jax-jit", jnp, jax.jit


out = {}
for name, xp, compile_ in namespaces():
    out[f"kernel-{name}"] = np.asarray(type(kernel_for(xp)).__name__)
    for dtype in ("float32", "float64"):
        arrays = {k: xp.asarray(v, dtype=getattr(xp, dtype)) for k, v in host.items()}
        zero = xp.asarray(0)
        results = compile_(step)(arrays["x"], arrays["mean"], arrays["std"], arrays["dy"], zero)
        for key, value in zip(("y", "dx", "mean", "std"), results):
            out[f"{name}-{dtype}-{key}"] = to_host(value)
np.savez(sys.argv[1], **out)
"""

_FIRST_IMPORTS = {
    "none": [],
    "flax-adapter": ["portable_brn.adapters.flax"],  # and with it adapters.jax
    "torch-and-array-adapters": ["portable_brn.adapters.torch", "portable_brn.adapters.array"],
}


def _run(tmp_path: Path, scenario: str, x64: bool) -> dict[str, np.ndarray]:
    path = tmp_path / f"{scenario}-{x64}.npz"
    env = {**os.environ, "JAX_ENABLE_X64": "1" if x64 else "0", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", _SCRIPT, str(path), *_FIRST_IMPORTS[scenario]],
                   check=True, env=env, capture_output=True, timeout=600)
    with np.load(path) as data:
        return dict(data)


@pytest.mark.parametrize("x64", [False, True], ids=["x64-off", "x64-on"])
def test_same_bits_whatever_was_imported_first(tmp_path, x64) -> None:
    for framework in ("torch", "jax", "array_api_strict"):
        pytest.importorskip(framework)
    runs = {scenario: _run(tmp_path, scenario, x64) for scenario in _FIRST_IMPORTS}
    baseline = runs.pop("none")
    for scenario, outputs in runs.items():
        assert outputs.keys() == baseline.keys(), scenario
        for key, value in outputs.items():
            assert value.dtype == baseline[key].dtype, (scenario, key)
            assert np.array_equal(value, baseline[key]), (scenario, key)
    numba = importlib.util.find_spec("numba") is not None
    assert str(baseline["kernel-numpy"]) == ("NumbaKernel" if numba else "NumpyKernel")
    assert str(baseline["kernel-jax"]) == "XlaKernel"
    assert str(baseline["kernel-strict"]) == str(baseline["kernel-torch"]) == "GenericKernel"
    rng = np.random.default_rng(0)
    x, dy = rng.normal(0.5, 2.0, (64, 6)), rng.standard_normal((64, 6))
    expected = ref.train_step(x, np.linspace(-0.2, 0.2, 6), np.linspace(0.8, 1.2, 6), 0,
                              dy=dy, momentum=0.1, r_max=1.5, d_max=0.5)
    for key, value in baseline.items():
        if key.startswith("kernel-"):
            continue
        name, dtype, output = key.rsplit("-", 2)
        # without x64 JAX computes float64 requests in float32
        bound = TOLERANCE[np.float64 if value.dtype == np.float64 else np.float32]
        assert rel_err(value, expected[output]) < bound, key
        assert value.dtype == np.dtype(dtype) or (name.startswith("jax") and not x64), key


def test_builtin_kernels_by_namespace() -> None:
    import array_api_compat.numpy as xp
    assert isinstance(builtin_kernel(np), type(builtin_kernel(xp)))
    assert isinstance(builtin_kernel(xp), type(NUMPY_KERNEL))  # Numba's subclasses it
    strict = pytest.importorskip("array_api_strict")
    assert type(builtin_kernel(strict)) is GenericKernel


def test_registered_kernels_win_and_disabling_restores_them() -> None:
    """A third party's kernel serves its namespace ahead of the built-in one;
    ``fast_kernels_disabled`` sends everything to the generic kernel, and after the block
    both the registration and the built-ins are back."""
    import portable_brn.kernels as kernels

    class Counting(GenericKernel):
        calls = 0

        def affine(self, *args):
            Counting.calls += 1
            return super().affine(*args)

    counting = Counting()
    saved = list(kernels._REGISTRY)
    try:
        register_kernel(is_numpy_namespace, counting)
        assert kernel_for(np) is counting
        state = pb.init_state(3, xp=np, dtype=np.float64)
        x = np.arange(12.0).reshape(4, 3)
        y = pb.forward_infer(x, state, None, None, pb.RenormConfig())
        assert Counting.calls == 1 and rel_err(y, x) < 1e-15  # mean 0, std 1: y = x
        with fast_kernels_disabled():
            assert type(kernel_for(np)) is GenericKernel
            with kernel_forced(is_numpy_namespace, NUMPY_KERNEL):
                assert kernel_for(np) is NUMPY_KERNEL
        assert kernel_for(np) is counting
    finally:
        kernels._REGISTRY[:] = saved
    assert kernel_for(np) is builtin_kernel(np)
    assert type(kernel_for(np, replica_mean=lambda a: a)) is GenericKernel
