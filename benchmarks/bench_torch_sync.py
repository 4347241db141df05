"""Speed of ``SyncBatchRenorm`` over 2 gloo processes on this machine, relative to the local
``torch.nn.BatchNorm*`` on the same per-process batch, which has no collective.

Rows: the native path (one all_reduce each way) and the core's generic path it replaced
(forced here by an ``output_clip`` that never binds), and the two bare all_reduces of
the native path's sizes: the floor any synchronised batch norm pays (``SyncBatchNorm``
itself needs CUDA).  Each process uses one thread.

    python benchmarks/bench_torch_sync.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timing import measure, print_table
from torch import nn

from portable_brn.adapters.torch import SyncBatchRenorm

WORLD = 2
CASES = {"NCHW (16, 64, 28, 28)": ((16, 64, 28, 28), False),
         "channels_last (16, 64, 28, 28)": ((16, 64, 28, 28), True),
         "(N, C) (512, 512)": ((512, 512), False)}


def _step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def run() -> None:
        x.grad = None
        layer(x).backward(grad)
    return run


def _collectives(features: int):
    """The native path's two all_reduces alone: (1 + 2C) and 2C float64 values."""
    forward = torch.zeros(1 + 2 * features, dtype=torch.float64)
    backward = torch.zeros(2 * features, dtype=torch.float64)

    def run() -> None:
        dist.all_reduce(forward)
        dist.all_reduce(backward)
    return run


def _worker(rank: int, port: int, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=120))
    rows = []
    for name, (shape, channels_last) in CASES.items():
        x = torch.randn(shape)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        grad = torch.randn_like(x)
        native = nn.BatchNorm2d(shape[1]) if x.dim() == 4 else nn.BatchNorm1d(shape[1])
        candidates = {
            "batchnorm": _step(native, x, grad),
            "native": _step(SyncBatchRenorm(shape[1]), x, grad),
            "generic": _step(SyncBatchRenorm(shape[1], output_clip=(-1e30, 1e30)), x, grad),
            "collectives": _collectives(shape[1]),
        }
        times = measure(candidates, repeats=repeats)
        base = times["batchnorm"]
        rows.append((name, base * 1e3, times["collectives"] / base, times["native"] / base,
                     times["generic"] / base))
    if rank == 0:
        print_table(f"SyncBatchRenorm, {WORLD} gloo processes, training step, ratio to the "
                    f"local BatchNorm (no collective)",
                    ("case", "BatchNorm ms", "2 all_reduces", "native", "generic (before)"),
                    rows)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_worker, args=(port, args.repeats), nprocs=WORLD, start_method="spawn")


if __name__ == "__main__":
    main()
