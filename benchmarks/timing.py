"""Timing shared by the benchmarks: candidates measured round-robin in one run.

Interleaving the candidates spreads the noise of a shared machine over all of them
alike, so the ratios (not the absolute milliseconds) are what the benchmarks report.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def measure(candidates: Mapping[str, Callable[[], object]], *, repeats: int = 30,
            warmup: int = 3,
            before: Callable[[Callable[[], object]], object] | None = None,
            ) -> dict[str, float]:
    """Median seconds per call of each candidate, timed in interleaved rounds.

    ``before(run)`` runs untimed ahead of every timed call of ``run``, so that each call
    starts from the cache state it sets up rather than from whatever ran last.
    """
    for _ in range(warmup):
        for run in candidates.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            if before is not None:
                before(run)
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def print_table(title: str, header: tuple[str, ...], rows: list[tuple[object, ...]]) -> None:
    """A plain aligned table, the format the README quotes."""
    cells = [header, *[tuple(_cell(v) for v in row) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print("  ".join(value.rjust(width) for value, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def _cell(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)
