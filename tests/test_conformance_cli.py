"""``portable-brn conformance`` and ``python -m portable_brn.conformance``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from portable_brn import cli as top_cli
from portable_brn.conformance import cli, registry
from portable_brn.conformance.backends import CoreBackend

QUICK = ["--case", "rank2_features_last,micro_batch", "--no-properties"]


def test_matrix_json_and_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "matrix.json"
    status = cli.main(["--backend", "numpy", "--backend", "strict", *QUICK,
                       "--json", str(path)])
    out = capsys.readouterr().out
    assert status == 0
    header = out.splitlines()[0].split()
    assert header == ["backend", "dtype", "cases", "forward", "inference", "gradients",
                      "state", "pairwise", "properties"]
    document = json.loads(path.read_text())
    assert document["failed"] is False
    rows = {(r["backend"], r["dtype"]): r for r in document["rows"]}
    assert set(rows) == {("numpy", "float64"), ("numpy", "float32"), ("numpy", "float16"),
                         ("strict", "float64"), ("strict", "float32")}
    cell = rows["numpy", "float64"]["cells"]["gradients"]
    assert cell["status"] == "pass" and cell["error"] < 1e-12
    assert rows["numpy", "float64"]["cells"]["pairwise"]["where"].startswith("vs strict")


def test_properties_column(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["--backend", "numpy", "--case", "rank2_features_last"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("numpy") and "float64" in line)
    assert row.split()[-2] == "ok"


def test_third_party_module(capsys: pytest.CaptureFixture) -> None:
    """Any importable module exposing an Array API namespace is a backend."""
    assert cli.main(["--backend", "array_api_compat.numpy", *QUICK]) == 0
    assert "array_api_compat.numpy" in capsys.readouterr().out


def test_array_api_strict_by_module_name_takes_the_plug_in_path(tmp_path: Path) -> None:
    """The README's plug-in example: no built-in backend is called ``array_api_strict``,
    so the name is imported as a module and the core runs on its namespace."""
    pytest.importorskip("array_api_strict")
    assert "array_api_strict" not in {b.name for b in registry.all_backends()}
    [backend] = registry.resolve(["array_api_strict"])
    assert type(backend) is CoreBackend
    assert backend.about == "the core on the namespace of module array_api_strict"
    path = tmp_path / "matrix.json"
    assert cli.main(["--backend", "array_api_strict", "--case",
                     "rank2_features_last,micro_batch", "--json", str(path)]) == 0
    rows = {r["dtype"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"float64", "float32"}
    assert {r["backend"] for r in rows.values()} == {"array_api_strict"}
    assert rows["float64"]["cases_run"] == 2
    cells = rows["float64"]["cells"]
    assert set(cells) == {"forward", "inference", "gradients", "state", "pairwise",
                          "properties"}
    assert all(cells[c]["status"] == "pass" for c in cells if c != "pairwise")
    assert cells["gradients"]["error"] < 1e-12


def test_a_failing_backend_fails_the_command(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    class Biased(CoreBackend):
        def to_host(self, arrays):
            host = super().to_host(arrays)
            if "dx" in host:
                host["dx"] = host["dx"] * 1.001
            return host

    numpy = registry.resolve(["numpy"])[0]
    biased = Biased("biased", "numpy with a wrong dx", ("float64",), numpy._loader)
    monkeypatch.setattr(cli, "resolve", lambda names: [biased])
    assert cli.main(QUICK) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "biased float64 gradients: rank2_features_last op 0 dx" in out


def test_a_requested_backend_that_cannot_run_fails(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["--backend", "no_such_module_anywhere", *QUICK]) == 1
    assert "skipped: cannot import 'no_such_module_anywhere'" in capsys.readouterr().out


def test_unknown_case_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["--backend", "numpy", "--case", "nope"]) == 2
    assert "unknown case(s): nope" in capsys.readouterr().err


def test_portable_brn_command_dispatches(capsys: pytest.CaptureFixture) -> None:
    assert top_cli.main(["conformance", "--list", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "backend numpy" in out and "case    long_run" in out


def test_python_dash_m() -> None:
    done = subprocess.run([sys.executable, "-m", "portable_brn.conformance", "--backend",
                           "numpy", *QUICK], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("backend")
