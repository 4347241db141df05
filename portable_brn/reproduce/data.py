"""The data set: scikit-learn's bundled digits, or any ``.npz`` with ``x`` and ``y``.

Every example is flattened to a vector, labels are renumbered ``0 .. classes - 1``, the
split into training and held-out examples is a permutation fixed by the seed, and the
inputs are standardized with the training split's per-feature mean and std (features
that are constant in training, like the digits' blank corner pixels, keep std 1).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ReproduceError, require

__all__ = ["HELD_OUT_FRACTION", "Dataset", "load_arrays", "load_dataset", "split"]

HELD_OUT_FRACTION = 0.3


@dataclass(frozen=True)
class Dataset:
    """Standardized float32 inputs and int64 labels, split once."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    def describe(self) -> str:
        """One line for the report: source, sizes, split."""
        return (f"{self.name}: {len(self.y_train)} training and {len(self.y_test)} held-out "
                f"examples, {self.num_features} features, {self.num_classes} classes")


def _digits() -> tuple[np.ndarray, np.ndarray]:
    datasets = require("sklearn.datasets", extra="demo",
                       needed_by="the default data set (scikit-learn digits)")
    digits = datasets.load_digits()
    return digits.data, digits.target


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile)
    try:
        archive = np.load(path, allow_pickle=False)
    except OSError as error:
        raise ReproduceError(f"--data {path}: cannot read it ({error.strerror or error})") from None
    except unreadable:
        raise ReproduceError(f"--data {path}: not an .npz archive of arrays") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ReproduceError(f"--data {path}: a single array, expected an .npz archive with "
                             "arrays 'x' and 'y'")
    with archive:
        missing = [repr(key) for key in ("x", "y") if key not in archive.files]
        if missing:
            raise ReproduceError(f"--data {path}: no array {' or '.join(missing)} among "
                                 f"{sorted(archive.files)}; expected 'x' (examples) and "
                                 "'y' (labels)")
        try:
            return archive["x"], archive["y"]
        except unreadable as error:
            raise ReproduceError(f"--data {path}: cannot read x and y ({error})") from None


def load_arrays(path: str | Path | None) -> tuple[str, np.ndarray, np.ndarray]:
    """``(name, x, y)`` from ``path``, or the digits when ``path`` is None; checked."""
    if path is None:
        name, (x, y) = "scikit-learn digits", _digits()
    else:
        name, (x, y) = Path(path).name, _npz(Path(path))
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise ReproduceError(f"--data: expected x of shape (n, ...) and y of shape (n,), got "
                             f"x {x.shape} and y {y.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ReproduceError(f"--data: x must hold real numbers, got dtype {x.dtype}")
    x = x.reshape(len(x), -1).astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ReproduceError("--data: x holds NaN or infinite values")
    return name, x, y


def split(name: str, x: np.ndarray, y: np.ndarray, seed: int) -> Dataset:
    """Shuffle by ``seed``, hold out ``HELD_OUT_FRACTION``, standardize with training stats."""
    classes, labels = np.unique(y, return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(y))
    held_out = max(1, round(HELD_OUT_FRACTION * len(y)))
    test, train = order[:held_out], order[held_out:]
    trained_on = len(np.unique(labels[train]))
    if trained_on < 2:
        raise ReproduceError(f"--data: the training split needs examples of at least 2 "
                             f"labels, got {trained_on} ({len(y)} examples in all)")
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std = np.where(std > 0, std, 1.0)

    def standardized(rows: np.ndarray) -> np.ndarray:
        return ((x[rows] - mean) / std).astype(np.float32)

    return Dataset(name, standardized(train), labels[train].astype(np.int64),
                   standardized(test), labels[test].astype(np.int64), len(classes))


def load_dataset(path: str | Path | None, seed: int) -> Dataset:
    """The data set the experiment trains on: loaded, checked, split and standardized."""
    return split(*load_arrays(path), seed)
