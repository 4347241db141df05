"""The ``portable-brn`` command: ``reproduce`` (the paper's experiment) and
``conformance`` (the cross-backend numerics matrix)."""

from __future__ import annotations

import sys

_COMMANDS = {
    "reproduce": "train batch norm and Batch Renormalization under three regimes and compare",
    "conformance": "check every installed backend against the float64 reference",
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; each parses its own options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in _COMMANDS:
        usage = "\n".join(f"  {name:<12} {text}" for name, text in _COMMANDS.items())
        print(f"usage: portable-brn {{{','.join(_COMMANDS)}}} [options]\n\n{usage}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "reproduce":
        from portable_brn.reproduce.cli import main as run
    else:
        from portable_brn.conformance.cli import main as run
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
