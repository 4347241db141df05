"""``portable-brn reproduce``: the paper's comparison on any backend, in minutes.

Trains the same network with batch norm and with Batch Renormalization in three
regimes (see ``regimes``), prints a table of held-out accuracy and writes, in ``--out``:
``table.txt`` (the table), ``accuracy.png`` (accuracy against step, one panel per
regime) and ``results.json`` (every figure and setting).  Bad input (unknown backend,
missing framework, unreadable ``--data``, invalid option) gives one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from .backends import BACKENDS, load_backend
from .data import Dataset, load_dataset
from .errors import ReproduceError, require
from .experiment import FINAL_FRACTION, Run, Settings, run_experiment
from .methods import METHODS
from .plot import plot_accuracy
from .regimes import REGIMES
from .report import format_table, results, write_json

__all__ = ["main"]

_DEFAULTS = Settings()


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors become a one-line ``ReproduceError``."""

    def error(self, message: str) -> NoReturn:
        raise ReproduceError(message)


def _integer(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an int of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


def _parser() -> _Parser:
    parser = _Parser(prog="portable-brn reproduce",
                     description="Train batch norm and Batch Renormalization under three "
                                 "regimes (i.i.d., micro-batches of 2, 2 labels per batch) "
                                 "and compare held-out accuracy in inference mode.")
    parser.add_argument("--backend", default="numpy", metavar="NAME",
                        help=f"one of {', '.join(BACKENDS)} (default: numpy)")
    parser.add_argument("--steps", type=_integer(1), default=_DEFAULTS.steps,
                        help=f"training steps per run (default: {_DEFAULTS.steps})")
    parser.add_argument("--seed", type=_integer(0), default=_DEFAULTS.seed,
                        help=f"seed of split, initial weights and batches "
                             f"(default: {_DEFAULTS.seed})")
    parser.add_argument("--eval-every", type=_integer(1), default=_DEFAULTS.eval_every,
                        metavar="N", help=f"evaluate on held-out data every N steps "
                                          f"(default: {_DEFAULTS.eval_every})")
    parser.add_argument("--data", metavar="PATH",
                        help="an .npz with arrays x (examples) and y (labels) "
                             "(default: scikit-learn's digits)")
    parser.add_argument("--out", type=Path, default=Path("brn-results"), metavar="DIR",
                        help="where table.txt, accuracy.png and results.json go "
                             "(default: ./brn-results)")
    return parser


def _reproduce(args: argparse.Namespace) -> None:
    """Check everything that can fail on bad input, then train, then report."""
    build = load_backend(args.backend)
    tqdm = require("tqdm", needed_by="the progress bar", extra="demo").tqdm
    require("matplotlib", needed_by="the plot", extra="demo")
    settings = Settings(steps=args.steps, seed=args.seed, eval_every=args.eval_every)
    data = load_dataset(args.data, settings.seed)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ReproduceError(f"--out {args.out}: cannot create it "
                             f"({error.strerror or error})") from None

    total = settings.steps * len(REGIMES) * len(METHODS)
    with tqdm(total=total, file=sys.stderr, unit="step") as progress:
        runs = run_experiment(build, data, settings, progress)
    _report(runs, settings, args.backend, data, args.out)


def _report(runs: list[Run], settings: Settings, backend: str, data: Dataset,
            out: Path) -> None:
    """Print the table; write it, the plot and the JSON into ``out``."""
    heading = (f"backend {backend}, {data.describe()}\nheld-out accuracy in inference "
               f"mode, mean of the evaluations in the last {FINAL_FRACTION:.0%} of the steps")
    table = f"{heading}\n\n{format_table(runs)}\n"
    paths = [out / "table.txt", out / "accuracy.png", out / "results.json"]
    paths[0].write_text(table)
    plot_accuracy(runs, paths[1], f"Batch norm vs Batch Renormalization ({backend}, "
                                  f"{data.name})")
    write_json(paths[2], results(runs, settings, backend, data))
    print(table)
    print("wrote " + ", ".join(str(path) for path in paths))


def main(argv: list[str]) -> int:
    """Run the command with ``argv`` (the options after ``reproduce``); the exit code."""
    try:
        _reproduce(_parser().parse_args(argv))
    except ReproduceError as error:
        print(f"portable-brn reproduce: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help
        return int(done.code or 0)
    return 0
