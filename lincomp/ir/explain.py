"""``lincomp explain SPEC --length L``: what lincomp does with a spec at a length, and what it saves.

Prints what ``lincomp.compile`` builds from the same ``lincomp.ir.lower(spec)``: the window rule, its reach,
the tensors a call takes, the algorithm and the kernels each target launches; then the canonical IR, the
rewrites applied, the plan (algorithm per branch, block plan density, full-tile
fraction, visited-pair efficiency of lincomp's tiled order vs FlexAttention-style row-major 128-token
blocks) and FLOPs / bytes against dense attention. SPEC is a JSON file, a JSON string or a preset name
(``clear-r8``, ``lizard``, ... ; ``clear-rN`` for any radius N). Grid specs fix their length; ``--grid``
sets the grid (repeat it for several sizes). CLEAR's headline at 8192^2 pixels (FLUX: 512x512 latent
tokens + 512 text tokens):

    lincomp explain clear-r8 --grid 512x512      # -> 99.54% fewer attention FLOPs

The command line lives in :mod:`lincomp.explain` (it also asks the tuning database which configs the
kernels get on this device, which this IR-level module may not import).
"""

from __future__ import annotations

import argparse
import difflib
import re
import time
from typing import List, Optional

from lincomp import presets
from lincomp.spec import AttentionSpec, GridWindow

FLEX_BLOCK = 128   # FlexAttention's default block size (row-major tokens)


def load_spec(text: str) -> AttentionSpec:
    """A preset name (``PAPER_SPECS``, ``clear-rN``, ``clear-rN-dfF``), a JSON file path or a JSON string."""
    if text in presets.PAPER_SPECS:
        return presets.PAPER_SPECS[text]()
    m = re.fullmatch(r"clear-r(\d+)(?:-df(\d+))?", text)
    if m:
        r, df = m.groups()
        return presets.clear(int(r)) if df is None else presets.clear_pool(int(r), int(df))
    if text.lstrip().startswith("{") or text.endswith(".json") or "/" in text:
        return AttentionSpec.coerce(text)
    names = [*presets.PAPER_SPECS, "clear-rN", "clear-rN-dfF"]
    close = difflib.get_close_matches(text, names, n=1)
    raise ValueError(f"{text!r} is not a preset, a JSON file or a JSON string; presets are {names}"
                     + (f" (did you mean {close[0]!r}?)" if close else ""))


def parse_grid(text: str) -> tuple:
    """``512x512`` / ``512,512`` / ``4x32x32`` -> a tuple of ints."""
    parts = re.split(r"[x,*]", text.strip().lower())
    try:
        grid = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid must look like 512x512 or 4x32x32, got {text!r}") from None
    if len(grid) not in (2, 3) or min(grid) < 1:
        raise argparse.ArgumentTypeError(f"--grid needs 2 or 3 positive sizes, got {text!r}")
    return grid


def _cases(spec: AttentionSpec, lengths: List[int], grids: List[tuple]) -> List[tuple]:
    """(spec, L) pairs to explain: one per --grid for grid specs, one per --length otherwise."""
    if isinstance(spec.window, GridWindow):
        specs = [spec.with_grid(g) for g in grids] if grids else [spec]
        out = []
        for s in specs:
            L = s.expected_length()
            for want in lengths:
                if want != L:
                    raise ValueError(f"--length {want} does not match the grid {list(s.window.grid)} with prefix "
                                     f"{s.prefix} (L = {L}); set the grid with --grid instead")
            out.append((s, L))
        return out
    if grids:
        raise ValueError("--grid only applies to specs with a 2d / 3d window")
    if not lengths:
        raise ValueError("give the sequence length with --length L (repeat for several lengths)")
    return [(spec, L) for L in lengths]


def default_block(spec: AttentionSpec) -> int:
    """The tile size explain plans with: 64 tokens, or for sliding-tile windows the largest block inside
    one window tile (what the kernels pick, so no tile pair is partly visible)."""
    from lincomp.ir.blocks import aligned_block
    w = spec.window
    return (aligned_block(w, 16, 64) if isinstance(w, GridWindow) else None) or 64


def explain(spec, L: int, *, block: Optional[int] = None, heads: int = 1, dim: int = 64, batch: int = 1,
            kv_heads: Optional[int] = None, dtype_bytes: int = 2, ir: bool = True) -> dict:
    """Plan ``spec`` at ``L`` and return ``{"text": ..., numbers...}`` (what the command prints)."""
    from lincomp.ir import cost
    from lincomp.ir.blocks import block_plan
    from lincomp.ir.lowered import lower
    from lincomp.ir.passes import lower_to_plan, savings_text, window_part

    spec = AttentionSpec.coerce(spec)
    lowered = lower(spec)
    block = block or default_block(spec)
    t0 = time.perf_counter()
    plan = lower_to_plan(spec, L, block=block, B=batch, H=heads, Hkv=kv_heads, D=dim, dtype_bytes=dtype_bytes)
    plan_s = time.perf_counter() - t0
    cs = plan.canonical_spec
    head = f"== {spec.name or spec.summary()} at L={L}"
    if isinstance(spec.window, GridWindow):
        head += f" ({spec.prefix} prefix + {'x'.join(map(str, spec.window.grid))} grid)"
    notes = []
    kernels = {t: lowered.kernels(t) for t in ("triton", "tvm")}
    info = {"spec": spec.to_dict(), "L": L, "plan_seconds": plan_s, "algorithm": lowered.algorithm,
            "kernels": kernels, "tensors": list(lowered.tensors), "algorithms": dict(plan.algorithms),
            "rewrites": [str(r) for r in plan.rewrites], "flops": plan.cost.flops,
            "dense_flops": plan.cost.dense_flops, "flops_saved_pct": 100 * plan.cost.flops_saved,
            "bytes": plan.cost.bytes, "dense_bytes": plan.cost.dense_bytes,
            "visible_pairs": plan.cost.visible_pairs, "allowed_pairs": plan.cost.allowed_pairs}
    if plan.block_plan is not None:
        bp = plan.block_plan
        info.update(density=bp.density, full_fraction=bp.full_fraction, efficiency_tiled=plan.pair_efficiency)
        # FlexAttention's layout for the same window: row-major tokens in 128-token blocks.
        flex = block_plan(window_part(cs), L, FLEX_BLOCK, order="rowmajor")
        eff_flex = cost.pair_efficiency(cs, L, flex)
        info.update(efficiency_rowmajor128=eff_flex, density_rowmajor128=flex.density)
        tiled = f"{bp.block_m}x{bp.block_n}" + (f" in {'x'.join(map(str, bp.tile))} grid tiles" if bp.tile else "")
        notes.append(f"vs row-major {FLEX_BLOCK} (FlexAttention-style): {eff_flex:.1%} visited-pair efficiency, "
                     f"{flex.nnz} of {flex.num_q_tiles * flex.num_k_tiles} blocks ({flex.density:.2%}); "
                     f"lincomp {tiled}: {plan.pair_efficiency:.1%}")
    launches = [f"kernels ({t}): forward {' -> '.join(k['forward'])}"
                + (f"; backward {' -> '.join(k['backward'])}" if k["backward"] else "; inference only")
                for t, k in kernels.items()]
    lines = [head + " ==", lowered.summary(), *launches, plan.format(ir=ir, plan_notes=tuple(notes)),
             f"summary: {savings_text(plan.cost)} (planned in {plan_s:.3f} s)"]
    info["text"] = "\n".join(lines)
    return info
