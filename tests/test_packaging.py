"""What gets installed: the wheel's contents, and a core that imports no framework."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# Not part of a source tree: the build must not see (or write) any of these.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                     "__pycache__", ".*_cache", ".hypothesis", "brn-results")


def _wheel_names(tmp_path: Path) -> list[str]:
    """The files of a wheel built from a copy of the checkout (setuptools writes build/
    and *.egg-info next to the sources: into the copy, not the checkout)."""
    source, out = tmp_path / "source", tmp_path / "dist"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                    "--outdir", str(out), str(source)], check=True, capture_output=True)
    return zipfile.ZipFile(next(out.glob("portable_brn-*.whl"))).namelist()


@pytest.mark.xdist_group("packaging")
def test_wheel_holds_adapters_and_conformance_inside_the_package(tmp_path) -> None:
    pytest.importorskip("build")
    names = _wheel_names(tmp_path)
    tops = {name.split("/")[0] for name in names}
    assert "adapters" not in tops and "conformance" not in tops
    adapters = {f"portable_brn/adapters/{f.relative_to(ROOT / 'adapters').as_posix()}"
                for f in (ROOT / "adapters").rglob("*.py")}
    assert {f"portable_brn/adapters/{m}.py" for m in (
        "array", "flax", "jax", "nnx", "torch/__init__", "torch/functional", "torch/modules",
        "torch/convert", "torch/recalibration")} <= adapters
    conformance = {f"portable_brn/conformance/{f.name}"
                   for f in (ROOT / "conformance").glob("golden.*")
                   if f.suffix in (".npz", ".json")}
    assert "portable_brn/conformance/golden.npz" in conformance
    adapters.add("portable_brn/adapters/torch/features.cpp")  # compiled on first use
    for module in sorted(adapters | conformance | {
            "portable_brn/__init__.py", "portable_brn/renorm.py",
            "portable_brn/conformance/reference.py", "portable_brn/reproduce/cli.py",
            "portable_brn/reproduce/backends/numpy.py"}):
        assert module in names, module
    assert not any(name.startswith("tests/") for name in names)


def test_core_imports_no_framework() -> None:
    code = ("import sys, portable_brn, portable_brn.adapters, portable_brn.adapters.array; "
            "print(sorted(m for m in ('torch', 'jax', 'cupy', 'flax', 'tensorflow') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.strip()
    assert out == "[]"
