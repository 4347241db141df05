"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    numpy_error = float(re.search(r"^mean squared error (\S+)", printed, re.M).group(1))
    assert numpy_error < 0.05, "the NumPy quick start should train to a small error"
    jax_error, steps = re.search(r"^jax mean squared error (\S+), step (\d+)", printed,
                                 re.M).groups()
    assert float(jax_error) < 1.0 and int(steps) == 200
    torch_error = float(re.search(r"^torch mean squared error (\S+),", printed, re.M).group(1))
    assert torch_error < 1.0
    assert (tmp_path / "norm.npz").exists()
