"""Batch Renormalization (Ioffe, NIPS 2017), written once against the Array API standard.

The core is pure functions over arrays of any conforming library (NumPy, CuPy,
PyTorch, JAX, array-api-strict, ...); ``portable_brn.adapters`` wraps it in each
framework's layers and conventions.
"""

from . import schedules
from .config import RenormConfig
from .moments import Moments, merge_moments, moments
from .recalibrate import recalibrate
from .renorm import Residuals, backward, deferred_update, forward_infer, forward_train, update_state
from .state import RenormState, init_state

__all__ = [
    "Moments", "RenormConfig", "RenormState", "Residuals", "backward", "deferred_update",
    "forward_infer", "forward_train", "init_state", "merge_moments", "moments", "recalibrate",
    "schedules", "update_state",
]
__version__ = "0.1.0"
