"""``SyncBatchRenorm`` with 2 processes on the gloo backend: outputs, gradients and state
equal the float64 reference on the concatenated batch (with and without micro-batches),
identically on every rank; ``recalibrate`` pools every rank, empty ones included."""

from __future__ import annotations

import socket
import time
from datetime import timedelta
from itertools import product
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402
from test_torch_support import (  # noqa: E402
    batch,
    is_close,
    numpy,
    population_statistics,
    random_affine,
    reference_options,
)
from torch import nn  # noqa: E402

from portable_brn import schedules  # noqa: E402
from portable_brn.adapters.torch import BatchRenorm2d, SyncBatchRenorm, recalibrate  # noqa: E402
from portable_brn.conformance import reference  # noqa: E402

pytestmark = pytest.mark.xdist_group("torch-distributed")  # one spawn of the workers

WORLD = 2
STEPS = 3
SHAPE = (8, 3, 2, 2)
OPTIONS = {"momentum": 0.3, "r_max": 1.5, "d_max": 1.0, "dtype": torch.float64}
# micro-batches of 2 rows stay on their rank; only the state update is averaged
CONFIGS = {"plain": OPTIONS, "micro-batch": {**OPTIONS, "micro_batch": 2}}
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


def _global_masks():
    """Per step, which elements of the global batch count (about 60%, per row and
    pixel), the same in every process."""
    generator = torch.Generator().manual_seed(5)
    return [torch.rand((SHAPE[0], 1, *SHAPE[2:]), generator=generator) < 0.6
            for _ in range(STEPS)]


def _train(layer, rows, masks=None):
    """Train on ``rows`` of each global batch (counting ``masks`` when given); what each
    step produced."""
    results = []
    for step, (x, grad) in enumerate(_global_batches()):
        x = x[rows].clone().requires_grad_(True)
        layer.zero_grad()
        y = layer(x) if masks is None else layer(x, mask=masks[step][rows])
        y.backward(grad[rows])
        results.append({"y": y.detach(), "dx": x.grad, "dweight": layer.weight.grad.clone(),
                        "dbias": layer.bias.grad.clone(), "mean": layer.running_mean.clone(),
                        "std": layer.running_std.clone(),
                        "step": layer.num_batches_tracked.clone()})
    return results


def _stacked_sync_model():
    """Two synchronised renorm layers with a convolution between, the same on every rank,
    running statistics far from the data's."""
    torch.manual_seed(0)
    model = nn.Sequential(SyncBatchRenorm(3, **OPTIONS), nn.Conv2d(3, 2, 1, dtype=torch.float64),
                          SyncBatchRenorm(2, **OPTIONS))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.running_mean.fill_(3.0)
            layer.running_std.fill_(0.2)
    return model


def _recalibrate_with_empty_ranks(empty_ranks: tuple[int, ...], rank: int):
    """Recalibrate the stacked model, ranks in ``empty_ranks`` with no batch: the state
    dict it ends with, or the error it raised and whether the state stayed as it was."""
    model = _stacked_sync_model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    batches = [] if rank in empty_ranks else [x for x, _ in _global_batches()]
    try:
        recalibrate(model, batches)
    except ValueError as error:
        unchanged = all(torch.equal(value, model.state_dict()[name])
                        for name, value in before.items())
        return {"error": str(error), "unchanged": unchanged}
    return model.state_dict()


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        results = {}
        for (config, options), (split, bounds) in product(CONFIGS.items(), SPLITS.items()):
            rows = slice(bounds[rank], bounds[rank + 1])
            layer = random_affine(SyncBatchRenorm(3, **options))
            results[config, split] = _train(layer, rows)
            recalibrate(layer, [x[rows] for x, _ in _global_batches()])
            results[config, split, "recalibrated"] = (layer.running_mean, layer.running_std)
            if config == "plain":
                layer = random_affine(SyncBatchRenorm(3, **options))
                results["masked", split] = _train(layer, rows, _global_masks())
        results["one-empty"] = _recalibrate_with_empty_ranks((0,), rank)
        results["all-empty"] = _recalibrate_with_empty_ranks((0, 1), rank)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(out_dir: Path, worker=_worker) -> list[dict]:
    """Run ``worker`` on every rank, killing them all past ``TIMEOUT_S``: a hang fails."""
    context = mp.start_processes(worker, args=(_free_port(), str(out_dir)), nprocs=WORLD,
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


def _reference_steps(options, masks=None):
    """The float64 reference's steps on the whole global batch, state carried over."""
    layer = random_affine(BatchRenorm2d(3, **options))
    mean, std = numpy(layer.running_mean), numpy(layer.running_std)
    steps = []
    for step, (x, grad) in enumerate(_global_batches()):
        expected = reference.train_step(x.numpy(), mean, std, step, numpy(layer.weight),
                                        numpy(layer.bias), grad.numpy(),
                                        mask=None if masks is None else masks[step].numpy(),
                                        **reference_options(layer))
        steps.append(expected)
        mean, std = expected["mean"], expected["std"]
    return steps


def _assert_global_step(per_rank, expected, bound):
    """Every rank's part of one step against ``expected`` on the concatenated batch:
    outputs and input gradients concatenated, parameter gradients summed (they stay
    local; DDP sums them), running statistics equal to it and identical on every rank."""
    for name in ("y", "dx"):
        assert is_close(torch.cat([r[name] for r in per_rank]), expected[name], bound), name
    for name in ("dweight", "dbias"):
        assert is_close(sum(r[name] for r in per_rank), expected[name], bound), name
    for name in ("mean", "std"):
        assert is_close(per_rank[0][name], expected[name], bound), name
        assert torch.equal(per_rank[0][name], per_rank[1][name]), name


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_sync_equals_the_reference_on_the_concatenated_batch(ranks, config, split):
    """Without micro-batches the statistics span the global batch; with them each rank's
    micro-batches stay local and the running statistics move toward the mean over every
    rank's micro-batches, identically on every rank."""
    for step, expected in enumerate(_reference_steps(CONFIGS[config])):
        per_rank = [r[config, split][step] for r in ranks]
        _assert_global_step(per_rank, expected, 1e-12)
        assert int(per_rank[0]["step"]) == int(per_rank[1]["step"]) == step + 1


@pytest.mark.parametrize("split", list(SPLITS))
def test_masked_sync_counts_the_masked_elements_of_the_global_batch(ranks, split):
    """With a mask the statistics are those of the counted elements of every rank's
    batch together, whatever each rank's share of them."""
    for step, expected in enumerate(_reference_steps(OPTIONS, _global_masks())):
        per_rank = [r["masked", split][step] for r in ranks]
        _assert_global_step(per_rank, expected, 1e-12)


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_recalibrate_pools_every_process(ranks, config, split):
    mean, std = reference.recalibrate([x.numpy() for x, _ in _global_batches()])
    for rank in ranks:
        recalibrated_mean, recalibrated_std = rank[config, split, "recalibrated"]
        assert is_close(recalibrated_mean, mean, 1e-12)
        assert is_close(recalibrated_std, std, 1e-12)


def test_recalibrate_with_an_empty_rank_gives_every_rank_the_others_statistics(ranks):
    """Rank 0 has no batch: it neither raises nor hangs, and both ranks end with the
    statistics of rank 1's data under the recalibrated stacked model."""
    states = [rank["one-empty"] for rank in ranks]
    model = _stacked_sync_model()
    model.load_state_dict(states[1])
    expected = population_statistics(model, [x for x, _ in _global_batches()])
    assert set(expected) == {"0", "2"}
    for name, (mean, std) in expected.items():
        assert is_close(states[1][name + ".running_mean"], mean, 1e-12)
        assert is_close(states[1][name + ".running_std"], std, 1e-12)
    for key, value in states[1].items():
        assert torch.equal(states[0][key], value), key


def test_recalibrate_with_every_rank_empty_raises_on_every_rank(ranks):
    for rank in ranks:
        assert rank["all-empty"] == {
            "error": "batches must yield at least one batch, got none", "unchanged": True}


# -- uneven ranks: no hang, the global result or the same error on every rank; the native
# path's collectives and its float32 accuracy at a large offset

UNEVEN = {"empty-rank": (0, 0, 8), "one-row-rank": (0, 1, 8), "one-row-in-total": (0, 1, 1)}
# large enough that float32 running sums over the rows lose the mean at this offset
OFFSET_CASES = {"nchw": ((32, 4, 16, 16), False), "channels-last": ((32, 4, 16, 16), True),
                "rows": ((8192, 4), False)}
# momentum=None: the cumulative average, a momentum schedule on the native path too
SCHEDULED = {**OPTIONS, "warmup_steps": 1, "d_max": schedules.linear(0.0, 1.0, 0, 2),
             "r_max": schedules.linear(1.0, 1.5, 1, 3), "momentum": None}
OFFSET_SPLIT = (0, 5, 16)  # unequal: 5 and 11 sixteenths of the rows
OFFSET_OPTIONS = {"momentum": 0.3, "r_max": 1.5, "d_max": 1.0}


def _rows_input(step: int, rows: slice, dtype=torch.float64):
    """(N, C) rows of a global (8, 3) batch and its output gradient."""
    x, grad = batch(step, (8, 3), dtype), batch(step, (8, 3), dtype, seed=1)
    return x[rows], grad[rows]


def _step_or_error(layer, x, grad):
    """One training step's results, or the ValueError and whether the state stayed."""
    before = {name: value.clone() for name, value in layer.state_dict().items()}
    x = x.clone().requires_grad_(True)
    layer.zero_grad()
    try:
        y = layer(x)
    except ValueError as error:
        unchanged = all(torch.equal(value, layer.state_dict()[name])
                        for name, value in before.items())
        return {"error": str(error), "unchanged": unchanged}
    y.backward(grad)
    results = {"y": y.detach(), "dx": x.grad, "dweight": layer.weight.grad.clone(),
               "dbias": layer.bias.grad.clone()}
    if layer.track_running_stats:
        results.update(mean=layer.running_mean.clone(), std=layer.running_std.clone(),
                       step=layer.num_batches_tracked.clone())
    return results


def _offset_batch(shape, channels_last, seed):
    generator = torch.Generator().manual_seed(seed)
    x = (100.0 + torch.randn(shape, generator=generator, dtype=torch.float64)).float()
    grad = torch.randn(shape, generator=generator).float()
    if channels_last:
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    return x, grad


class _CollectiveCounter:
    """Wraps ``torch.distributed.all_reduce``, counting calls."""

    def __init__(self):
        self.calls, self.original = 0, dist.all_reduce

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.original(*args, **kwargs)


def _uneven_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=30))
    try:
        results = {}
        for case, bounds in UNEVEN.items():
            rows = slice(bounds[rank], bounds[rank + 1])
            for config in ("plain", "micro-batch"):
                layer = random_affine(SyncBatchRenorm(3, **CONFIGS[config]))
                results[case, config] = [_step_or_error(layer, *_rows_input(step, rows))
                                         for step in range(2)]
        rows = slice(UNEVEN["one-row-rank"][rank], UNEVEN["one-row-rank"][rank + 1])
        scheduled = random_affine(SyncBatchRenorm(3, **SCHEDULED))
        results["scheduled"] = [_step_or_error(scheduled, *_rows_input(step, rows))
                                for step in range(2)]
        stateless = random_affine(SyncBatchRenorm(3, track_running_stats=False,
                                                  dtype=torch.float64))
        results["stateless"] = _step_or_error(stateless, *_rows_input(0, rows))
        for case, (shape, channels_last) in OFFSET_CASES.items():
            scale = shape[0] // 16
            rows = slice(OFFSET_SPLIT[rank] * scale, OFFSET_SPLIT[rank + 1] * scale)
            layer = random_affine(SyncBatchRenorm(4, **OFFSET_OPTIONS))
            counter = _CollectiveCounter()
            dist.all_reduce = counter
            try:
                steps = []
                for step in range(2):
                    x, grad = _offset_batch(shape, channels_last, step)
                    forward_before = counter.calls
                    x = x[rows].clone().requires_grad_(True)
                    layer.zero_grad()
                    y = layer(x)
                    forward = counter.calls - forward_before
                    y.backward(grad[rows])
                    steps.append({"y": y.detach(), "dx": x.grad,
                                  "dweight": layer.weight.grad.clone(),
                                  "dbias": layer.bias.grad.clone(),
                                  "mean": layer.running_mean.clone(),
                                  "std": layer.running_std.clone(),
                                  "collectives": (forward, counter.calls - forward_before
                                                  - forward),
                                  "channels_last": y.is_contiguous(
                                      memory_format=torch.channels_last)})
            finally:
                dist.all_reduce = counter.original
            results["offset", case] = steps
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def uneven_ranks(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("uneven"), _uneven_worker)


def _reference_rows_steps(options):
    layer = random_affine(BatchRenorm2d(3, **options))
    mean, std = numpy(layer.running_mean), numpy(layer.running_std)
    steps = []
    for step in range(2):
        x, grad = _rows_input(step, slice(0, 8))
        expected = reference.train_step(x.numpy(), mean, std, step, numpy(layer.weight),
                                        numpy(layer.bias), grad.numpy(),
                                        **reference_options(layer))
        steps.append(expected)
        mean, std = expected["mean"], expected["std"]
    return steps


@pytest.mark.parametrize("case", ["empty-rank", "one-row-rank", "scheduled"])
def test_an_empty_or_one_row_rank_gets_the_global_result(uneven_ranks, case):
    """Rank 0 holds 0 rows or 1 row of the (8, 3) batch: no hang, and both ranks compute
    the float64 reference's step on the whole batch (also under warm-up and schedules)."""
    options = SCHEDULED if case == "scheduled" else OPTIONS
    for step, expected in enumerate(_reference_rows_steps(options)):
        per_rank = [r[case] if case == "scheduled" else r[case, "plain"] for r in uneven_ranks]
        per_rank = [r[step] for r in per_rank]
        _assert_global_step(per_rank, expected, 1e-12)
        assert int(per_rank[0]["step"]) == int(per_rank[1]["step"]) == step + 1


def test_without_running_stats_it_is_batch_norm_of_the_global_batch(uneven_ranks):
    """track_running_stats=False, 1 row and 7 rows: torch's batch norm of all 8 rows."""
    layer = random_affine(SyncBatchRenorm(3, track_running_stats=False, dtype=torch.float64))
    x, grad = _rows_input(0, slice(0, 8))
    x.requires_grad_(True)
    expected = torch.nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True,
                                              0.0, layer.eps)
    expected.backward(grad)
    per_rank = [r["stateless"] for r in uneven_ranks]
    assert is_close(torch.cat([r["y"] for r in per_rank]), expected, 1e-12)
    assert is_close(torch.cat([r["dx"] for r in per_rank]), x.grad, 1e-12)
    assert is_close(sum(r["dweight"] for r in per_rank), layer.weight.grad, 1e-12)
    assert is_close(sum(r["dbias"] for r in per_rank), layer.bias.grad, 1e-12)


def test_one_row_in_total_raises_the_same_error_on_every_rank(uneven_ranks):
    for config in ("plain", "micro-batch"):
        outcomes = [r["one-row-in-total", config] for r in uneven_ranks]
        for step in range(2):
            assert outcomes[0][step] == outcomes[1][step]
            assert outcomes[0][step]["unchanged"] is True
            assert ("more than 1 value per channel" in outcomes[0][step]["error"]
                    or "does not divide" in outcomes[0][step]["error"])


@pytest.mark.parametrize("case", ["empty-rank", "one-row-rank"])
def test_the_generic_path_raises_on_every_rank_when_one_rank_cannot_run(uneven_ranks, case):
    """micro_batch=2 on a rank with 0 rows or 1 row: every rank raises the same error
    naming each refused rank, none hangs."""
    outcomes = [r[case, "micro-batch"] for r in uneven_ranks]
    for step in range(2):
        assert outcomes[0][step] == outcomes[1][step]
        assert outcomes[0][step]["unchanged"] is True
        assert "process 0: " in outcomes[0][step]["error"]


def _float64_step(x, grad, step_state):
    """The float64 reference's step on a float32 global batch (its exact values)."""
    layer = random_affine(SyncBatchRenorm(4, **OFFSET_OPTIONS))
    mean, std = step_state
    return reference.train_step(numpy(x), mean, std, 0, numpy(layer.weight),
                                numpy(layer.bias), numpy(grad), **reference_options(layer))


@pytest.mark.parametrize("case", list(OFFSET_CASES))
def test_native_path_at_a_large_offset_is_float32_accurate_with_one_collective_each_way(
        uneven_ranks, case):
    """x = 100 + N(0, 1) in float32 split 5 : 11 over the ranks: y, dx, dweight, dbias and
    the new state within 1e-5 of a float64 computation on the concatenated batch; one
    all_reduce in the forward and one in the backward of each step."""
    shape, channels_last = OFFSET_CASES[case]
    state = (np.zeros(4), np.ones(4))
    for step in range(2):
        x, grad = _offset_batch(shape, channels_last, step)
        expected = _float64_step(x, grad, state)
        per_rank = [r["offset", case][step] for r in uneven_ranks]
        _assert_global_step(per_rank, expected, 1e-5)
        for r in per_rank:
            assert r["collectives"] == (1, 1)
            assert r["channels_last"] == channels_last
        state = (numpy(per_rank[0]["mean"]), numpy(per_rank[0]["std"]))
