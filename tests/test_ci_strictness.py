"""A missing framework skips locally and fails under CI; a broken adapter always fails.

The blocked imports use the form an uninstalled module takes for the import system
(``sys.modules[name] = None``), in process or, for whole pytest runs, through a
``sitecustomize`` in a fresh interpreter.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from portable_brn.conformance.adapter_backends import FlaxBackend
from portable_brn.conformance.backends import NumpyKernelBackend, torch_backend
from portable_brn.conformance.ci import in_ci, required_here

from conftest import _importorskip_in_ci, skip_unless_loaded

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize(("value", "expected"), [
    ("", False), ("0", False), ("false", False), ("true", True), ("1", True), ("yes", True)])
def test_ci_is_read_from_the_environment(monkeypatch, value, expected) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci() is expected
    assert required_here("torch.nn") is expected and required_here("array_api_strict") is expected
    assert not required_here("build") and not required_here(None)


@pytest.mark.parametrize(("make", "module"), [
    (torch_backend, "torch"), (lambda: NumpyKernelBackend("numba"), "numba")])
def test_a_backend_without_its_framework_skips_locally_and_fails_in_ci(
        monkeypatch, make, module) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delitem(sys.modules, "array_api_compat.torch", raising=False)
    backend = make()
    assert backend.unavailable.missing == module
    assert backend.skip_reason == f"{module} is not installed"
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match=f"{module} is not installed"):
        skip_unless_loaded(backend)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"CI must have {module}"):
        skip_unless_loaded(backend)


def test_an_adapter_backend_without_flax_skips_but_a_broken_adapter_raises(
        monkeypatch) -> None:
    flax = pytest.importorskip("flax")
    monkeypatch.delitem(sys.modules, "portable_brn.adapters.flax", raising=False)
    monkeypatch.setitem(sys.modules, "flax", None)
    assert FlaxBackend().unavailable.missing == "flax"
    monkeypatch.setitem(sys.modules, "flax", flax)
    monkeypatch.setitem(sys.modules, "portable_brn.adapters.flax", None)  # the project's own
    with pytest.raises(ImportError, match=r"portable_brn\.adapters\.flax"):
        FlaxBackend().skip_reason  # noqa: B018


def test_importorskip_fails_in_ci_only_for_the_frameworks_ci_must_have(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(ImportError):
        _importorskip_in_ci("torch")
    with pytest.raises(pytest.skip.Exception):
        _importorskip_in_ci("no_such_module_anywhere")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        _importorskip_in_ci("torch")


def _pytest_without(tmp_path: Path, module: str, ci: str,
                    *args: str) -> subprocess.CompletedProcess:
    """A fresh pytest run in which ``module`` cannot be imported."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    env = {**os.environ, "CI": ci,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "-p", "no:randomly", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_test_module_needing_a_missing_framework_skips_locally_and_fails_in_ci(
        tmp_path) -> None:
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_needs_torch.py").write_text(
        "import pytest\n\n"
        "def test_uses_torch():\n    assert pytest.importorskip('torch') is not None\n")
    local = _pytest_without(tmp_path, "torch", "", "test_needs_torch.py")
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout + local.stderr
    ci = _pytest_without(tmp_path, "torch", "true", "test_needs_torch.py")
    assert ci.returncode == 1 and "1 failed" in ci.stdout, ci.stdout + ci.stderr
    assert "import of torch halted" in ci.stdout


def test_the_conformance_suite_fails_in_ci_without_torch(tmp_path) -> None:
    args = ("--pyargs", "portable_brn.conformance.test_suite", "-k",
            "test_backend_available and torch")
    local = _pytest_without(tmp_path, "torch", "", *args)
    assert local.returncode == 0, local.stdout + local.stderr
    assert "torch: torch is not installed" in local.stdout
    ci = _pytest_without(tmp_path, "torch", "true", *args)
    assert ci.returncode == 1, ci.stdout + ci.stderr
    assert "CI must have torch" in ci.stdout
