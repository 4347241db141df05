"""The committed golden vectors are what the reference computes now, and stay small."""

from __future__ import annotations

from portable_brn.conformance import golden


def test_golden_matches_a_regeneration() -> None:
    problems = golden.drift(golden.load(), golden.generate())
    assert not problems, ("golden vectors drifted; if the change is intended, run "
                          "`python -m portable_brn.conformance.golden`:\n" + "\n".join(problems))


def test_golden_files_are_small() -> None:
    size = golden.GOLDEN_NPZ.stat().st_size + golden.GOLDEN_INDEX.stat().st_size
    assert size < 2_000_000, f"golden files take {size} bytes"
