"""The core's configuration as each framework's keyword arguments, and back.

Written once here for the adapters, the conformance suite, ``reproduce`` and the tests
(this module imports no framework):

- torch (``torch.nn.BatchNorm*``): ``eps``, and ``momentum`` the weight of the new
  value, which is the paper's alpha and the core's own meaning; features on dim 1.
- Flax (``flax.linen.BatchNorm``, ``flax.nnx.BatchNorm``): ``axis`` the feature axis,
  ``epsilon``, and ``momentum`` the decay of the old value, ``1 - alpha``.

Both take the renormalization options (``r_max``, ``d_max``, ...) under the core's names.
"""

from __future__ import annotations

import numbers
from typing import Any

from .config import RenormConfig
from .schedules import CumulativeAverage

__all__ = ["RENORM_OPTIONS", "config_from_flax", "flax_named", "flax_options",
           "rate_from_flax_decay", "torch_options"]

_FLAX_NAMES = {"eps": "epsilon", "feature_axis": "axis"}  # the core's name: Flax's

RENORM_OPTIONS = ("r_max", "d_max", "r_min", "warmup_steps", "micro_batch", "output_clip")


def _renorm_options(config: RenormConfig) -> dict[str, Any]:
    """The options every framework names as the core does."""
    return {name: getattr(config, name) for name in RENORM_OPTIONS}


def torch_options(config: RenormConfig) -> dict[str, Any]:
    """The keywords of a torch ``BatchRenorm*d`` with ``config`` (its feature axis aside:
    torch's is dim 1); the cumulative average is torch's ``momentum=None``."""
    momentum = None if isinstance(config.momentum, CumulativeAverage) else config.momentum
    return {"eps": config.eps, "momentum": momentum, **_renorm_options(config)}


def flax_options(config: RenormConfig) -> dict[str, Any]:
    """The keywords of a Flax ``BatchRenorm`` (linen or nnx) with ``config``."""
    return {"axis": config.feature_axis, "momentum": 1.0 - config.momentum,
            "epsilon": config.eps, **_renorm_options(config)}


def rate_from_flax_decay(momentum: float) -> float:
    """The core's momentum (the weight of the new value) from Flax's (the decay of the old
    one, in [0, 1)), after checking it."""
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a real number, got {momentum!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum is the decay of the old statistics (Flax convention) and "
                         f"must be in [0, 1), got {momentum!r}")
    return 1.0 - momentum


def flax_named(error: Exception) -> Exception:
    """``error`` from ``RenormConfig`` with the option named as Flax names it (``eps`` is
    ``epsilon``, ``feature_axis`` is ``axis``): a message that names the argument the
    caller passed."""
    head, space, rest = str(error).partition(" ")
    if head not in _FLAX_NAMES:
        return error
    renamed = type(error)(f"{_FLAX_NAMES[head]}{space}{rest}")
    renamed.__cause__ = error
    return renamed


def config_from_flax(*, axis: Any, momentum: float, epsilon: float,
                     **renorm_options: Any) -> RenormConfig:
    """The core's configuration from Flax's keywords; ``momentum`` is Flax's decay.
    Errors name Flax's arguments."""
    rate = rate_from_flax_decay(momentum)
    try:
        return RenormConfig(feature_axis=axis, eps=epsilon, momentum=rate, **renorm_options)
    except (TypeError, ValueError) as error:
        raise flax_named(error) from error
