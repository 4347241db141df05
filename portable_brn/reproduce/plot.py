"""The figure: held-out accuracy against training step, one panel per regime.

Drawn with matplotlib's object API on the Agg canvas, so no window, no ``pyplot``
state and no global backend switch.
"""

from __future__ import annotations

from pathlib import Path

from .experiment import Run
from .methods import METHODS
from .regimes import REGIMES

__all__ = ["plot_accuracy"]


def plot_accuracy(runs: list[Run], path: Path, title: str) -> None:
    """Save a PNG at ``path``: one panel per regime, one curve per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(REGIMES), 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(REGIMES), sharey=True, squeeze=False)[0]
    for ax, regime in zip(axes, REGIMES, strict=True):
        for method in METHODS:
            run = next(r for r in runs if r.regime == regime and r.method == method)
            ax.plot(run.steps, run.accuracy,
                    label=f"{method.title} ({run.final_accuracy:.1%})")
        ax.set_title(regime.title, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    axes[0].set_ylabel("held-out accuracy (inference mode)")
    figure.suptitle(title)
    figure.savefig(path, dpi=100)
