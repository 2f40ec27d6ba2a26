"""``lincomp explain SPEC --length L``: the command line of :mod:`lincomp.ir.explain`, plus the configs the
tuning database gives each kernel on this device (what ``lincomp.compile`` would launch).

``register(subparsers)`` adds the command to the main parser; ``main(argv)`` runs it standalone
(``python -m lincomp.explain clear-r8 --grid 64x64``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import torch

from lincomp import presets
from lincomp._cliutil import positive_int, run_standalone
from lincomp.compiler import compile as compile_kernel
from lincomp.ir.explain import __doc__ as _EXPLAIN_DOC
from lincomp.ir.explain import _cases, explain, load_spec, parse_grid
from lincomp.spec import AttentionSpec


def tvm_configs(spec: AttentionSpec, L: int, *, heads: int = 1, dim: int = 64, kv_heads: Optional[int] = None) -> dict:
    """{TVM kernel name: kernel.config entry} a call of H=heads (kv_heads), D=dim at length L gets on this CPU
    (tuning db exact / nearest bucket / default); {"error": why} where TVM cannot give one."""
    try:
        kernel = compile_kernel(spec, target="tvm")
        return kernel.preview_configs(H=heads, D=dim, L=L, Hkv=kv_heads)
    except Exception as e:   # TVM not installed, or this spec does not lower there: say so, explain goes on
        return {"error": f"{type(e).__name__}: {e}"}


def _gpu_name() -> Optional[str]:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def configs_text(spec: AttentionSpec, L: int, *, heads: int = 1, dim: int = 64, kv_heads: Optional[int] = None) -> str:
    """Lines: per TVM kernel, the launch parameters a call gets on this CPU and where they come from
    (see :func:`tvm_configs`); Triton's are chosen per GPU."""
    lines = [f"configs on this machine (H={heads}, D={dim}, L={L}):"]
    configs = tvm_configs(spec, L, heads=heads, dim=dim, kv_heads=kv_heads)
    if "error" in configs:
        lines.append(f"  tvm: not available ({configs['error']})")
    for name, c in configs.items():
        if name != "error":
            where = c["source"] + (f" ({c['origin']})" if c.get("origin") else "")
            lines.append(f"  tvm {name} on {c['key'].get('device')}: {where}: {json.dumps(c['params'], sort_keys=True)}")
    gpu = _gpu_name()
    lines.append(f"  triton: chosen per call on {gpu} (kernel.config after a call)" if gpu else
                 "  triton: no CUDA device here (configs are chosen per GPU model from the tuning database)")
    return "\n".join(lines)


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add ``explain`` to an argparse subparsers object; returns its parser (``func(args) -> exit code``)."""
    p = subparsers.add_parser("explain", help="show the IR, plan and FLOPs of a spec at a length",
                              description=_EXPLAIN_DOC.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", metavar="SPEC", nargs="?", help="a JSON file, a JSON string, or a preset: "
                   + ", ".join([*presets.PAPER_SPECS, "clear-rN", "clear-rN-dfF"]))
    p.add_argument("--length", "-L", type=positive_int, action="append", default=[], metavar="L",
                   help="sequence length (repeat for several); grid specs fix it")
    p.add_argument("--grid", type=parse_grid, action="append", default=[], metavar="HxW",
                   help="grid for a 2d / 3d spec, e.g. 512x512 (FLUX at 8192^2 px); repeat for several")
    p.add_argument("--prefix", type=int, help="override the spec's prefix (text) tokens")
    p.add_argument("--block", type=positive_int, default=None,
                   help="tile size in tokens (default 64; sliding tiles: the largest block inside a tile)")
    p.add_argument("--heads", type=positive_int, default=1, help="query heads H for FLOPs / bytes (default 1)")
    p.add_argument("--kv-heads", type=positive_int, help="key/value heads (default: H)")
    p.add_argument("--dim", type=positive_int, default=64, help="head dim D (default 64)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch B (default 1)")
    p.add_argument("--dtype-bytes", type=positive_int, default=2, help="bytes per element (default 2: bf16 / fp16)")
    p.add_argument("--no-ir", action="store_true", help="leave out the IR dump")
    p.add_argument("--no-configs", dest="configs", action="store_false",
                   help="leave out the configs the tuning database gives the kernels on this device")
    p.add_argument("--json", action="store_true", help="print JSON (numbers only) instead of text")
    p.add_argument("--schema", action="store_true",
                   help="print the JSON Schema of a spec file (lincomp.spec_json_schema()) and exit; no SPEC")
    p.set_defaults(func=cmd_explain)
    return p


def cmd_explain(args: argparse.Namespace) -> int:
    if args.schema:
        from lincomp.spec_schema import spec_json_schema
        print(json.dumps(spec_json_schema(), indent=2, sort_keys=True))
        return 0
    if args.spec is None:
        print("lincomp explain: error: give a SPEC (a JSON file, a JSON string or a preset name), or --schema",
              file=sys.stderr)
        return 2
    try:
        spec = load_spec(args.spec)
        if args.prefix is not None:
            from dataclasses import replace
            spec = replace(spec, prefix=args.prefix)
        cases = _cases(spec, args.length, args.grid)
        results = [explain(s, L, block=args.block, heads=args.heads, dim=args.dim, batch=args.batch,
                           kv_heads=args.kv_heads, dtype_bytes=args.dtype_bytes, ir=not args.no_ir)
                   | {"spec_obj": s} for s, L in cases]
    except (ValueError, TypeError, OSError) as e:
        print(f"lincomp explain: error: {e}", file=sys.stderr)
        return 2
    if args.configs:
        for r in results:
            kw = dict(heads=args.heads, dim=args.dim, kv_heads=args.kv_heads)
            if args.json:
                r["configs"] = {"tvm": tvm_configs(r["spec_obj"], r["L"], **kw), "triton_device": _gpu_name()}
            else:
                r["text"] += "\n" + configs_text(r["spec_obj"], r["L"], **kw)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k not in ("text", "spec_obj")} for r in results], indent=2))
    else:
        print("\n\n".join(r["text"] for r in results))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``explain`` standalone; returns the exit code (a leading "explain" may be left out)."""
    return run_standalone("explain", register, argv)


if __name__ == "__main__":
    sys.exit(main())
