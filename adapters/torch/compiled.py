"""The torch layers' compiled CPU code (``features.cpp``), built on first use.

A small step (a critic's ``(256, 256)`` layer) spends more time dispatching some twenty
per-feature tensor operations, and in a Python ``autograd.Function``, than in its
batch-wide kernels; on a large step a Python ``autograd.Function`` still costs some 5%.
``features.cpp`` holds the per-feature algebra as one loop, the whole step of one group
as a C++ autograd function, ``output_clip``'s fused passes and float32 and 16-bit NCHW
statistics in one pass.  ``torch.utils.cpp_extension``
compiles it on the first CPU training step (under a minute, once per machine, torch
version and source) into ``$XDG_CACHE_HOME/portable_brn``.  Without a C++ compiler or
ninja, or with ``PORTABLE_BRN_NO_COMPILE=1``, :func:`library` is None and the layers do
the same algebra in tensor operations (``functional._tensor_features``).
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

__all__ = ["library", "takes", "train_step"]

_SOURCE = Path(__file__).with_name("features.cpp")
_FEATURE_DTYPES = (torch.float32, torch.float64)
_FLAGS = ("-O3", "-fopenmp")  # OpenMP: at::parallel_for's threads, as in torch
# The vector extensions of torch's own AVX2 kernels, where torch found them on this CPU.
_VECTOR_FLAGS = ("-mavx2", "-mfma", "-mf16c")
_STALE_LOCK_S = 600  # a build takes under a minute


def _build_dir(digest: str) -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "portable_brn" / f"features-{digest}"


def _flags() -> tuple[str, ...]:
    """The compiler flags: with AVX2, FMA and F16C where torch runs its AVX2 or AVX-512
    kernels (x86 CPUs that have all three)."""
    vector = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return _FLAGS + (_VECTOR_FLAGS if vector else ())


def _build(name: str, directory: Path, flags: tuple[str, ...]) -> ModuleType:
    """Compile (or load the cached build of) ``features.cpp`` as module ``name``;
    concurrent processes wait on torch's lock in ``directory``."""
    from torch.utils import cpp_extension
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / "lock"  # left by a build that was killed: torch would wait forever
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
        lock.unlink(missing_ok=True)
    return cpp_extension.load(name, [str(_SOURCE)], extra_cflags=list(flags),
                              extra_ldflags=["-fopenmp"],
                              build_directory=str(directory), verbose=False)


@lru_cache(maxsize=1)
def library() -> ModuleType | None:
    """The compiled ``features.cpp`` (built once per machine, torch version and source),
    or None where it cannot be built or ``PORTABLE_BRN_NO_COMPILE`` is set."""
    if os.environ.get("PORTABLE_BRN_NO_COMPILE"):
        return None
    flags = _flags()
    key = f"{torch.__version__}\0{flags}\0".encode() + _SOURCE.read_bytes()
    digest = hashlib.sha256(key).hexdigest()[:16]
    try:  # RuntimeError: no home directory, compiler or ninja, or a failed build
        return _build(f"portable_brn_features_{digest}", _build_dir(digest), flags)
    except (OSError, RuntimeError, ImportError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        warnings.warn(f"portable_brn could not compile its CPU kernels ({first_line}); "
                      f"the torch layers use tensor operations instead (slower on small "
                      f"batches)", RuntimeWarning, stacklevel=2)
        return None


def takes(x: torch.Tensor, step: torch.Tensor, finite_out: torch.Tensor | None,
          *arrays: torch.Tensor | None) -> bool:
    """Whether the compiled code takes a step on ``x``: the parameters and state
    ``arrays`` (which ``functional._kernels_take`` has checked are of the statistics'
    dtype and, with x, on one device) contiguous CPU float32 or float64 tensors (None for
    an absent weight), an int64 CPU ``step`` and boolean CPU flags ``finite_out``."""
    return (x.is_cpu and arrays[0].dtype in _FEATURE_DTYPES and step.dtype == torch.int64
            and step.is_cpu and (finite_out is None or (
                finite_out.dtype == torch.bool and finite_out.is_cpu
                and finite_out.is_contiguous()))
            and all(a is None or a.is_contiguous() for a in arrays))


def train_step(lib: ModuleType, x: torch.Tensor, weight: torch.Tensor | None,
               bias: torch.Tensor | None, state: Any, finite_out: torch.Tensor | None,
               limits: tuple[float, float, float], eps: float, momentum: float,
               shift_above: float, clip: tuple[float, float] | None) -> torch.Tensor:
    """The whole training step of one group (``clip``: ``output_clip`` or None), a C++
    autograd node: y, with the state moved in place."""
    return lib.train_step(x, weight, bias, state.mean, state.std, state.step, finite_out,
                          eps, *limits, momentum, shift_above, clip)
