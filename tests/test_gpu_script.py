"""``benchmarks/gpu.sh --dry-run``: the GPU script's steps on the CPU, tiny sizes, so CI
knows the script works before a GPU machine runs it."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_dry_run_writes_both_reports_and_every_step_passes(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path),
                           "--python", sys.executable],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dry_run"] is True and report["device"] == "cpu"
    assert [s["step"] for s in report["steps"]] == ["conformance", "torch-layers",
                                                     "bench-torch", "bench-jax"]
    assert all(s["exit"] == 0 for s in report["steps"]), report["steps"]
    assert all(row["ok"] for row in report["torch-layers"]["rows"])
    assert report["bench-torch"]["rows"], "the torch benchmark measured nothing"
    assert "# GPU report (dry run on the CPU)" in (tmp_path / "report.md").read_text()
