"""The README's Python examples run as written.

The blocks are grouped by the framework they import (none: NumPy; torch; JAX and
Flax); a group whose framework is missing is skipped with the reason.  Blocks of one
group run in order in one namespace, as a reader pasting them would.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# Top-level modules a block may need beyond NumPy and portable_brn, by group.
FRAMEWORKS = {"torch": ("torch",), "jax": ("jax", "flax", "optax")}
# The adapters import their framework: a block importing one needs it.
ADAPTER_NEEDS = {"torch": "torch", "flax": "flax", "nnx": "flax", "jax": "jax"}


def _imports(block: str) -> set[str]:
    """The top-level modules ``block`` imports, an adapter standing for its framework."""
    names = set()
    for module in re.findall(r"^\s*(?:import|from)\s+([\w.]+)", block, flags=re.M):
        parts = module.split(".")
        if parts[:2] == ["portable_brn", "adapters"] and len(parts) > 2:
            names.add(ADAPTER_NEEDS.get(parts[2], parts[0]))
        else:
            names.add(parts[0])
    return names


def _group(block: str) -> str:
    """``torch``, ``jax`` or ``numpy``: the framework a block is written for."""
    needed = _imports(block)
    return next((group for group, modules in FRAMEWORKS.items()
                 if needed.intersection(modules)), "numpy")


def _run(group: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
         capsys: pytest.CaptureFixture) -> str:
    """Run the README blocks of ``group`` (skipping when a module they import is
    missing) and return what they printed."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
              if _group(b) == group]
    assert blocks, f"the README has no {group} example"
    for module in sorted(set().union(*map(_imports, blocks))):
        pytest.importorskip(module, reason=f"the README's {group} example needs {module}, "
                                           f"which cannot be imported")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    return capsys.readouterr().out


def _numpy_trains(printed: str, tmp_path: Path) -> None:
    error = float(re.search(r"^mean squared error (\S+)", printed, re.M).group(1))
    assert error < 0.05, "the NumPy quick start should train to a small error"
    assert (tmp_path / "norm.npz").exists()


def _torch_trains(printed: str, tmp_path: Path) -> None:
    error = float(re.search(r"^torch mean squared error (\S+),", printed, re.M).group(1))
    assert error < 1.0


def _jax_trains(printed: str, tmp_path: Path) -> None:
    error, steps = re.search(r"^jax mean squared error (\S+), step (\d+)", printed,
                             re.M).groups()
    assert float(error) < 1.0 and int(steps) == 200


CHECKS: dict[str, Callable[[str, Path], None]] = {
    "numpy": _numpy_trains, "torch": _torch_trains, "jax": _jax_trains}


@pytest.mark.parametrize("group", list(CHECKS))
def test_readme_python_examples_run(group: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    CHECKS[group](_run(group, tmp_path, monkeypatch, capsys), tmp_path)


def test_blocks_are_grouped_by_the_framework_they_import() -> None:
    assert _group("import numpy as np\nimport portable_brn as pb") == "numpy"
    assert _group("from portable_brn.adapters.torch import BatchRenorm1d") == "torch"
    assert _group("import optax\nfrom portable_brn.adapters.flax import BatchRenorm") == "jax"
    assert _imports("from portable_brn.adapters.nnx import BatchRenorm") == {"flax"}


def test_a_missing_framework_skips_its_blocks_with_the_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # what an import of a missing module does
    monkeypatch.delenv("CI", raising=False)  # under CI a missing framework fails instead
    with pytest.raises(pytest.skip.Exception,
                       match=r"^the README's torch example needs torch, which cannot be"):
        _run("torch", tmp_path, monkeypatch, capsys)
