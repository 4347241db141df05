"""The three ways of forming training batches that the paper compares (section 4).

- ``iid``: batches of 32 drawn at random from the training set (section 4.1).
- ``micro``: the same batches, but every normalization layer computes its statistics
  over micro-batches of 2 examples, 16 per batch (section 4.2 uses 4 in 32; 2 makes
  the effect plain on a small network).  The loss and gradient still cover all 32.
- ``non_iid``: each batch of 32 holds 16 examples of each of 2 random labels.  The
  paper draws 2 examples of each of 16 labels out of 1,000 (section 4.3); with 10
  classes the same bias, few labels per batch, is 2 labels x 16 examples.

Batches are index arrays computed up front from a seeded generator, so batch norm and
Batch Renormalization, and every backend, see exactly the same examples in the same
order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BATCH_SIZE", "REGIMES", "Regime"]

BATCH_SIZE = 32


def _draw(rng: np.random.Generator, pool: np.ndarray, count: int) -> np.ndarray:
    """``count`` distinct members of ``pool`` (with repeats only if the pool is smaller)."""
    return rng.choice(pool, size=count, replace=len(pool) < count)


@dataclass(frozen=True)
class Regime:
    """How training batches are drawn and how finely they are normalized.

    ``micro_batch`` is passed to the normalization layers (None: the whole batch);
    ``labels_per_batch`` restricts each batch to that many labels (None: i.i.d.).
    """

    key: str
    title: str
    micro_batch: int | None = None
    labels_per_batch: int | None = None

    def batches(self, labels: np.ndarray, steps: int, rng: np.random.Generator) -> np.ndarray:
        """Indices into the training set, shape ``(steps, BATCH_SIZE)``."""
        if self.labels_per_batch is None:
            everyone = np.arange(len(labels))
            return np.stack([_draw(rng, everyone, BATCH_SIZE) for _ in range(steps)])
        pools = [np.flatnonzero(labels == label) for label in np.unique(labels)]
        per_label = BATCH_SIZE // self.labels_per_batch
        rows = []
        for _ in range(steps):
            chosen = rng.choice(len(pools), size=self.labels_per_batch, replace=False)
            batch = np.concatenate([_draw(rng, pools[c], per_label) for c in chosen])
            rows.append(rng.permutation(batch))
        return np.stack(rows)


REGIMES = (
    Regime("iid", f"i.i.d. batches of {BATCH_SIZE}"),
    Regime("micro", f"batches of {BATCH_SIZE}, micro-batches of 2", micro_batch=2),
    Regime("non_iid", f"batches of {BATCH_SIZE} from 2 labels", labels_per_batch=2),
)
