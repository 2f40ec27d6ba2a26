"""``lincomp db show`` and ``lincomp db validate``.

``register(subparsers)`` adds the ``db`` command to the main ``lincomp`` parser; each leaf parser
sets ``func(args) -> exit code``. ``main(argv)`` runs it standalone:
``python -m lincomp.tuning.cli db show`` (the leading "db" may be left out).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from lincomp.tuning.db import SHIPPED_DB, TuningDB, TuningDBWarning, validate_paths


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add ``db {show,validate}`` to an argparse subparsers object; returns the ``db`` parser."""
    db = subparsers.add_parser("db", help="inspect and check the tuning database",
                               description="Inspect and check the tuning database (tuning_db/README.md).")
    sub = db.add_subparsers(dest="db_command", metavar="{show,validate}")
    sub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db", metavar="DIR", help="user database folder (default: $LINCOMP_TUNING_DB "
                                                   "or ~/.cache/lincomp/tuning_db)")
        p.add_argument("--shipped", metavar="DIR", default=str(SHIPPED_DB),
                       help="shipped configs folder (default: the repository's tuning_db/)")
        p.add_argument("--no-shipped", action="store_true", help="read only the user folder")

    show = sub.add_parser("show", help="list tuned entries as a table")
    common(show)
    show.add_argument("--device", default="all",
                      help="a device name, 'current' for this machine, or 'all' (default)")
    show.add_argument("--backend", help="only this backend, e.g. triton or tvm")
    show.add_argument("--kernel", help="only this kernel, e.g. window_fwd")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.set_defaults(func=cmd_show)

    val = sub.add_parser("validate", help="check database files; exit 1 if any is corrupt or foreign")
    common(val)
    val.add_argument("paths", nargs="*", metavar="PATH",
                     help="files or folders to check (default: the user and shipped folders)")
    val.set_defaults(func=cmd_validate)
    return db


def _open_db(args: argparse.Namespace) -> TuningDB:
    for flag, folder in (("--db", args.db), ("--shipped", None if args.no_shipped else args.shipped)):
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"{flag} {folder}: no such folder (give an existing tuning database folder)")
    return TuningDB(args.db, shipped=None if args.no_shipped else args.shipped)


def cmd_show(args: argparse.Namespace) -> int:
    db = _open_db(args)
    device = None if args.device == "current" else args.device
    with warnings.catch_warnings():  # summarised below instead of one warning per file
        warnings.simplefilter("ignore", TuningDBWarning)
        entries = db.entries(device=device, backend=args.backend, kernel=args.kernel)
    if args.json:
        print(json.dumps([dict(e.to_dict(), device=e.device, source=str(e.source)) for e in entries],
                         indent=2, sort_keys=True))
    elif not entries:
        print(f"no entries (folders: {', '.join(map(str, db.folders))})")
    else:
        head = ("device", "backend", "kernel", "spec", "dtype", "bucket", "config", "time_ms")
        rows = [(e.device, e.backend, e.kernel, e.spec, e.dtype, e.bucket or "-",
                 json.dumps(e.config, sort_keys=True, separators=(",", ":")), f"{e.time_ms:.4g}")
                for e in entries]
        print(_table(head, rows))
    problems = db.validate()
    if problems:
        print(f"note: {len(problems)} problem(s) ignored; run `lincomp db validate` for details",
              file=sys.stderr)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.paths] or [f for f in _open_db(args).folders if f.exists()]
    problems, n_files, n_entries = validate_paths(paths)
    if problems:
        print(f"{len(problems)} problem(s) in the tuning database:")
        for p in problems:
            print(f"  {p}")
        return 1
    print(f"ok: {n_files} file(s), {n_entries} entr{'y' if n_entries == 1 else 'ies'} "
          f"({', '.join(map(str, paths)) or 'no folders'})")
    return 0


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``db show|validate`` standalone; returns the exit code."""
    from lincomp._cliutil import run_standalone
    return run_standalone("db", register, argv, implied=("show", "validate"))


if __name__ == "__main__":
    sys.exit(main())
