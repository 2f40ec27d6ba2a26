"""``lincomp tune SPEC``: autotune a spec on this device (progress bar, then a summary table)."""

from __future__ import annotations

from lincomp.cli import positive_int, user_error


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="autotune a spec's kernels on this device into the tuning database",
        description="Time each kernel's config space for SPEC on this device and store the fastest in the "
                    "tuning database (keyed by device name, spec, dtype and length bucket). A key already "
                    "stored costs no work; --force re-tunes.")
    p.add_argument("spec", help="a preset name (clear-r8, lizard, lolcats, gla-vector, ...) or a spec JSON file")
    p.add_argument("--length", "-L", type=positive_int, action="append",
                   help="sequence length (repeatable; default 4096)")
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
    from lincomp.tuning.autotune import format_rows, tune

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
