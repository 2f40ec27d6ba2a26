"""One GPU run: check every kernel family for correctness, then time it against its peers.

Usage on the GPU machine (torch + triton preinstalled, no venv, no internet):

    PYTHONPATH=. python3 benchmarks/gpu_check.py [--quick] [--out DIR] [--only window,linear,varlen,models]

Each family module exposes ``check_and_time(out_dir, quick) -> list[dict]``; a family that fails is
reported and the others still run. Writes ``gpu_check.md`` (the table) and ``gpu_check.json`` (all
rows) under ``--out`` (default: ``$OUT`` when set, else ``out/gpu``), and prints the table last.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FAMILIES = {"window": "gpu_window", "linear": "gpu_linear", "varlen": "gpu_varlen", "models": "gpu_models"}


def _environment() -> dict:
    import torch
    if not torch.cuda.is_available():  # CPU smoke run: the interpreter must be on before triton loads
        os.environ.setdefault("TRITON_INTERPRET", "1")
    env = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "missing"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2 ** 30, 1))
    else:
        env["gpu"] = "none"
    return env


def _table(rows: list) -> str:
    if not rows:
        return "(no rows)"
    cols = []
    for r in rows:
        for c in r:
            if c not in cols:
                cols.append(c)

    def fmt(x):
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes (a smoke run)")
    parser.add_argument("--out", default=os.environ.get("OUT", "out/gpu"))
    parser.add_argument("--only", default=",".join(FAMILIES), help="comma list of families")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = _environment()
    print("environment:", json.dumps(env), flush=True)
    sections, all_rows, failures = [], {}, []
    for fam in args.only.split(","):
        t0 = time.time()
        try:
            module = importlib.import_module(FAMILIES[fam])
            rows = module.check_and_time(str(out), quick=args.quick)
            status = "ok"
        except Exception:  # one broken family must not hide the others' numbers
            rows, status = [], "FAILED"
            failures.append(fam)
            traceback.print_exc()
        dt = time.time() - t0
        all_rows[fam] = rows
        sections.append(f"## {fam} ({status}, {dt:.0f} s)\n\n{_table(rows)}\n")
        print(f"[{fam}] {status} in {dt:.0f} s", flush=True)
    header = (f"# lincomp GPU check\n\nGPU: {env.get('gpu')} | torch {env['torch']} | triton {env['triton']} | "
              f"{time.strftime('%Y-%m-%d')}\n\n")
    text = header + "\n".join(sections)
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps({"environment": env, "rows": all_rows}, indent=1, default=str))
    print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
