"""The written contract: ``docs/specification.md`` has the sections the code cites.

Code, tests and the README cite the specification as "specification section N" (also
"sections 2 and 5", "sections 2-5", "sections 2 to 4", "section 4.2").  Every cited
section must exist as a ``## N. Title`` (or ``### N.M``) heading.  Citations under the
contract's earlier name, "SPEC section N", are read the same way while they remain.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPECIFICATION = ROOT / "docs" / "specification.md"
SCANNED = ("portable_brn", "adapters", "conformance", "tests", "benchmarks", "docs")
# The names a citation may use ("spec" stands for "SPEC", "SPEC.md" and "spec").  Once
# every citation says "specification", this becomes {"specification"}.
ACCEPTED_NAMES = {"specification"}
# The subject of each section the code cites, by number (words its title must contain).
SUBJECTS = {1: "notation", 2: "training", 3: "inference", 4: "gradient", 5: "option",
            6: "numeric", 7: "bad input"}

_NUMBER = r"\d+(?:\.\d+)?"
_GAP = r"[\s#]+"  # spaces, a line break, a comment's continuation
_CITATION = re.compile(
    rf"\b(?P<name>specification|spec)(?:\.md)?(?:'s)?{_GAP}sections?{_GAP}"
    rf"(?P<numbers>{_NUMBER}(?:(?:\s*,{_GAP}|\s*-\s*|{_GAP}and{_GAP}|{_GAP}to{_GAP})"
    rf"{_NUMBER})*)",
    re.IGNORECASE)
_BARE_NAME = re.compile(r"\bSPEC\b")  # the earlier name, cited or not


def _scanned_files() -> list[Path]:
    """Every .py and .md file of the scanned folders, and the README (not this file)."""
    files = [ROOT / "README.md"]
    for folder in SCANNED:
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md"))
    return [path for path in files if path.resolve() != Path(__file__).resolve()]


def cited_sections(numbers: str) -> list[str]:
    """The sections a citation's number list names: ``"2 and 5"`` -> 2, 5; ``"2-5"`` and
    ``"2 to 5"`` -> 2, 3, 4, 5; ``"4.2"`` -> 4.2."""
    sections: list[str] = []
    for part in re.split(rf"\s*,{_GAP}|{_GAP}and{_GAP}", numbers.strip()):
        ends = re.split(rf"\s*-\s*|{_GAP}to{_GAP}", part)
        if len(ends) == 2 and "." not in part:
            sections += [str(n) for n in range(int(ends[0]), int(ends[1]) + 1)]
        else:
            sections += ends
    return sections


def _matches(pattern: re.Pattern) -> list[tuple[str, re.Match]]:
    """``(file:line, match)`` for every match of ``pattern`` in the scanned files (a
    match may run over a line break)."""
    found = []
    for path in _scanned_files():
        text = path.read_text()
        for match in pattern.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{path.relative_to(ROOT)}:{line}", match))
    return found


def _citations() -> list[tuple[str, str, list[str]]]:
    """``(where, name, sections)`` for every citation in the scanned files."""
    return [(where, match["name"].lower(), cited_sections(match["numbers"]))
            for where, match in _matches(_CITATION)]


def _headings() -> dict[str, str]:
    """Section number -> title, for the ``## N. Title`` and ``### N.M Title`` headings."""
    text = SPECIFICATION.read_text()
    return {number: title for number, title in
            re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? (.+)$", text, flags=re.M)}


@pytest.mark.parametrize(("numbers", "expected"), [
    ("4", ["4"]), ("2 and 5", ["2", "5"]), ("2-5", ["2", "3", "4", "5"]),
    ("2 to 4", ["2", "3", "4"]), ("2, 4 and 5", ["2", "4", "5"]), ("4.2", ["4.2"]),
    ("2 and\n    # 5", ["2", "5"]),
])
def test_a_citation_names_the_sections_it_lists(numbers, expected):
    assert cited_sections(numbers) == expected


def test_citations_are_recognized_in_every_form():
    text = ("(SPEC sections 2 and 5) SPEC.md sections 2-5; spec section 3; SPEC section "
            "6's bounds; the specification section 4.2; (SPEC\n    section 7); the\n"
            "    # specification sections 2, 4\n    # and 5")
    assert [cited_sections(m["numbers"]) for m in _CITATION.finditer(text)] == [
        ["2", "5"], ["2", "3", "4", "5"], ["3"], ["6"], ["4.2"], ["7"], ["2", "4", "5"]]


def test_the_specification_keeps_sections_1_to_7_on_their_subjects():
    headings = _headings()
    top = [int(n) for n in headings if "." not in n]
    assert top == list(range(1, len(top) + 1)), f"sections out of order: {top}"
    for number, subject in SUBJECTS.items():
        title = headings.get(str(number), "")
        assert subject in title.lower(), (f"section {number} should be about {subject!r}, "
                                          f"its heading is {title!r}")


def test_every_cited_section_exists():
    citations = _citations()
    assert len(citations) >= 10, "the scan found almost no citations: is the pattern right?"
    headings = _headings()
    missing = [f"{where}: section {section}" for where, _, sections in citations
               for section in sections if section not in headings]
    assert not missing, "cited sections absent from docs/specification.md:\n" + "\n".join(
        missing)


def test_citations_use_the_specifications_name():
    wrong = [f"{where}: {name!r}" for where, name, _ in _citations()
             if name not in ACCEPTED_NAMES]
    if "spec" not in ACCEPTED_NAMES:
        wrong += [f"{where}: bare {match[0]!r}" for where, match in _matches(_BARE_NAME)]
    assert not wrong, "citations by a name other than 'specification':\n" + "\n".join(wrong)


def test_the_readme_cites_the_paper_and_points_to_the_specification():
    readme = (ROOT / "README.md").read_text()
    assert "docs/specification.md" in readme
    entry = re.search(r"```bibtex\n(@\w+\{.*?\n\})\n```", readme, flags=re.S)
    assert entry, "the README should hold the paper's BibTeX entry in a bibtex block"
    for field in ("Ioffe", "Batch Renormalization", "Advances in Neural Information "
                  "Processing Systems", "1945--1953", "2017"):
        assert field in entry[1]
