"""Tests of ``portable-brn reproduce``: end to end on every installed backend, the files
it writes, determinism, the batches of each regime, and one-line errors on bad input.

Runs are tiny (a few steps), so the whole file takes seconds; what the default run
shows is measured by running the command itself, not here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest

from portable_brn.cli import main as portable_brn
from portable_brn.reproduce.backends import NetworkSpec, load_backend
from portable_brn.reproduce.cli import main
from portable_brn.reproduce.data import load_dataset
from portable_brn.reproduce.experiment import initial_weights
from portable_brn.reproduce.methods import METHODS
from portable_brn.reproduce.regimes import BATCH_SIZE, REGIMES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ADAPTERS = {"numpy": "portable_brn.adapters.array", "torch": "portable_brn.adapters.torch",
            "jax": "portable_brn.adapters.flax"}
FRAMEWORKS = {"numpy": "numpy", "torch": "torch", "jax": "flax"}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _backend_param(name: str) -> pytest.param:
    missing = [m for m in (FRAMEWORKS[name], ADAPTERS[name]) if not _installed(m)]
    reason = f"backend {name} needs {' and '.join(missing)}"
    return pytest.param(name, marks=pytest.mark.skipif(bool(missing), reason=reason))


def _tiny(out, *extra: str) -> list[str]:
    return ["--steps", "8", "--eval-every", "4", "--out", str(out), *extra]


@pytest.mark.parametrize("backend", [_backend_param(name) for name in ADAPTERS])
def test_runs_end_to_end_and_writes_table_plot_and_json(backend, tmp_path, capsys):
    assert main(_tiny(tmp_path, "--backend", backend)) == 0
    printed = capsys.readouterr().out

    for regime in REGIMES:
        row = next(line for line in printed.splitlines() if line.startswith(regime.title))
        assert row.count("%") == len(METHODS)
    assert (tmp_path / "table.txt").read_text().strip() in printed
    assert (tmp_path / "accuracy.png").read_bytes().startswith(PNG_SIGNATURE)

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["backend"] == backend
    assert len(results["runs"]) == len(REGIMES) * len(METHODS)
    for run in results["runs"]:
        assert run["steps"] == [0, 4, 8]
        assert all(0.0 <= a <= 1.0 for a in run["accuracy"])
        assert run["final_accuracy"] == run["accuracy"][-1]
    assert [row["regime"] for row in results["table"]] == [r.title for r in REGIMES]


@pytest.mark.parametrize("backend", [_backend_param(name) for name in ADAPTERS])
def test_same_seed_gives_the_same_numbers(backend, tmp_path, capsys):
    def accuracies(out, seed: str) -> list[list[float]]:
        assert main(_tiny(out, "--seed", seed, "--backend", backend)) == 0
        return [run["accuracy"] for run in json.loads((out / "results.json").read_text())["runs"]]

    first = accuracies(tmp_path / "a", "3")
    assert accuracies(tmp_path / "b", "3") == first
    assert accuracies(tmp_path / "c", "4") != first


def test_the_portable_brn_command_dispatches_here(tmp_path, capsys):
    assert portable_brn(["reproduce", *_tiny(tmp_path, "--steps", "2")]) == 0
    assert "batch renorm" in capsys.readouterr().out


def test_any_npz_with_x_and_y_is_accepted(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b", "c"], 30)
    x = rng.standard_normal((90, 2, 3)) + (y == "b")[:, None, None] * 3.0
    np.savez(tmp_path / "blobs.npz", x=x, y=y)
    assert main(_tiny(tmp_path / "out", "--data", str(tmp_path / "blobs.npz"))) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["data"].startswith("blobs.npz: 63 training and 27 held-out examples, "
                                      "6 features, 3 classes")


def test_regimes_draw_the_batches_they_promise():
    labels = np.repeat(np.arange(10), 20)
    for regime in REGIMES:
        batches = regime.batches(labels, 50, np.random.default_rng(0))
        assert batches.shape == (50, BATCH_SIZE)
        distinct = {len(np.unique(labels[batch])) for batch in batches}
        if regime.labels_per_batch is None:
            assert all(len(np.unique(batch)) == BATCH_SIZE for batch in batches)
            assert max(distinct) > 2
        else:
            assert distinct == {regime.labels_per_batch}
    assert [r.micro_batch for r in REGIMES] == [None, 2, None]


def test_batch_norm_is_renorm_with_no_correction_and_shares_everything_else():
    batch_norm, renorm = (method.options(1000, 2) for method in METHODS)
    assert (batch_norm["r_max"], batch_norm["d_max"]) == (1.0, 0.0)
    shared = ("eps", "momentum", "micro_batch")
    assert [batch_norm[k] for k in shared] == [renorm[k] for k in shared]
    step = np.asarray(50.0)
    assert (float(renorm["r_max"](step)), float(renorm["d_max"](step))) == (1.0, 0.0)
    step = np.asarray(1000.0)
    assert (float(renorm["r_max"](step)), float(renorm["d_max"](step))) == (3.0, 5.0)


def _garbage(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"not an archive")
    return path


def _without_y(tmp_path):
    path = tmp_path / "x_only.npz"
    np.savez(path, x=np.zeros((40, 3)))
    return path


def _one_label(tmp_path):
    path = tmp_path / "one_label.npz"
    np.savez(path, x=np.zeros((40, 3)), y=np.zeros(40))
    return path


@pytest.mark.parametrize(("argv", "expected"), [
    (["--backend", "tensorflow"], "unknown backend 'tensorflow'"),
    (["--steps", "0"], "--steps: expected an integer >= 1"),
    (["--eval-every", "x"], "--eval-every: expected an integer >= 1"),
    (["--nonsense"], "unrecognized arguments: --nonsense"),
    (["--data", "{tmp}/missing.npz"], "cannot read it (No such file or directory)"),
    (["--data", _garbage], "not an .npz archive"),
    (["--data", _without_y], "no array 'y'"),
    (["--data", _one_label], "at least 2 labels"),
])
def test_bad_input_gives_one_line_and_exit_code_2(argv, expected, tmp_path, capsys):
    argv = [str(a(tmp_path)) if callable(a) else a.format(tmp=tmp_path) for a in argv]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("portable-brn reproduce: error: ")
    assert expected in captured.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("backend", "hidden", "expected"), [
    ("torch", "torch", "backend torch needs torch, which is not installed: "
                       "pip install 'portable-brn[torch]'"),
    ("jax", "optax", "backend jax needs optax, which is not installed: "
                     "pip install 'portable-brn[jax]'"),
])
def test_missing_framework_is_named(backend, hidden, expected, tmp_path, capsys,
                                                monkeypatch):
    for module in ("torch", "jax", "flax", "optax"):  # the others installed, or so it seems
        if module != hidden and module not in sys.modules:
            monkeypatch.setitem(sys.modules, module, types.ModuleType(module))
    monkeypatch.setitem(sys.modules, hidden, None)  # what an uninstalled module looks like
    assert main(["--backend", backend, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert expected in err


@pytest.mark.parametrize(("backend", "adapter"), [("torch", "portable_brn.adapters.torch"),
                                                ("jax", "portable_brn.adapters.flax")])
def test_an_adapter_that_does_not_import_is_an_error_not_a_missing_backend(
        backend, adapter, monkeypatch):
    """With the frameworks there, an adapter that fails to import is a bug in this
    package: its ImportError propagates instead of becoming "install something"."""
    for module in ("torch", "jax", "flax", "optax"):
        if module not in sys.modules:
            monkeypatch.setitem(sys.modules, module, types.ModuleType(module))
    monkeypatch.setitem(sys.modules, adapter, None)
    with pytest.raises(ImportError, match=adapter):
        load_backend(backend)


@pytest.mark.parametrize("backend", [_backend_param(name) for name in ("torch", "jax")])
def test_framework_backends_train_like_the_numpy_one(backend):
    """Same weights, batches and renorm schedule: float32 rounding apart, the same network.

    The i.i.d. regime is well conditioned, so trajectories stay within rounding of each
    other; with micro-batches of 2 they diverge chaotically on any two backends.
    """
    data = load_dataset(None, seed=0)
    weights = initial_weights([data.num_features, 32, data.num_classes],
                              np.random.default_rng(0))
    spec = NetworkSpec(weights, np.zeros(data.num_classes, dtype=np.float32),
                       METHODS[1].options(20, None), learning_rate=0.05, sgd_momentum=0.9)
    networks = [load_backend(name)(spec) for name in ("numpy", backend)]
    for batch in REGIMES[0].batches(data.y_train, 20, np.random.default_rng(1)):
        for network in networks:
            network.sgd_step(data.x_train[batch], data.y_train[batch])
    numpy_labels, other_labels = (network.predict(data.x_test) for network in networks)
    assert np.mean(numpy_labels == other_labels) >= 0.995  # a dropped gradient: ~0.98
