"""``lincomp.tune`` and ``lincomp tune SPEC``: autotune a spec's kernels on this device for a set of shapes.

It compiles kernels, so it sits above ``lincomp.compiler``; ``lincomp.tuning`` (the database, the
search and the config chooser the kernels read) stays below the lowerings.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from lincomp._cliutil import positive_int, table, user_error
from lincomp.compiler import compile as compile_kernel
from lincomp.spec import AttentionSpec
from lincomp.testing import random_inputs
from lincomp.tuning import TuningDB, time_budget

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    if d not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {d!r}")
    return _DTYPES[d]


def tune(spec, target: str = "auto", *, lengths: Iterable[int] = (4096,), batch: int = 1, heads: int = 8,
         kv_heads: Optional[int] = None, head_dim: int = 64, dtype="float32", device=None, force: bool = False,
         progress=True, budget_s: Optional[float] = None) -> list:
    """Tune ``spec`` for each length (one shape bucket each) on ``device`` and store the results.

    ``target="auto"``: Triton on a CUDA device, TVM on the CPU. A key already in the database costs no
    tuning work (``force=True`` re-tunes). ``budget_s``: seconds for the whole run; once spent, each
    remaining search measures one config and the best found so far is stored (rows say ``budget_hit``).
    Returns summary rows (dicts) for printing.
    """
    spec = AttentionSpec.coerce(spec)
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    kernel = compile_kernel(spec, target)
    if hasattr(kernel, "kernel_for"):  # "auto": the device decides the backend
        kernel = kernel.kernel_for(dev)
    rows = []
    fixed = spec.expected_length()
    with time_budget(budget_s):
        for L in ([fixed] if fixed is not None else lengths):
            _tune_length(kernel, spec, int(L), rows, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                         dtype=dtype, dev=dev, force=force, progress=progress)
    return rows


def _tune_length(kernel, spec, L: int, rows: list, *, batch, heads, kv_heads, head_dim, dtype, dev, force,
                 progress) -> None:
    """Tune ``kernel`` at length ``L``; append one row per tuned kernel (or one saying nothing to tune)."""
    inputs = random_inputs(spec, B=batch, H=heads, Hkv=kv_heads, L=int(L), D=head_dim,
                           dtype=_dtype(dtype), device=dev)
    q, k, v = inputs.pop("q"), inputs.pop("k"), inputs.pop("v")
    for res in kernel.tune(q, k, v, force=force, progress=progress, **inputs):
        e = res.entry
        rows.append({"target": kernel.target, "kernel": getattr(e, "kernel", "?"), "L": int(L),
                     "bucket": getattr(e, "bucket", "?"), "config": res.config, "time_ms": res.time_ms,
                     "candidates": len(res.candidates), "space": getattr(res, "space", 0),
                     "budget_hit": getattr(res, "budget_hit", False), "cached": res.cached})
    if not rows or rows[-1]["L"] != int(L):
        rows.append({"target": kernel.target, "kernel": "-", "L": int(L), "bucket": "-", "config": {},
                     "time_ms": float("nan"), "candidates": 0, "cached": False,
                     "note": f"the {kernel.target} kernel has nothing to tune"})


def format_rows(rows: list, db_path=None) -> str:
    """A summary table of ``tune`` rows (and where the results went, when ``db_path`` is given)."""
    head = ("target", "kernel", "L", "time ms", "tried", "cached", "config")
    body = []
    for r in rows:
        t = "-" if r["time_ms"] != r["time_ms"] else f"{r['time_ms']:.3f}"
        cfg = r.get("note") or " ".join(f"{k}={v}" for k, v in r["config"].items())
        tried = f"{r['candidates']}/{r['space']}" if r.get("space") and r["space"] != r["candidates"] else r["candidates"]
        body.append((r["target"], r["kernel"], r["L"], t, tried, "yes" if r["cached"] else "no", cfg))
    text = table(head, body, numeric=("L", "time ms", "tried"))
    if any(r.get("budget_hit") for r in rows):
        text += ("\nthe time budget ran out before every config was tried (tried = measured/space);\n"
                 "the best found is stored: run again with a larger --budget and --force to search further")
    if db_path is not None:
        text += f"\nresults stored in {db_path} (lincomp db show lists them)"
    return text


# ------------------------------------------------------------------------------ lincomp tune SPEC

def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="autotune a spec's kernels on this device into the tuning database",
        description="Time each kernel's config space for SPEC on this device and store the fastest in the "
                    "tuning database (keyed by device name, spec, dtype and length bucket). A key already "
                    "stored costs no work; --force re-tunes.")
    p.add_argument("spec", help="a preset name (clear-r8, lizard, lolcats, gla-vector, ...) or a spec JSON file")
    p.add_argument("--length", "-L", type=positive_int, action="append", help="sequence length (repeatable; default 4096)")
    p.add_argument("--target", default="auto", choices=["auto", "triton", "tvm"])
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--heads", type=positive_int, default=8)
    p.add_argument("--kv-heads", type=positive_int, default=None)
    p.add_argument("--dim", type=positive_int, default=64, help="head dim D")
    p.add_argument("--force", action="store_true", help="re-tune even when the database has the key")
    p.add_argument("--budget", type=duration, default=None, metavar="TIME",
                   help="time for the whole run, e.g. 60s, 5m, 1h (default: no limit); the best found so far is "
                        "kept when it runs out")
    p.set_defaults(func=_run)


def duration(text: str) -> float:
    """argparse type: seconds from '90', '90s', '5m' or '1h' (> 0); else a usage error (exit 2)."""
    import argparse
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    t = text.strip().lower()
    scale = units.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a duration such as 90s, 5m or 1h, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive duration, got {text!r}")
    return value


def _run(args) -> int:
    import torch

    from lincomp.presets import resolve

    try:   # a bad spec, size or dtype is the user's to fix: one line, exit 2, no traceback
        spec = resolve(args.spec)
        gpu = torch.cuda.is_available() and args.target != "tvm"
        dtype = args.dtype or ("bfloat16" if gpu else "float32")
        rows = tune(spec, args.target, lengths=args.length or [4096], batch=args.batch, heads=args.heads,
                    kv_heads=args.kv_heads, head_dim=args.dim, dtype=dtype, force=args.force,
                    device="cuda" if gpu else "cpu", budget_s=args.budget)
    except (ValueError, TypeError, KeyError) as e:
        return user_error("tune", e)
    print(format_rows(rows, db_path=TuningDB().path))
    return 0


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="lincomp")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tune", *(argv or [])])
    return args.func(args)
