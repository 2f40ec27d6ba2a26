"""The ``lincomp`` command: ``explain | tune | db | distill | demo``.

Each subcommand lives beside the code it drives and registers itself here; nothing heavy is
imported until a subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with register(subparsers), one-line help)
_SUBCOMMANDS = {
    "explain": ("lincomp.ir.explain", "print a spec's IR, plan, FLOPs and bytes against dense attention"),
    "tune": ("lincomp.tuning.tune_cli", "autotune a spec's kernels on this device into the tuning database"),
    "db": ("lincomp.tuning.cli", "show or validate the tuning database"),
    "distill": ("lincomp.models.distill_cli", "linearise a model and distil it against the original"),
    "demo": ("lincomp.demo", "run the main job end to end and write a report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lincomp",
        description="Compile declared attention variants (local windows, gated linear attention, hybrids) "
                    "to generated Triton (GPU) and TVM (CPU) kernels.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as e:  # one missing optional dependency must not take the whole CLI down
            p = sub.add_parser(name, help=f"{help_text} (unavailable: {e})")
            p.set_defaults(func=lambda args, e=e, name=name: _unavailable(name, e))
            continue
        mod.register(sub)
        # Subcommands that register their own parser keep it; make sure help text is present.
        if name in sub.choices and not sub.choices[name].description:
            sub.choices[name].description = help_text
    return parser


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
    return _run(args)


def _version() -> str:
    from lincomp import __version__
    return f"lincomp {__version__} (python {sys.version.split()[0]})"


# Exceptions that mean "the input was wrong" (the project's contract: bad input raises ValueError / TypeError
# naming the field and the fix); anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _run(args) -> int:
    """Run a parsed subcommand; a user error prints ``lincomp CMD: error: MESSAGE`` and returns 2 (no traceback;
    ``LINCOMP_DEBUG=1`` re-raises it)."""
    import os
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


def _unavailable(name: str, error: Exception) -> int:
    print(f"lincomp {name}: unavailable here ({error}); install the missing package and retry", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None) or not hasattr(args, "func"):
        parser.print_help()
        return 0 if not getattr(args, "command", None) else 2
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
