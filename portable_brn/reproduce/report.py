"""The results as a text table (printed and saved) and as JSON with every figure."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .data import Dataset
from .experiment import FINAL_FRACTION, Run, Settings
from .methods import METHODS
from .regimes import REGIMES

__all__ = ["format_table", "results", "table_rows", "write_json"]

_COLUMNS = ("regime", *(method.title for method in METHODS), "steps", "seconds")


def table_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per regime: final held-out accuracy of each method, steps, total seconds."""
    rows = []
    for regime in REGIMES:
        mine = [run for run in runs if run.regime == regime]
        row: dict[str, Any] = {"regime": regime.title}
        row.update({run.method.title: run.final_accuracy for run in mine})
        row.update(steps=mine[0].steps[-1], seconds=round(sum(r.seconds for r in mine), 2))
        rows.append(row)
    return rows


def _aligned(cells: list[str], widths: list[int]) -> str:
    """The first cell left-aligned, the others right-aligned, two spaces apart."""
    first, *numbers = cells
    return "  ".join([first.ljust(widths[0]),
                      *(cell.rjust(width) for cell, width in zip(numbers, widths[1:],
                                                                 strict=True))])


def format_table(runs: list[Run]) -> str:
    """The rows as aligned plain text, accuracies in percent."""
    lines = [list(_COLUMNS)]
    for row in table_rows(runs):
        lines.append([row["regime"], *(f"{row[m.title]:.1%}" for m in METHODS),
                      str(row["steps"]), f"{row['seconds']:.1f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(_COLUMNS))]
    return "\n".join(_aligned(line, widths) for line in lines)


def _jsonable(value: Any) -> Any:
    """Schedules (dataclasses) as dicts of their fields; everything else unchanged."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def results(runs: list[Run], settings: Settings, backend: str, data: Dataset) -> dict[str, Any]:
    """Everything measured and everything that shaped it, ready for ``json.dump``."""
    return {
        "backend": backend,
        "data": data.describe(),
        "settings": dataclasses.asdict(settings),
        "final_accuracy": f"mean held-out accuracy of the evaluations in the last "
                          f"{FINAL_FRACTION:.0%} of the steps, in inference mode",
        "normalization": {
            method.key: {name: _jsonable(value)
                         for name, value in method.options(settings.steps, None).items()
                         if name != "micro_batch"}
            for method in METHODS},
        "regimes": {regime.key: {"title": regime.title, "micro_batch": regime.micro_batch,
                                 "labels_per_batch": regime.labels_per_batch}
                    for regime in REGIMES},
        "table": table_rows(runs),
        "runs": [{"regime": run.regime.key, "method": run.method.key,
                  "final_accuracy": run.final_accuracy, "seconds": round(run.seconds, 3),
                  "steps": run.steps, "accuracy": run.accuracy} for run in runs],
    }


def write_json(path: Path, content: dict[str, Any]) -> None:
    """``content`` as indented JSON at ``path``."""
    path.write_text(json.dumps(content, indent=2) + "\n")
