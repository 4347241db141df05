"""``SyncBatchRenorm`` with 2 processes on the gloo backend: outputs, gradients and state
equal one process running the concatenated batch, identically on every rank."""

from __future__ import annotations

import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402
from test_torch_support import batch, is_close, random_affine  # noqa: E402

from portable_brn.adapters.torch import BatchRenorm2d, SyncBatchRenorm, recalibrate  # noqa: E402
from portable_brn.conformance import reference  # noqa: E402

pytestmark = pytest.mark.xdist_group("torch-distributed")  # one spawn of the workers

WORLD = 2
STEPS = 3
SHAPE = (8, 3, 2, 2)
OPTIONS = {"momentum": 0.3, "r_max": 1.5, "d_max": 1.0, "dtype": torch.float64}
SPLITS = {"equal": (0, 4, 8), "unequal": (0, 6, 8)}  # rows of the global batch per rank
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _global_batches():
    """Inputs and output gradients of every step, the same in every process."""
    return [(batch(step, SHAPE, torch.float64), batch(step, SHAPE, torch.float64, seed=1))
            for step in range(STEPS)]


def _train(layer, rows):
    """Train on ``rows`` of each global batch; what each step produced."""
    results = []
    for x, grad in _global_batches():
        x = x[rows].clone().requires_grad_(True)
        layer.zero_grad()
        y = layer(x)
        y.backward(grad[rows])
        results.append({"y": y.detach(), "dx": x.grad, "dweight": layer.weight.grad.clone(),
                        "dbias": layer.bias.grad.clone(), "mean": layer.running_mean.clone(),
                        "std": layer.running_std.clone(),
                        "step": layer.num_batches_tracked.clone()})
    return results


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        results = {}
        for name, bounds in SPLITS.items():
            rows = slice(bounds[rank], bounds[rank + 1])
            layer = random_affine(SyncBatchRenorm(3, **OPTIONS))
            results[name] = _train(layer, rows)
            recalibrate(layer, [x[rows] for x, _ in _global_batches()])
            results[name + "-recalibrated"] = (layer.running_mean, layer.running_std)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(out_dir: Path) -> list[dict]:
    """Run ``_worker`` on every rank, killing them all past ``TIMEOUT_S``."""
    context = mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish in {TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("sync"))


@pytest.mark.parametrize("split", list(SPLITS))
def test_sync_equals_one_process_on_the_concatenated_batch(ranks, split):
    single = _train(random_affine(BatchRenorm2d(3, **OPTIONS)), slice(None))
    for step, expected in enumerate(single):
        per_rank = [r[split][step] for r in ranks]
        for name in ("y", "dx"):
            assert is_close(torch.cat([r[name] for r in per_rank]), expected[name], 1e-12)
        for name in ("dweight", "dbias"):  # parameter gradients stay local; DDP sums them
            assert is_close(sum(r[name] for r in per_rank), expected[name], 1e-12)
        for name in ("mean", "std"):
            assert is_close(per_rank[0][name], expected[name], 1e-12)
            assert torch.equal(per_rank[0][name], per_rank[1][name])
        assert int(per_rank[0]["step"]) == int(per_rank[1]["step"]) == step + 1


@pytest.mark.parametrize("split", list(SPLITS))
def test_recalibrate_pools_every_process(ranks, split):
    mean, std = reference.recalibrate([x.numpy() for x, _ in _global_batches()])
    for rank in ranks:
        recalibrated_mean, recalibrated_std = rank[split + "-recalibrated"]
        assert is_close(recalibrated_mean, mean, 1e-12)
        assert is_close(recalibrated_std, std, 1e-12)
