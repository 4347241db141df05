"""Speed of the PyTorch batch renorm layers relative to ``torch.nn.BatchNorm*``.

Each row times native batch norm and the renorm layer (and, at the 1d and critic rows,
TorchRL's and sb3-contrib's ``BatchRenorm1d`` when installed: ``pip install
portable-brn[bench]``) on the same input in one run: a training step (forward and
backward) or an inference forward, eager or under ``torch.compile``.  The candidates
strictly alternate, so each step follows one of another candidate (the same cache
state for all: a layer that follows itself finds its own tensors warm and runs up to
20% faster); the table shows the median time of each and the median of the per-round
ratios to native, which resists the drift of a shared, noisy machine.

glibc returns freed 25 MB buffers to the system and faults them back in page by page
(thousands of page faults per step, milliseconds each time, landing on either layer at
random).  So that the table compares computation, the script re-runs itself with
glibc's ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set so freed memory is
kept, for every candidate alike; ``--default-malloc`` measures with glibc's defaults.

    python benchmarks/bench_torch.py [--rounds-scale 1.0] [--default-malloc] [--no-compile]
        [--device cpu|cuda] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from portable_brn.adapters.torch import BatchRenorm1d, BatchRenorm2d

IMAGE = (32, 64, 56, 56)


@dataclass(frozen=True)
class Case:
    """One row of the table: ``model`` is "layer" (one norm layer on a tensor of
    ``shape``) or "critic" (the CrossQ-style MLP, batch ``shape[0]``)."""

    name: str
    shape: tuple[int, ...]
    rounds: int
    target: float
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    training: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    model: str = "layer"
    compiled: bool = False
    others: bool = False  # TorchRL / sb3-contrib columns


CASES = (
    Case("train 2d NCHW (32,64,56,56)", IMAGE, 30, 1.10),
    Case("train 2d channels_last", IMAGE, 30, 1.10, channels_last=True),
    Case("train 2d NCHW bfloat16", IMAGE, 20, 1.10, dtype=torch.bfloat16),
    Case("train 2d channels_last bfloat16", IMAGE, 20, 1.10, dtype=torch.bfloat16,
         channels_last=True),
    Case("train 2d NCHW float16", IMAGE, 20, 1.10, dtype=torch.float16),
    Case("train 2d channels_last float16", IMAGE, 20, 1.10, dtype=torch.float16,
         channels_last=True),
    Case("train 2d micro_batch=4", IMAGE, 20, 1.15, options={"micro_batch": 4}),
    Case("train 2d micro_batch=2", IMAGE, 20, 1.15, options={"micro_batch": 2}),
    Case("train 2d output_clip", IMAGE, 20, 1.15, options={"output_clip": (-3.0, 3.0)}),
    Case("train 1d (1024,512)", (1024, 512), 400, 1.15, others=True),
    Case("train 1d (256,256)", (256, 256), 800, 1.50, others=True),
    Case("train critic MLP batch 256", (256, 24), 300, 1.15, model="critic", others=True),
    Case("eval 2d NCHW", IMAGE, 100, 1.05, training=False),
    Case("eval 2d channels_last", IMAGE, 100, 1.05, training=False, channels_last=True),
    Case("eval 1d (1024,512)", (1024, 512), 1000, 1.05, training=False),
    Case("compiled train 2d NCHW", IMAGE, 20, 1.10, compiled=True),
    Case("compiled train critic MLP", (256, 24), 300, 1.10, model="critic", compiled=True),
)


def _other_norms() -> dict[str, Callable[[int], nn.Module]]:
    """TorchRL's and sb3-contrib's BatchRenorm1d, those that are installed."""
    norms: dict[str, Callable[[int], nn.Module]] = {}
    try:
        from torchrl.modules import BatchRenorm1d as TorchRLRenorm
        norms["torchrl"] = lambda n: TorchRLRenorm(n, eps=1e-3, warmup_steps=0)
    except ImportError:
        pass
    try:
        from sb3_contrib.common.torch_layers import BatchRenorm1d as SB3Renorm
        norms["sb3"] = lambda n: SB3Renorm(n, warmup_steps=1)
    except ImportError:
        pass
    return norms


def _critic(norm: Callable[[int], nn.Module], inputs: int, units: int = 256) -> nn.Module:
    """norm - Linear - norm - ReLU - Linear - norm - ReLU - Linear (CrossQ's critic)."""
    return nn.Sequential(norm(inputs), nn.Linear(inputs, units), norm(units), nn.ReLU(),
                         nn.Linear(units, units), norm(units), nn.ReLU(), nn.Linear(units, 1))


def _models(case: Case, device: str) -> dict[str, nn.Module]:
    """Every candidate for ``case``: native first."""
    channels = case.shape[1]
    if case.model == "critic":
        norms = {"native": nn.BatchNorm1d, "renorm": BatchRenorm1d}
    elif len(case.shape) == 2:
        norms = {"native": nn.BatchNorm1d,
                 "renorm": lambda n: BatchRenorm1d(n, **case.options)}
    else:
        norms = {"native": nn.BatchNorm2d,
                 "renorm": lambda n: BatchRenorm2d(n, **case.options)}
    if case.others:
        norms.update(_other_norms())
    models = {}
    for name, norm in norms.items():
        torch.manual_seed(0)
        model = _critic(norm, channels) if case.model == "critic" else norm(channels)
        model = model.to(device).train(case.training)
        models[name] = torch.compile(model, fullgraph=True) if case.compiled else model
    return models


def _step(model: nn.Module, case: Case, device: str) -> Callable[[], None]:
    """A closure running one timed step of ``model`` on a fixed input."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(case.shape, generator=generator).to(device, case.dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if not case.training:
        def infer() -> None:
            with torch.no_grad():
                model(x)
            sync()
        return infer
    x.requires_grad_(True)
    if case.model == "critic":
        def train_critic() -> None:
            x.grad = None
            for p in model.parameters():
                p.grad = None
            model(x).sum().backward()
            sync()
        return train_critic
    grad = torch.randn_like(x)

    def train() -> None:
        x.grad = None
        model(x).backward(grad)
        sync()
    return train


def _time(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure(case: Case, rounds_scale: float, device: str) -> dict[str, tuple[float, float]]:
    """Per candidate: median ms and median per-round ratio to native."""
    steps = {name: _step(model, case, device) for name, model in _models(case, device).items()}
    rounds = max(5, int(case.rounds * rounds_scale))
    for _ in range(max(3, rounds // 10)):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(_time(step))
    native = times["native"]
    return {name: (statistics.median(t) * 1e3,
                   statistics.median(a / b for a, b in zip(t, native, strict=True)))
            for name, t in times.items()}


KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
                     "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def _rerun_keeping_freed_memory() -> None:
    """Replace this process by itself with glibc told to keep freed memory (once)."""
    if any(name in os.environ for name in KEEP_FREED_MEMORY):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **KEEP_FREED_MEMORY})


def _cell(result: dict[str, tuple[float, float]], name: str) -> str:
    if name not in result:
        return "-"
    ms, ratio = result[name]
    return f"{ms:.3f} ({ratio:.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds-scale", type=float, default=1.0,
                        help="multiply every case's number of timed rounds")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default of returning freed memory to the system")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    parser.add_argument("--only", default="", help="run only rows whose name contains this")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if not args.default_malloc:
        _rerun_keeping_freed_memory()
    if args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    malloc = " ".join(f"{k}={os.environ[k]}" for k in KEEP_FREED_MEMORY if k in os.environ)
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
          f"malloc: {malloc or 'glibc defaults'}; each cell: median ms (median ratio to "
          f"native)")
    print("| case | native ms | renorm | ratio | target | torchrl | sb3-contrib |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for case in CASES:
        if (args.no_compile and case.compiled) or args.only not in case.name:
            continue
        try:
            result = measure(case, args.rounds_scale, args.device)
        except Exception as error:  # a row that cannot run says so and the table goes on
            if os.environ.get("BENCH_RAISE"):
                raise
            print(f"| {case.name} | fails: {type(error).__name__} | | | <= {case.target:.2f} "
                  f"| | |", flush=True)
            rows.append({"case": case.name, "target": case.target,
                         "error": f"{type(error).__name__}: {error}"[:500]})
            continue
        native_ms, ratio = result["native"][0], result["renorm"][1]
        print(f"| {case.name} | {native_ms:.3f} | {result['renorm'][0]:.3f} | "
              f"{ratio:.2f} | <= {case.target:.2f} | {_cell(result, 'torchrl')} | "
              f"{_cell(result, 'sb3')} |", flush=True)
        rows.append({"case": case.name, "target": case.target,
                     **{f"{name}_ms": ms for name, (ms, _) in result.items()},
                     **{f"{name}_ratio": r for name, (_, r) in result.items()}})
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"torch": torch.__version__, "device": args.device, "rows": rows},
                      file, indent=1)


if __name__ == "__main__":
    main()
