"""Running one ``lincomp`` subcommand module on its own (``python -m lincomp.explain ...``).

A bottom-layer helper, so subcommand modules in any layer can use it without importing ``lincomp.cli``
(which imports every subcommand).
"""

from __future__ import annotations

import argparse
import sys


def run_standalone(name: str, register, argv=None, implied=None) -> int:
    """Run one subcommand module as ``python -m`` would: ``argv`` without the leading ``name`` is fine.

    ``implied``: first words that mean the subcommand name was left out (default: any but ``name``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] != name and (implied is None or argv[0] in implied)):
        argv.insert(0, name)
    parser = argparse.ArgumentParser(prog="lincomp")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (sizes: --dim, --heads, --length, ...); else a usage error (exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def user_error(command: str, error: Exception) -> int:
    """Report a user's mistake (a bad spec, size or option) in one line on stderr; exit status 2."""
    print(f"lincomp {command}: error: {error}", file=sys.stderr)
    return 2
