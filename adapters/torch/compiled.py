"""The per-feature algebra of the CPU training step as one compiled call (``features.c``).

A small step (a critic's ``(256, 256)`` layer) spends more time dispatching some twenty
per-feature tensor operations than in its batch-wide kernels; ``features.c`` does them
in one loop.  It is compiled on first use with the system's C compiler (well under a
second) into ``$XDG_CACHE_HOME/portable_brn`` and loaded with ``ctypes``.  Without a
compiler, or with ``PORTABLE_BRN_NO_COMPILE=1``, :func:`library` is None and the layers
do the same algebra in tensor operations (``functional._tensor_features``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sysconfig
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

__all__ = ["backward_features", "forward_features", "library", "takes"]

_SOURCE = Path(__file__).with_name("features.c")
_POINTER, _LONG, _DOUBLE = ctypes.c_void_p, ctypes.c_long, ctypes.c_double
_SUFFIX = {torch.float32: "float", torch.float64: "double"}
FORWARD_ROWS = 7  # inv_std, r, d, scale, shift, k, offset
BACKWARD_ROWS = 3  # x_scale, dx_shift, dweight


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "portable_brn"


def compiler() -> list[str] | None:
    """The command of the C compiler Python was built with, else ``cc``; None if neither
    is on the PATH."""
    for command in (sysconfig.get_config_var("CC") or "", "cc"):
        if command.split() and shutil.which(command.split()[0]):
            return command.split()
    return None


def _compile(source: Path, target: Path) -> None:
    """Compile ``source`` into the shared library ``target``, atomically (processes that
    race each write their own file and rename it into place)."""
    command = compiler()
    if command is None:
        raise OSError("no C compiler on the PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        subprocess.run([*command, "-O2", "-shared", "-fPIC", "-o", scratch, str(source),
                        "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled ``features.c`` (built once per machine and source), or None where it
    cannot be built or ``PORTABLE_BRN_NO_COMPILE`` is set."""
    if os.environ.get("PORTABLE_BRN_NO_COMPILE"):
        return None
    digest = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:16]
    try:  # RuntimeError: no home directory to cache in
        target = _cache_dir() / f"features-{digest}{sysconfig.get_config_var('EXT_SUFFIX')}"
        if not target.exists():
            _compile(_SOURCE, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(f"portable_brn could not compile its per-feature CPU kernel ({error}); "
                      f"the torch layers use tensor operations instead (slower on small "
                      f"batches)", RuntimeWarning, stacklevel=2)
        return None
    for suffix in _SUFFIX.values():
        forward, backward = getattr(lib, f"forward_{suffix}"), getattr(lib, f"backward_{suffix}")
        forward.argtypes = [_LONG, *[_POINTER] * 10, *[_DOUBLE] * 6]
        forward.restype = ctypes.c_int
        backward.argtypes = [_LONG, *[_POINTER] * 7, _DOUBLE, _POINTER]
        backward.restype = None
    return lib


def takes(x: torch.Tensor, step: torch.Tensor, finite_out: torch.Tensor | None,
          *arrays: torch.Tensor | None) -> bool:
    """Whether the compiled call takes a step on ``x``: the parameters and state
    ``arrays`` (which ``functional._kernels_take`` has checked are of the statistics'
    dtype and, with x, on one device) contiguous CPU float32 or float64 tensors (None for
    an absent weight), an int64 CPU ``step`` and boolean CPU flags ``finite_out``."""
    return (x.is_cpu and arrays[0].dtype in _SUFFIX and step.dtype == torch.int64
            and step.is_cpu and (finite_out is None or (
                finite_out.dtype == torch.bool and finite_out.is_cpu
                and finite_out.is_contiguous()))
            and all(a is None or a.is_contiguous() for a in arrays))


def _address(array: torch.Tensor | None) -> int | None:
    return None if array is None else array.data_ptr()


def forward_features(lib: ctypes.CDLL, mean: torch.Tensor, var: torch.Tensor,
                     origin: torch.Tensor | None, state: Any, weight: torch.Tensor | None,
                     bias: torch.Tensor | None, finite_out: torch.Tensor | None,
                     limits: tuple[float, float, float], eps: float, momentum: float,
                     shift_above: float) -> torch.Tensor | None:
    """The forward rows (``FORWARD_ROWS``, ``(7, C)``), with the state moved in place; or
    None, with nothing moved, when some feature's |mean| exceeds ``shift_above`` stds
    and no ``origin`` was given (x must be shifted first)."""
    out = torch.empty((FORWARD_ROWS, mean.shape[0]), dtype=mean.dtype)
    call = getattr(lib, "forward_" + _SUFFIX[mean.dtype])
    if call(mean.shape[0], mean.data_ptr(), var.data_ptr(), _address(origin),
            state.mean.data_ptr(), state.std.data_ptr(), _address(weight), _address(bias),
            out.data_ptr(), _address(finite_out), state.step.data_ptr(), eps, *limits,
            momentum, shift_above):
        return None
    for written in (state.mean, state.std, state.step):  # as an in-place op would
        torch.autograd.graph.increment_version(written)
    return out


def backward_features(lib: ctypes.CDLL, sum_g_xhat: torch.Tensor, sum_g: torch.Tensor,
                      inv_std: torch.Tensor, k: torch.Tensor, mean: torch.Tensor,
                      r: torch.Tensor, d: torch.Tensor, count: int) -> torch.Tensor:
    """The backward rows (``BACKWARD_ROWS``, ``(3, C)``): x_scale, dx_shift, dweight."""
    out = torch.empty((BACKWARD_ROWS, mean.shape[0]), dtype=mean.dtype)
    getattr(lib, "backward_" + _SUFFIX[mean.dtype])(
        mean.shape[0], sum_g_xhat.data_ptr(), sum_g.data_ptr(), inv_std.data_ptr(),
        k.data_ptr(), mean.data_ptr(), r.data_ptr(), d.data_ptr(), float(count),
        out.data_ptr())
    return out
