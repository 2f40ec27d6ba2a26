"""The feature-map template: phi(x) of the linear branch into a [B, H, L, F] buffer.

Hedgehog maps project each token with a per-head weight, ``p = x W[h]`` (``W: [H, D, E]``), then
``hedgehog``: ``[softmax(p), softmax(-p)]`` (each over its E entries) or ``hedgehog_exp``:
``[exp(p), exp(-p)]``. Elementwise maps (identity / elu1 / relu) are cheap enough to be applied inline
by the linear kernel; they come here only when the window kernel of a ``shared`` hybrid needs them.
"""

from __future__ import annotations

from dataclasses import dataclass

from lincomp.lower.tvmir.codegen import LOG2E, Script, divisor_at_most, emit_gemm_tile, exp2, f32
from lincomp.lower.tvmir.linear import INLINE_MAPS, phi_expr

ROWS = 32   # tokens per task


@dataclass(frozen=True)
class FeatureDims:
    Hx: int      # heads of the input (H for q, Hkv for k)
    H: int       # heads of the output (one per query head)
    D: int
    E: int       # projection width (F = 2E for hedgehog maps, F = D = E for elementwise maps)


def feature_source(fmap: str, dims: FeatureDims, mr: int = 4, name: str = "features", lanes: int = 8) -> str:
    """TVMScript of ``name(x, [W], out)``: ``out[b, h, t] = phi(x[b, h // group, t])``.

    ``mr``: token rows per projection micro-kernel step (``mr * E / lanes`` accumulator registers: the caller
    fits it to the register file); ``lanes``: fp32 lanes of a vector register (the width of the reductions)."""
    Hx, H, D, E = dims.Hx, dims.H, dims.D, dims.E
    group = H // Hx
    hedge = fmap not in INLINE_MAPS
    F = 2 * E if hedge else D
    L2E = f32(LOG2E)
    s = Script()
    s("@T.prim_func")
    params = "x_h: T.handle, w_h: T.handle, out_h: T.handle" if hedge else "x_h: T.handle, out_h: T.handle"
    with s.block(f"def {name}({params}):"):
        s(f'T.func_attr({{"global_symbol": "{name}", "tir.noalias": True}})')
        s("B = T.int32()", "L = T.int32()")
        s(f'x = T.match_buffer(x_h, (B, {Hx}, L, {D}), "float32")')
        if hedge:
            s(f'w = T.match_buffer(w_h, ({H}, {D}, {E}), "float32")')
        s(f'out = T.match_buffer(out_h, (B, {H}, L, {F}), "float32")')
        nt = f"((L + {ROWS - 1}) // {ROWS})"
        with s.block(f"for task in T.parallel(B * {H} * {nt}):"):
            s(f"b = task // ({H} * {nt})", f"h = task // {nt} % {H}", f"t0 = task % {nt} * {ROWS}",
              f"hx = h // {group}" if group > 1 else "hx = h")
            if not hedge:
                with s.block(f"for r in range(T.min({ROWS}, L - t0)):"):
                    with s.block(f"for d in T.vectorized({D}):"):
                        s(f"out[b, h, t0 + r, d] = {phi_expr(fmap, 'x[b, hx, t0 + r, d]')}")
                return s.text()
            s(f'p = T.alloc_buffer(({ROWS}, {E}), "float32")')
            s("# p = x_tile @ W[h]")
            emit_gemm_tile(s, rows=ROWS, mr=divisor_at_most(ROWS, mr), width=E, red=str(D),
                           a=lambda r, x: f"x[b, hx, T.min(t0 + {r}, L - 1), {x}]",
                           b=lambda x, w: f"w[h, {x}, {w}]", init=None,
                           store=lambda r, w, val: f"p[{r}, {w}] = {val}")
            V = divisor_at_most(E, lanes)    # reductions over E run V lanes wide, then across the lanes
            if fmap == "hedgehog":
                s(f'part = T.alloc_buffer((2, {V}), "float32")', 'mx = T.alloc_buffer((2,), "float32")')
            with s.block(f"for r in range(T.min({ROWS}, L - t0)):"):
                if fmap == "hedgehog":
                    s("# softmax(p) and softmax(-p) over the E entries (shifted by max p and min p)")
                    _emit_lane_reduce(s, E, V, (lambda a, x: f"T.max({a}, {x})", lambda a, x: f"T.min({a}, {x})"),
                                      (lambda e: f"p[r, {e}]", lambda e: f"p[r, {e}]"))
                    with s.block(f"for e in T.vectorized({E}):"):
                        s(f"out[b, h, t0 + r, e] = {exp2(f'(p[r, e] - mx[0]) * {L2E}')}",
                          f"out[b, h, t0 + r, {E} + e] = {exp2(f'(mx[1] - p[r, e]) * {L2E}')}")
                    s("# the two sums (then multiply by their reciprocals: 1 ulp, against a division per entry)")
                    _emit_lane_reduce(s, E, V, (lambda a, x: f"{a} + {x}",) * 2,
                                      (lambda e: f"out[b, h, t0 + r, {e}]", lambda e: f"out[b, h, t0 + r, {E} + {e}]"))
                    s("mx[0] = T.float32(1) / mx[0]", "mx[1] = T.float32(1) / mx[1]")
                    with s.block(f"for e in T.vectorized({E}):"):
                        s("out[b, h, t0 + r, e] = out[b, h, t0 + r, e] * mx[0]",
                          f"out[b, h, t0 + r, {E} + e] = out[b, h, t0 + r, {E} + e] * mx[1]")
                else:
                    with s.block(f"for e in T.vectorized({E}):"):
                        s(f"out[b, h, t0 + r, e] = {exp2(f'p[r, e] * {L2E}')}",
                          f"out[b, h, t0 + r, {E} + e] = {exp2(f'-p[r, e] * {L2E}')}")
    return s.text()


def _emit_lane_reduce(s: Script, E: int, V: int, ops, items) -> None:
    """``mx[c] = op_c over e < E of items_c(e)`` for c = 0, 1: ``V`` lanes at a time into ``part``, then across
    the lanes (a scalar chain over all E entries would wait on each op's latency)."""
    with s.block(f"for l in T.vectorized({V}):"):
        s(*(f"part[{c}, l] = {items[c]('l')}" for c in range(2)))
    with s.block(f"for e in range(1, {E // V}):"):
        with s.block(f"for l in T.vectorized({V}):"):
            s(*(f"part[{c}, l] = {ops[c](f'part[{c}, l]', items[c](f'e * {V} + l'))}" for c in range(2)))
    s(*(f"mx[{c}] = part[{c}, 0]" for c in range(2)))
    with s.block(f"for l in range(1, {V}):"):
        s(*(f"mx[{c}] = {ops[c](f'mx[{c}]', f'part[{c}, l]')}" for c in range(2)))
