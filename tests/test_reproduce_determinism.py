"""The NumPy demo repeats itself bit for bit on one machine, in fresh processes.

``portable-brn reproduce`` with micro-batches of 2 is chaotic: one differing last bit
grows into a visibly different accuracy curve, so its figures mean something only if a
machine prints them again.  The runs here differ in what could change the bits: Numba
compiling the kernel (an empty cache) or loading it (a warm one), and the number of
BLAS threads.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("sklearn", reason="the demo's data set is scikit-learn's digits")

# 100 steps of the micro-batch regime with Batch Renormalization (10 of warm-up, then
# the clips open): a digest of every parameter and moving statistic at the end.
_PROGRAM = """
import hashlib
import numpy as np
from portable_brn.kernels import kernel_for
from portable_brn.reproduce.backends import NetworkSpec, load_backend
from portable_brn.reproduce.data import load_dataset
from portable_brn.reproduce.experiment import initial_weights
from portable_brn.reproduce.methods import METHODS
from portable_brn.reproduce.regimes import REGIMES

steps, micro = 100, REGIMES[1]
data = load_dataset(None, seed=0)
weights = initial_weights([data.num_features, 128, 64, data.num_classes],
                          np.random.default_rng(0))
spec = NetworkSpec(weights, np.zeros(data.num_classes, dtype=np.float32),
                   METHODS[1].options(steps, micro.micro_batch), 0.05, 0.9)
network = load_backend("numpy")(spec)
for batch in micro.batches(data.y_train, steps, np.random.default_rng(1)):
    network.sgd_step(data.x_train[batch], data.y_train[batch])
digest = hashlib.sha256()
for norm in network.norms:
    for array in (norm.weight, norm.bias, norm.state.mean, norm.state.std):
        digest.update(np.ascontiguousarray(array).tobytes())
for array in (*network.weights, network.output_bias):
    digest.update(np.ascontiguousarray(array).tobytes())
print(type(kernel_for(np)).__name__, digest.hexdigest())
"""


def _run(cache: str, **env: str) -> str:
    """The kernel's name and the digest, from a fresh interpreter."""
    environment = {**os.environ, "NUMBA_CACHE_DIR": cache, **env}
    done = subprocess.run([sys.executable, "-c", _PROGRAM], env=environment,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_numpy_demo_gives_the_same_bits_in_every_fresh_process(tmp_path):
    cache = str(tmp_path / "numba-cache")
    compiled = _run(cache)  # an empty cache: Numba compiles the kernel
    assert os.listdir(cache) or not compiled.startswith("Numba"), "nothing was cached"
    loaded = _run(cache)  # a warm cache: Numba loads it
    one_thread = _run(cache, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    assert compiled == loaded == one_thread
