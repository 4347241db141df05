"""User-facing errors of ``portable-brn reproduce``: bad input the user can fix.

The command line prints a ``ReproduceError`` as a single line on stderr and exits with
code 2, so every message names what was wrong and, where there is one, the fix.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["ReproduceError", "require"]


class ReproduceError(Exception):
    """A problem with the user's options, data or installed packages (never a bug)."""


def require(module: str, *, needed_by: str, extra: str) -> ModuleType:
    """Import ``module``, or raise a ``ReproduceError`` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ReproduceError(f"{needed_by} needs {module}, which is not installed: "
                             f"pip install 'portable-brn[{extra}]'") from None
