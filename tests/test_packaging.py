"""What gets installed: the wheel's contents, and a core that imports no framework."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.xdist_group("packaging")
def test_wheel_holds_adapters_and_conformance_inside_the_package(tmp_path) -> None:
    pytest.importorskip("build")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                    "--outdir", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("portable_brn-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert "adapters" not in tops and "conformance" not in tops
    for module in ("portable_brn/__init__.py", "portable_brn/adapters/array.py",
                   "portable_brn/conformance/reference.py", "portable_brn/renorm.py",
                   "portable_brn/conformance/golden.npz", "portable_brn/reproduce/cli.py",
                   "portable_brn/reproduce/backends/numpy.py"):
        assert module in names, module
    assert not any(name.startswith("tests/") for name in names)


def test_core_imports_no_framework() -> None:
    code = ("import sys, portable_brn, portable_brn.adapters, portable_brn.adapters.array; "
            "print(sorted(m for m in ('torch', 'jax', 'cupy', 'flax', 'tensorflow') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.strip()
    assert out == "[]"
