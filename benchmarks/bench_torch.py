"""Speed of the PyTorch batch renorm layers relative to ``torch.nn.BatchNorm*``.

Each case times a native batch norm layer and the renorm layer on the same input in
one run: a training step (forward and backward) or an inference forward.  The two
strictly alternate, so each step always follows one of the other layer (same cache
state for both: a layer that follows itself finds its own tensors warm and runs up to
20% faster); the table shows the median time of each and the median of the per-round
ratios, which resists the drift of a shared, noisy machine.

glibc returns freed 25 MB buffers to the system and faults them back in page by page
(thousands of page faults per step, milliseconds each time, landing on either layer at
random).  So that the table compares computation, the script re-runs itself with
glibc's ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set so freed memory is
kept, for both layers alike; ``--default-malloc`` measures with glibc's defaults.

    python benchmarks/bench_torch.py [--rounds-scale 1.0] [--default-malloc]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from portable_brn.adapters.torch import BatchRenorm1d, BatchRenorm2d


@dataclass(frozen=True)
class Case:
    """One row of the table."""

    name: str
    shape: tuple[int, ...]
    channels_last: bool
    training: bool
    rounds: int
    target: float


CASES = (
    Case("train 2d NCHW (32,64,56,56)", (32, 64, 56, 56), False, True, 40, 1.10),
    Case("train 2d channels_last", (32, 64, 56, 56), True, True, 40, 1.10),
    Case("train 1d (1024,512)", (1024, 512), False, True, 600, 1.10),
    Case("eval 2d NCHW (32,64,56,56)", (32, 64, 56, 56), False, False, 200, 1.05),
    Case("eval 2d channels_last", (32, 64, 56, 56), True, False, 200, 1.05),
    Case("eval 1d (1024,512)", (1024, 512), False, False, 1500, 1.05),
)


def _layers(case: Case) -> tuple[nn.Module, nn.Module]:
    """The native batch norm and the renorm layer for ``case``, in its mode."""
    channels = case.shape[1]
    if len(case.shape) == 2:
        native, renorm = nn.BatchNorm1d(channels), BatchRenorm1d(channels)
    else:
        native, renorm = nn.BatchNorm2d(channels), BatchRenorm2d(channels)
    return native.train(case.training), renorm.train(case.training)


def _step(layer: nn.Module, case: Case) -> Callable[[], None]:
    """A closure running one timed step of ``layer`` on a fixed input."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(case.shape, generator=generator)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if not case.training:
        def infer() -> None:
            with torch.no_grad():
                layer(x)
        return infer
    x.requires_grad_(True)
    grad = torch.randn_like(x)

    def train() -> None:
        x.grad = None
        layer(x).backward(grad)
    return train


def _time(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure(case: Case, rounds_scale: float) -> tuple[float, float, float]:
    """Median native ms, median renorm ms and median per-round ratio for ``case``."""
    native, renorm = (_step(layer, case) for layer in _layers(case))
    rounds = max(5, int(case.rounds * rounds_scale))
    for _ in range(max(3, rounds // 10)):
        native()
        renorm()
    native_times, renorm_times = [], []
    for _ in range(rounds):
        native_times.append(_time(native))
        renorm_times.append(_time(renorm))
    ratios = [r / n for r, n in zip(renorm_times, native_times, strict=True)]
    return (statistics.median(native_times) * 1e3, statistics.median(renorm_times) * 1e3,
            statistics.median(ratios))


KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
                     "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def _rerun_keeping_freed_memory() -> None:
    """Replace this process by itself with glibc told to keep freed memory (once)."""
    if any(name in os.environ for name in KEEP_FREED_MEMORY):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **KEEP_FREED_MEMORY})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds-scale", type=float, default=1.0,
                        help="multiply every case's number of timed rounds")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default of returning freed memory to the system")
    args = parser.parse_args()
    if not args.default_malloc:
        _rerun_keeping_freed_memory()
    torch.set_num_threads(2)
    malloc = " ".join(f"{k}={os.environ[k]}" for k in KEEP_FREED_MEMORY if k in os.environ)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"malloc: {malloc or 'glibc defaults'}")
    print(f"| {'case':<28} | {'native ms':>9} | {'renorm ms':>9} | {'ratio':>5} | target |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 11}|{'-' * 7}|--------|")
    for case in CASES:
        native_ms, renorm_ms, ratio = measure(case, args.rounds_scale)
        print(f"| {case.name:<28} | {native_ms:9.3f} | {renorm_ms:9.3f} | {ratio:5.2f} | "
              f"<= {case.target:.2f} |", flush=True)


if __name__ == "__main__":
    main()
