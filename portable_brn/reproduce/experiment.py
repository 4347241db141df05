"""The experiment: every regime (``regimes``) times both normalizations (``methods``).

Within a regime both methods start from the same initial weights and see the same
batches in the same order; every backend gets those same weights and batches, so
backends differ only by floating-point rounding.  Held-out accuracy is measured in
inference mode (moving statistics) at step 0, every ``eval_every`` steps and at the end;
a run's final accuracy is the mean over the evaluations in its last 10% of steps (4 of
them by default), because on 539 held-out digits one evaluation moves by a point or
more from one to the next.

Choices, the same for both methods and every regime:

- Network: inputs -> 128 -> norm -> ReLU -> 64 -> norm -> ReLU -> classes, the hidden
  dense layers without bias (the normalization's shift replaces it); He-normal initial
  weights, zero output bias.
- SGD with momentum 0.9 and learning rate 0.05 on the mean cross-entropy, batches of 32.
- 3,000 steps by default: about 76 passes over the digits' 1,258 training examples,
  enough for every curve to flatten while the NumPy backend finishes in well under a
  minute.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol

import numpy as np

from .backends import Builder, NetworkSpec
from .data import Dataset
from .methods import METHODS, Method
from .regimes import REGIMES, Regime

__all__ = ["FINAL_FRACTION", "Progress", "Run", "Settings", "evaluation_steps",
           "initial_weights", "run_experiment"]

FINAL_FRACTION = 0.1


@dataclass(frozen=True)
class Settings:
    """What the command line can change, and the fixed training hyperparameters."""

    steps: int = 3000
    seed: int = 0
    eval_every: int = 100
    hidden: tuple[int, ...] = (128, 64)
    learning_rate: float = 0.05
    sgd_momentum: float = 0.9


@dataclass(frozen=True)
class Run:
    """One training run: held-out accuracy at each evaluated step, and its wall time."""

    regime: Regime
    method: Method
    steps: list[int]
    accuracy: list[float]
    seconds: float

    @property
    def final_accuracy(self) -> float:
        """Mean held-out accuracy of the evaluations in the last ``FINAL_FRACTION`` of the
        steps (the last evaluation at least): a single evaluation is noisy."""
        cutoff = (1.0 - FINAL_FRACTION) * self.steps[-1]
        tail = [a for step, a in zip(self.steps, self.accuracy, strict=True) if step >= cutoff]
        return sum(tail) / len(tail)


class Progress(Protocol):
    """What the loop reports to (a ``tqdm`` bar fits)."""

    def set_description(self, desc: str) -> None: ...

    def update(self, n: int) -> None: ...


def initial_weights(sizes: list[int], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """He-normal float32 weights ``(fan_in, fan_out)`` for consecutive layer ``sizes``."""
    return tuple((rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in))
                 .astype(np.float32) for fan_in, fan_out in pairwise(sizes))


def evaluation_steps(steps: int, eval_every: int) -> list[int]:
    """Step 0, every ``eval_every`` steps, and the last step."""
    return sorted({*range(0, steps, eval_every), steps})


def _train(build: Builder, spec: NetworkSpec, batches: np.ndarray, data: Dataset,
           evaluate_at: list[int], progress: Progress | None) -> tuple[list[float], float]:
    """Held-out accuracy at each step of ``evaluate_at`` and the seconds it all took."""
    start = time.perf_counter()
    network = build(spec)
    accuracy = []
    done = 0
    for step in evaluate_at:
        for batch in batches[done:step]:
            network.sgd_step(data.x_train[batch], data.y_train[batch])
            if progress is not None:
                progress.update(1)
        done = step
        accuracy.append(float(np.mean(network.predict(data.x_test) == data.y_test)))
    return accuracy, time.perf_counter() - start


def run_experiment(build: Builder, data: Dataset, settings: Settings,
                   progress: Progress | None = None) -> list[Run]:
    """Train both methods in every regime; one ``Run`` each, regime by regime."""
    weight_seed, *regime_seeds = np.random.SeedSequence(settings.seed).spawn(1 + len(REGIMES))
    sizes = [data.num_features, *settings.hidden, data.num_classes]
    weights = initial_weights(sizes, np.random.default_rng(weight_seed))
    output_bias = np.zeros(data.num_classes, dtype=np.float32)
    evaluate_at = evaluation_steps(settings.steps, settings.eval_every)
    runs = []
    for regime, seed in zip(REGIMES, regime_seeds, strict=True):
        batches = regime.batches(data.y_train, settings.steps, np.random.default_rng(seed))
        for method in METHODS:
            if progress is not None:
                progress.set_description(f"{regime.key} / {method.title}")
            spec = NetworkSpec(weights, output_bias,
                               method.options(settings.steps, regime.micro_batch),
                               settings.learning_rate, settings.sgd_momentum)
            accuracy, seconds = _train(build, spec, batches, data, evaluate_at, progress)
            runs.append(Run(regime, method, evaluate_at, accuracy, seconds))
    return runs
