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

from lincomp._cliutil import table
from lincomp.tuning.db import SHIPPED_DB, Entry, TuningDB, TuningDBWarning, validate_paths
from lincomp.tuning.device import legacy_cpu_name


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


LEGACY_NOTE = (" (a CPU name without its ISA level, from an older lincomp: lookups do not use these; re-tune, or "
               "rename the device to the tuning host's name, e.g. '... x2cores avx2')")


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
        head = ("kernel", "spec", "dtype", "bucket", "config", "ms", "from")
        names = _preset_names()
        for device in dict.fromkeys(e.device for e in entries):   # one table per device, in order
            rows = [(f"{e.backend}/{e.kernel}", spec_label(e, names), e.dtype, e.bucket or "-",
                     " ".join(f"{k}={v}" for k, v in sorted(e.config.items())), f"{e.time_ms:.4g}",
                     _origin(e, db)) for e in entries if e.device == device]
            title = f"device: {device}" + (LEGACY_NOTE if legacy_cpu_name(device) else "")
            print(table(head, rows, title=title, numeric=("ms",), wrap=("spec", "bucket", "config")))
            print()
        print(f"user entries: {db.path}; shipped: {db.shipped or '(not read)'}")
    problems = db.validate()
    if problems:
        print(f"note: {len(problems)} problem(s) ignored; run `lincomp db validate` for details",
              file=sys.stderr)
    return 0


def spec_label(entry: Entry, names: Optional[dict] = None) -> str:
    """A readable name for an entry's spec: the preset it equals, else its stored name, else its summary
    (the key without its hash)."""
    names = _preset_names() if names is None else names
    if entry.spec in names:
        return names[entry.spec]
    stored = (entry.spec_dict or {}).get("name")
    summary = entry.spec.rsplit("-", 1)[0] or entry.spec
    return f"{stored} ({summary})" if stored else summary


def _preset_names() -> dict:
    """{spec key: preset name} of the presets (keys ignore names, so any spec equal to a preset matches)."""
    from lincomp import presets
    out = {}
    for name, make in presets.PAPER_SPECS.items():
        try:
            out.setdefault(make().key(), name)
        except (TypeError, ValueError):   # a preset that needs arguments
            continue
    return out


def _origin(entry: Entry, db: TuningDB) -> str:
    """'user' or 'shipped': which folder an entry was read from."""
    if entry.source is not None and db.shipped is not None and Path(entry.source).parent == db.shipped:
        return "shipped"
    return "user"


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``db show|validate`` standalone; returns the exit code."""
    from lincomp._cliutil import run_standalone
    return run_standalone("db", register, argv, implied=("show", "validate"))


if __name__ == "__main__":
    sys.exit(main())
