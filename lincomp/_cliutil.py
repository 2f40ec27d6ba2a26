"""Running one ``lincomp`` subcommand module on its own (``python -m lincomp.explain ...``).

A bottom-layer helper, so subcommand modules in any layer can use it without importing ``lincomp.cli``
(which imports every subcommand).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Optional, Sequence


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
    return run_command(args)


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


# Exceptions that mean "the input was wrong" (the project's contract: bad input raises ValueError / TypeError
# naming the field and the fix); anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def run_command(args) -> int:
    """Run a parsed subcommand; a user error prints ``lincomp CMD: error: MESSAGE`` and returns 2 (no traceback;
    ``LINCOMP_DEBUG=1`` re-raises it)."""
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        if os.environ.get("LINCOMP_DEBUG"):
            raise
        message = str(e) or type(e).__name__
    except SystemExit as e:   # raise SystemExit("message") is a user error too (argparse's own exits pass)
        if not isinstance(e.code, str):
            raise
        message = e.code
    name = " ".join(w for w in (getattr(args, "command", None), getattr(args, "recipe", None),
                                getattr(args, "db_command", None)) if w)
    if not message.startswith("lincomp "):   # some messages already name the command
        message = f"lincomp {name}: error: {message}"
    print(message, file=sys.stderr)
    return 2


TABLE_WIDTH = 100   # columns: every table the CLI prints fits a standard terminal


def table(head: Sequence[str], rows: Sequence[Sequence[object]], *, title: Optional[str] = None,
          width: int = TABLE_WIDTH, numeric: Sequence[str] = (), wrap: Sequence[str] = ()) -> str:
    """Rows as a text table at most ``width`` columns wide (long cells wrap inside their column).

    rich draws it where installed (it comes with the ``models`` extra's dependencies); otherwise a plain
    aligned table. ``numeric``: the head names to right-align; ``wrap``: the columns that may wrap when
    the table is too wide (default: the last one); the others keep their cells on one line.
    """
    cells = [[("-" if c is None else str(c)) for c in r] for r in rows]
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [list(head), *cells]) for i in range(len(head))]
        line = lambda r: "  ".join(c.rjust(w) if h in numeric else c.ljust(w)  # noqa: E731
                                   for c, w, h in zip(r, widths, head)).rstrip()
        text = [line(list(head)), line(["-" * w for w in widths]), *map(line, cells)]
        return "\n".join(([title] if title else []) + text)
    wrap = set(wrap or head[-1:])
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, expand=False)
    for h in head:
        t.add_column(h, justify="right" if h in numeric else "left", overflow="fold", no_wrap=h not in wrap)
    for r in cells:
        t.add_row(*r)
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, highlight=False, emoji=False, markup=False,
            soft_wrap=False).print(t)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines()).strip("\n")
