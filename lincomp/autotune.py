"""``lincomp.tune`` and ``lincomp tune SPEC``: autotune a spec's kernels on this device for a set of shapes.

It compiles kernels, so it sits above ``lincomp.compiler``; ``lincomp.tuning`` (the database, the
search and the config chooser the kernels read) stays below the lowerings.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from lincomp._cliutil import positive_int, user_error
from lincomp.compiler import compile as compile_kernel
from lincomp.spec import AttentionSpec
from lincomp.testing import random_inputs

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
         progress=True) -> list:
    """Tune ``spec`` for each length (one shape bucket each) on ``device`` and store the results.

    ``target="auto"``: Triton on a CUDA device, TVM on the CPU. A key already in the database costs no
    tuning work (``force=True`` re-tunes). Returns summary rows (dicts) for printing.
    """
    spec = AttentionSpec.coerce(spec)
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    kernel = compile_kernel(spec, target)
    if hasattr(kernel, "kernel_for"):  # "auto": the device decides the backend
        kernel = kernel.kernel_for(dev)
    rows = []
    fixed = spec.expected_length()
    for L in ([fixed] if fixed is not None else lengths):
        inputs = random_inputs(spec, B=batch, H=heads, Hkv=kv_heads, L=int(L), D=head_dim,
                               dtype=_dtype(dtype), device=dev)
        q, k, v = inputs.pop("q"), inputs.pop("k"), inputs.pop("v")
        for res in kernel.tune(q, k, v, force=force, progress=progress, **inputs):
            e = res.entry
            rows.append({"target": kernel.target, "kernel": getattr(e, "kernel", "?"), "L": int(L),
                         "bucket": getattr(e, "bucket", "?"), "config": res.config, "time_ms": res.time_ms,
                         "candidates": len(res.candidates), "cached": res.cached})
        if not rows or rows[-1]["L"] != int(L):
            rows.append({"target": kernel.target, "kernel": "-", "L": int(L), "bucket": "-", "config": {},
                         "time_ms": float("nan"), "candidates": 0, "cached": False,
                         "note": f"the {kernel.target} kernel has nothing to tune"})
    return rows


def format_rows(rows: list) -> str:
    """A plain-text summary table of ``tune`` rows."""
    head = f"{'target':8} {'kernel':16} {'L':>7} {'time ms':>9} {'tried':>5} {'cached':>6}  config"
    lines = [head, "-" * len(head)]
    for r in rows:
        t = "-" if r["time_ms"] != r["time_ms"] else f"{r['time_ms']:.3f}"
        cfg = r.get("note") or ", ".join(f"{k}={v}" for k, v in r["config"].items())
        lines.append(f"{r['target']:8} {r['kernel']:16} {r['L']:>7} {t:>9} {r['candidates']:>5} "
                     f"{'yes' if r['cached'] else 'no':>6}  {cfg}")
    return "\n".join(lines)


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
    p.set_defaults(func=_run)


def _run(args) -> int:
    import torch

    from lincomp.presets import resolve

    try:   # a bad spec, size or dtype is the user's to fix: one line, exit 2, no traceback
        spec = resolve(args.spec)
        gpu = torch.cuda.is_available() and args.target != "tvm"
        dtype = args.dtype or ("bfloat16" if gpu else "float32")
        rows = tune(spec, args.target, lengths=args.length or [4096], batch=args.batch, heads=args.heads,
                    kv_heads=args.kv_heads, head_dim=args.dim, dtype=dtype, force=args.force,
                    device="cuda" if gpu else "cpu")
    except (ValueError, TypeError, KeyError) as e:
        return user_error("tune", e)
    print(format_rows(rows))
    return 0


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="lincomp")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tune", *(argv or [])])
    return args.func(args)
