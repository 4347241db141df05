"""NumPy training step (forward + backward) in copies of the input.

Prints, for each shape, the median time of one ``np.copyto`` of the input (the unit),
of a training step through the core with its NumPy kernel, and of the same step
through the generic Array API kernel (what a straightforward NumPy port costs), all
measured round-robin in one run.  Target: the step costs at most 10 copies.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import portable_brn as pb
from portable_brn.kernels import fast_kernels_disabled

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import measure, print_table

SHAPES = [(32, 64, 56, 56), (1024, 512)]


def _bench(shape: tuple[int, ...]) -> tuple[object, ...]:
    """One table row: copy time, step time, and both steps in copies."""
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

    def generic_step() -> None:
        with fast_kernels_disabled():
            step()

    times = measure({"copy": lambda: np.copyto(target, x), "step": step,
                     "generic": generic_step}, repeats=20 if x.size > 1e6 else 200)
    copy = times["copy"]
    return (str(shape), copy * 1e3, times["step"] * 1e3, times["step"] / copy,
            times["generic"] / copy)


def main() -> None:
    rows = [_bench(shape) for shape in SHAPES]
    print_table("NumPy training step (forward + backward), float32",
                ("shape", "copy ms", "step ms", "step / copy", "generic / copy"), rows)


if __name__ == "__main__":
    main()
