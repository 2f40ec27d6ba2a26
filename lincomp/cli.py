"""The ``lincomp`` command: ``explain | tune | db | distill | demo``.

Each subcommand lives beside the code it drives and registers itself here; nothing heavy is
imported until a subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lincomp._cliutil import positive_int, run_command, run_standalone, user_error  # noqa: F401  (shared)

# name -> (module with register(subparsers), one-line help)
_SUBCOMMANDS = {
    "explain": ("lincomp.explain", "print a spec's IR, plan, FLOPs and bytes against dense attention"),
    "tune": ("lincomp.autotune", "autotune a spec's kernels on this device into the tuning database"),
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


def _version() -> str:
    from lincomp import __version__
    return f"lincomp {__version__} (python {sys.version.split()[0]})"


def _unavailable(name: str, error: Exception) -> int:
    print(f"lincomp {name}: unavailable here ({error}); install the missing package and retry", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _SUBCOMMANDS:   # a subcommand may accept a shorter form (distill --model M ...)
        argv = getattr(sys.modules.get(_SUBCOMMANDS[argv[0]][0]), "expand_argv", list)(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None) or not hasattr(args, "func"):
        parser.print_help()
        return 0 if not getattr(args, "command", None) else 2
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
