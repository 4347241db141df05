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

__all__ = ["RENORM_OPTIONS", "config_from_flax", "flax_options", "torch_options"]

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


def config_from_flax(*, axis: Any, momentum: float, epsilon: float,
                     **renorm_options: Any) -> RenormConfig:
    """The core's configuration from Flax's keywords; ``momentum`` is Flax's decay, in
    [0, 1)."""
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a real number, got {momentum!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum is the decay of the old statistics (Flax convention) and "
                         f"must be in [0, 1), got {momentum!r}")
    return RenormConfig(feature_axis=axis, eps=epsilon, momentum=1.0 - momentum,
                        **renorm_options)
