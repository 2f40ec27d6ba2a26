"""``lincomp.tune``: autotune a spec's kernels on this device for a set of shapes."""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from lincomp.spec import AttentionSpec

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
    from lincomp.compiler import compile as compile_kernel
    from lincomp.testing import random_inputs

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
