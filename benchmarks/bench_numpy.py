"""NumPy training step (forward + backward) in copies of the input.

Prints, for each shape, the median time of one ``np.copyto`` of the input (the unit),
of a training step through the core with the fastest kernel installed (the Numba kernel
with ``portable-brn[numba]``), of the same step through the NumPy ufunc kernel, and
through the generic Array API kernel (what a straightforward NumPy port costs), all
measured round-robin in one run.  Target: the step costs at most 10 copies.

Every timed call starts from the same cache state, in two ways:

- cold: a 64 MiB copy (twice the last-level cache) flushes the caches first, so every
  array comes from memory, as between a layer's forward and its backward in a network;
- warm: the candidate runs once untimed first, so its arrays are already in cache.

For arrays larger than the cache the two agree; for a (1024, 512) float32 array (2 MB)
they differ by up to 2x, because a warm copy is as cheap as copying gets while the
step's many passes are paid in either case.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from array_api_compat import is_numpy_namespace

import portable_brn as pb
from portable_brn.kernels import fast_kernels_disabled, kernel_for, kernel_forced
from portable_brn.numpy_kernel import NumpyKernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import measure, print_table

SHAPES = [(32, 64, 56, 56), (1024, 512)]
_FLUSH_SOURCE = np.ones(1 << 24, np.float32)  # 64 MiB
_FLUSH_TARGET = np.empty_like(_FLUSH_SOURCE)


def _cold(_: Callable[[], object]) -> None:
    """Evict every cache level by copying more data than they hold."""
    np.copyto(_FLUSH_TARGET, _FLUSH_SOURCE)


def _warm(run: Callable[[], object]) -> None:
    """Bring ``run``'s own arrays into cache."""
    run()


def _bench(shape: tuple[int, ...]) -> list[tuple[object, ...]]:
    """Two table rows, cold and warm: copy time, step time, and both steps in copies."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    features = shape[1]
    state = pb.RenormState(np.full(features, 0.1, np.float32),
                           np.full(features, 0.9, np.float32), np.asarray(100))
    weight, bias = np.ones(features, np.float32), np.zeros(features, np.float32)
    config = pb.RenormConfig()
    target = np.empty_like(x)

    def step() -> None:
        _, _, residuals = pb.forward_train(x, state, weight, bias, config)
        pb.backward(residuals, dy)

    def ufunc_step() -> None:
        with kernel_forced(is_numpy_namespace, NumpyKernel()):
            step()

    def generic_step() -> None:
        with fast_kernels_disabled():
            step()

    rows = []
    for mode, before in (("cold", _cold), ("warm", _warm)):
        times = measure({"copy": lambda: np.copyto(target, x), "step": step,
                         "ufuncs": ufunc_step, "generic": generic_step},
                        repeats=15 if x.size > 1e6 else 100, before=before)
        copy = times["copy"]
        rows.append((str(shape), mode, copy * 1e3, times["step"] * 1e3,
                     times["step"] / copy, times["ufuncs"] / copy, times["generic"] / copy))
    return rows


def main() -> None:
    rows = [row for shape in SHAPES for row in _bench(shape)]
    kernel = type(kernel_for(np)).__name__
    print_table(f"NumPy training step (forward + backward), float32, step by {kernel}",
                ("shape", "cache", "copy ms", "step ms", "step / copy", "ufunc kernel / copy",
                 "generic / copy"), rows)


if __name__ == "__main__":
    main()
