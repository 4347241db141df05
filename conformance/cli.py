"""``portable-brn conformance`` / ``python -m portable_brn.conformance``.

Prints the backend-by-check matrix, optionally writes it as JSON, and exits 1 when any
cell fails or a backend named with ``--backend`` cannot run (2 on a usage error).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import golden
from .matrix import build
from .registry import all_backends, resolve

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    names = ", ".join(b.name for b in all_backends())
    parser = argparse.ArgumentParser(
        prog="portable-brn conformance",
        description="Check every installed backend against the float64 reference of "
                    "Batch Renormalization and against each other.",
        epilog=f"registered backends: {names}.  Any other name is imported as a module "
               "exposing an Array API namespace (e.g. --backend array_api_compat.numpy).")
    parser.add_argument("--backend", action="append", metavar="NAME",
                        help="a backend to run (repeatable, or a comma-separated list); "
                             "default: all registered")
    parser.add_argument("--case", action="append", metavar="NAME",
                        help="a case to run (repeatable, or comma-separated); default: all")
    parser.add_argument("--all-cases", action="store_true",
                        help="run every case at every dtype on the slow backends (JAX, "
                             "dask) too; by default they run every case at float64 and a "
                             "quick subset at lower precision")
    parser.add_argument("--no-properties", action="store_true",
                        help="skip the property checks")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="also write the matrix as JSON to PATH")
    parser.add_argument("--list", action="store_true",
                        help="list the backends and cases, then exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the conformance matrix; the exit status is 0 only when every cell passes."""
    args = _parser().parse_args(argv)
    cases = golden.all_cases()
    backends = resolve(args.backend)
    if args.list:
        for backend in backends:
            print(f"backend {backend.name:<26} {backend.skip_reason or backend.about}")
        for case in cases:
            print(f"case    {case.name:<26} {case.about}")
        return 0
    if args.case:
        wanted = {n.strip() for entry in args.case for n in entry.split(",") if n.strip()}
        unknown = wanted - {c.name for c in cases}
        if unknown:
            print(f"unknown case(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        cases = tuple(c for c in cases if c.name in wanted)
    matrix = build(backends, cases, all_cases=args.all_cases,
                   with_properties=not args.no_properties,
                   progress=lambda text: print(f"running {text}", file=sys.stderr))
    print(matrix.render())
    if args.json:
        args.json.write_text(json.dumps(matrix.to_json(), indent=1) + "\n")
    skipped = [row.backend for row in matrix.rows if row.skip]
    if args.backend and skipped:
        print(f"\nrequested backend(s) could not run: {', '.join(skipped)}")
    return 1 if matrix.failed or (args.backend and skipped) else 0
