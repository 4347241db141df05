"""Which axes of an input keep one statistic per feature and which are reduced.

All shape logic lives here, resolved once per call from static shapes, so it costs
nothing under ``jit`` and every error about axes or sizes is raised before any
arithmetic happens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

__all__ = ["Layout", "make_layout"]


@dataclass(frozen=True)
class Layout:
    """The axes of one input.  With ``micro_batch`` the input is viewed as
    ``(groups, micro_batch, *shape[1:])`` and every coordinate below refers to that view."""

    shape: tuple[int, ...]
    feature_axes: tuple[int, ...]
    micro_batch: int | None = None

    @cached_property
    def grouped(self) -> bool:
        """Whether the batch axis is split into micro-batches."""
        return self.micro_batch is not None

    @cached_property
    def view_shape(self) -> tuple[int, ...]:
        """The shape statistics are computed over."""
        if not self.grouped:
            return self.shape
        return (self.shape[0] // self.micro_batch, self.micro_batch, *self.shape[1:])

    @cached_property
    def view_feature_axes(self) -> tuple[int, ...]:
        """The feature axes in the view's coordinates."""
        return tuple(a + 1 for a in self.feature_axes) if self.grouped else self.feature_axes

    @cached_property
    def reduce_axes(self) -> tuple[int, ...]:
        """Axes of the view that are averaged over: all but the group and feature axes."""
        start = 1 if self.grouped else 0
        keep = set(self.view_feature_axes)
        return tuple(a for a in range(start, len(self.view_shape)) if a not in keep)

    @cached_property
    def batch_stat_shape(self) -> tuple[int, ...]:
        """Shape of a batch statistic, one per feature and per micro-batch group, that
        broadcasts against the view."""
        keep = set(self.view_feature_axes) | ({0} if self.grouped else set())
        return tuple(n if a in keep else 1 for a, n in enumerate(self.view_shape))

    @cached_property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of the moving statistics and of ``weight``/``bias``."""
        return tuple(self.shape[a] for a in self.feature_axes)

    @cached_property
    def moving_stat_shape(self) -> tuple[int, ...]:
        """Shape of a moving statistic (one per feature, shared by the groups) that
        broadcasts against the view."""
        keep = set(self.view_feature_axes)
        return tuple(n if a in keep else 1 for a, n in enumerate(self.view_shape))

    @cached_property
    def count(self) -> int:
        """Number of elements reduced per statistic (the paper's m)."""
        return math.prod(self.view_shape[a] for a in self.reduce_axes)


def _normalize_axes(ndim: int, feature_axis: int | tuple[int, ...]) -> tuple[int, ...]:
    """``feature_axis`` as sorted non-negative axes, checked against ``ndim``."""
    axes = feature_axis if isinstance(feature_axis, tuple) else (feature_axis,)
    normalized = []
    for axis in axes:
        if not -ndim <= axis < ndim:
            raise ValueError(f"feature_axis {feature_axis!r} is out of range for an input "
                             f"with {ndim} dimensions")
        normalized.append(axis % ndim)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"feature_axis {feature_axis!r} names the same axis twice for an "
                         f"input with {ndim} dimensions")
    return tuple(sorted(normalized))


def make_layout(shape: tuple[int, ...], feature_axis: int | tuple[int, ...],
                micro_batch: int | None = None, *, training: bool = True) -> Layout:
    """Resolve and check the axes of an input of ``shape`` (cached: shapes repeat).

    Training needs a batch axis (at least 2 dimensions) and more than one value per
    feature; ``micro_batch`` needs axis 0 to be the batch axis and to divide its size.
    """
    return _make_layout(tuple(int(n) for n in shape), feature_axis, micro_batch, training)


@lru_cache(maxsize=256)
def _make_layout(shape: tuple[int, ...], feature_axis: int | tuple[int, ...],
                 micro_batch: int | None, training: bool) -> Layout:
    """``make_layout`` on a hashable shape (the cached part)."""
    if training and len(shape) < 2:
        raise ValueError(f"x must have at least 2 dimensions (a batch axis and a feature "
                         f"axis) in training, got shape {shape}")
    if len(shape) < 1:
        raise ValueError(f"x must have at least 1 dimension, got shape {shape}")
    feature_axes = _normalize_axes(len(shape), feature_axis)
    if training and micro_batch is not None:
        if 0 in feature_axes:
            raise ValueError(f"micro_batch splits axis 0, the batch axis, but feature_axis "
                             f"{feature_axis!r} makes axis 0 a feature axis")
        if shape[0] % micro_batch:
            raise ValueError(f"micro_batch={micro_batch} does not divide the batch size "
                             f"{shape[0]} of x with shape {shape}")
    layout = Layout(shape, feature_axes, micro_batch if training else None)
    if training and layout.count < 2:
        raise ValueError(f"Expected more than 1 value per feature when training, got x of "
                         f"shape {shape} with feature_axis={feature_axis!r}"
                         + (f" and micro_batch={micro_batch}" if micro_batch else ""))
    return layout
