"""The feature-map template: phi(x) of the linear branch into a [B, H, L, F] buffer.

Hedgehog maps project each token with a per-head weight, ``p = x W[h]`` (``W: [H, D, E]``), then
``hedgehog``: ``[softmax(p), softmax(-p)]`` (each over its E entries) or ``hedgehog_exp``:
``[exp(p), exp(-p)]``. Elementwise maps (identity / elu1 / relu) are cheap enough to be applied inline
by the linear kernel; they come here only when the window kernel of a ``shared`` hybrid needs them.
Training takes the hedgehog maps' vjp from ``feature_bwd_source`` (d x and d W; linear_train.Features).
"""

from __future__ import annotations

from dataclasses import dataclass

from lincomp.lower.tvmir.codegen import LOG2E, Script, divisor_at_most, emit_gemm_tile, exp2, f32, rows_that_fit
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
                    _emit_row_softmaxes(s, E, V, lambda e: f"out[b, h, t0 + r, {e}]",
                                        lambda e: f"out[b, h, t0 + r, {E} + {e}]")
                else:
                    with s.block(f"for e in T.vectorized({E}):"):
                        s(f"out[b, h, t0 + r, e] = {exp2(f'p[r, e] * {L2E}')}",
                          f"out[b, h, t0 + r, {E} + e] = {exp2(f'-p[r, e] * {L2E}')}")
    return s.text()


def _emit_row_softmaxes(s: Script, E: int, V: int, dst_a, dst_b) -> None:
    """``dst_a(e)`` = softmax(p[r])_e and ``dst_b(e)`` = softmax(-p[r])_e for the tile row r (uses part / mx)."""
    L2E = f32(LOG2E)
    s("# softmax(p) and softmax(-p) over the E entries (shifted by max p and min p)")
    _emit_lane_reduce(s, E, V, (lambda a, x: f"T.max({a}, {x})", lambda a, x: f"T.min({a}, {x})"),
                      (lambda e: f"p[r, {e}]", lambda e: f"p[r, {e}]"))
    with s.block(f"for e in T.vectorized({E}):"):
        s(f"{dst_a('e')} = {exp2(f'(p[r, e] - mx[0]) * {L2E}')}", f"{dst_b('e')} = {exp2(f'(mx[1] - p[r, e]) * {L2E}')}")
    s("# the two sums (then multiply by their reciprocals: 1 ulp, against a division per entry)")
    _emit_lane_reduce(s, E, V, (lambda a, x: f"{a} + {x}",) * 2, (dst_a, dst_b))
    s("mx[0] = T.float32(1) / mx[0]", "mx[1] = T.float32(1) / mx[1]")
    with s.block(f"for e in T.vectorized({E}):"):
        s(f"{dst_a('e')} = {dst_a('e')} * mx[0]", f"{dst_b('e')} = {dst_b('e')} * mx[1]")


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


TASK_ROWS = 256   # tokens per backward task: its d W partial sum is one [D, E] block (the host sums the blocks)


def feature_bwd_source(fmap: str, dims: FeatureDims, name: str = "features_bwd", lanes: int = 8) -> str:
    """TVMScript of ``name(x, w, wt, dout, dx, dwp)``: the vjp of a hedgehog map.

    x [B, Hx, L, D], w [H, D, E], wt [H, E, D] (w transposed), dout [B, H, L, 2E] (d phi) -> dx [B, H, L, D]
    (per output head: the caller sums a group of heads sharing an input head), dwp [B, H, NT, D, E] (d W[h] summed
    over each task's ``TASK_ROWS`` tokens, NT = ceil(L / TASK_ROWS): the caller sums over B and NT).

    Per tile of ``ROWS`` tokens: p = x W[h] again (cheaper than saving it), dp from d phi, dx = dp W[h]^T,
    d W[h] += x^T dp. With p_a = e^p, p_b = e^-p (hedgehog_exp: phi = [p_a, p_b]) or their softmaxes a, b
    (hedgehog): dp = dout_a p_a - dout_b p_b, or a (dout_a - dout_a . a) - b (dout_b - dout_b . b)."""
    Hx, H, D, E = dims.Hx, dims.H, dims.D, dims.E
    assert fmap in ("hedgehog", "hedgehog_exp"), fmap
    group = H // Hx
    L2E = f32(LOG2E)
    mr_p, mr_x, mr_w = _fit(ROWS, E, lanes), _fit(ROWS, D, lanes), _fit(D, E, lanes)
    s = Script()
    s("@T.prim_func")
    with s.block(f"def {name}(x_h: T.handle, w_h: T.handle, wt_h: T.handle, dout_h: T.handle, dx_h: T.handle, "
                 "dwp_h: T.handle):"):
        s(f'T.func_attr({{"global_symbol": "{name}", "tir.noalias": True}})')
        s("B = T.int32()", "L = T.int32()", "NT = T.int32()")
        s(f'x = T.match_buffer(x_h, (B, {Hx}, L, {D}), "float32")',
          f'w = T.match_buffer(w_h, ({H}, {D}, {E}), "float32")',
          f'wt = T.match_buffer(wt_h, ({H}, {E}, {D}), "float32")',
          f'dout = T.match_buffer(dout_h, (B, {H}, L, {2 * E}), "float32")',
          f'dx = T.match_buffer(dx_h, (B, {H}, L, {D}), "float32")',
          f'dwp = T.match_buffer(dwp_h, (B, {H}, NT, {D}, {E}), "float32")')
        s(f"# one task per (batch, head, {TASK_ROWS} tokens): its d W partial sum stays in a local block")
        with s.block(f"for task in T.parallel(B * {H} * NT):"):
            s(f"b = task // ({H} * NT)", f"h = task // NT % {H}", "tt = task % NT",
              f"hx = h // {group}" if group > 1 else "hx = h")
            s(f'p = T.alloc_buffer(({ROWS}, {E}), "float32")', f'dp = T.alloc_buffer(({ROWS}, {E}), "float32")',
              f'dw = T.alloc_buffer(({D}, {E}), "float32")')
            if fmap == "hedgehog":
                V = divisor_at_most(E, lanes)
                s(f'pa = T.alloc_buffer(({E},), "float32")', f'pb = T.alloc_buffer(({E},), "float32")',
                  f'part = T.alloc_buffer((2, {V}), "float32")', 'mx = T.alloc_buffer((2,), "float32")')
            with s.block(f"for d in range({D}):"):
                with s.block(f"for e in T.vectorized({E}):"):
                    s("dw[d, e] = T.float32(0)")
            with s.block(f"for tile in range({TASK_ROWS // ROWS}):"):
                s(f"t0 = tt * {TASK_ROWS} + tile * {ROWS}")
                with s.block("if t0 < L:"):
                    s("# p = x_tile @ W[h] (rows past L repeat row L - 1; their dp is 0)")
                    emit_gemm_tile(s, rows=ROWS, mr=mr_p, width=E, red=str(D),
                                   a=lambda r, x: f"x[b, hx, T.min(t0 + {r}, L - 1), {x}]",
                                   b=lambda x, w: f"w[h, {x}, {w}]", store=lambda r, w, val: f"p[{r}, {w}] = {val}")
                    with s.block(f"for r in range({ROWS}):"):
                        dout = lambda e, half: f"dout[b, h, T.min(t0 + r, L - 1), {half}{e}]"  # noqa: E731
                        if fmap == "hedgehog_exp":
                            with s.block(f"for e in T.vectorized({E}):"):
                                s(f"dp[r, e] = T.if_then_else(t0 + r < L, {dout('e', '')} * {exp2(f'p[r, e] * {L2E}')} - "
                                  f"{dout('e', f'{E} + ')} * {exp2(f'-p[r, e] * {L2E}')}, T.float32(0))")
                        else:
                            s("# a = softmax(p), b = softmax(-p), as the forward forms them")
                            _emit_row_softmaxes(s, E, V, lambda e: f"pa[{e}]", lambda e: f"pb[{e}]")
                            s("# the softmaxes' vjp: dout . a and dout . b")
                            _emit_lane_reduce(s, E, V, (lambda a, x: f"{a} + {x}",) * 2,
                                              (lambda e: f"{dout(e, '')} * pa[{e}]",
                                               lambda e: f"{dout(e, f'{E} + ')} * pb[{e}]"))
                            with s.block(f"for e in T.vectorized({E}):"):
                                s(f"dp[r, e] = T.if_then_else(t0 + r < L, pa[e] * ({dout('e', '')} - mx[0]) - "
                                  f"pb[e] * ({dout('e', f'{E} + ')} - mx[1]), T.float32(0))")
                    s("# dx = dp @ W[h]^T (rows inside L)")
                    emit_gemm_tile(s, rows=ROWS, mr=mr_x, width=D, red=str(E), a=lambda r, x: f"dp[{r}, {x}]",
                                   b=lambda x, w: f"wt[h, {x}, {w}]", guard=lambda r: f"t0 + {r} < L",
                                   store=lambda r, w, val: f"dx[b, h, t0 + {r}, {w}] = {val}")
                    s("# d W[h] += x_tile^T dp")
                    emit_gemm_tile(s, rows=D, mr=mr_w, width=E, red=str(ROWS),
                                   a=lambda r, x: f"x[b, hx, T.min(t0 + {x}, L - 1), {r}]",
                                   b=lambda x, w: f"dp[{x}, {w}]", init=lambda r, w: f"dw[{r}, {w}]",
                                   store=lambda r, w, val: f"dw[{r}, {w}] = {val}")
            with s.block(f"for d in range({D}):"):
                with s.block(f"for e in T.vectorized({E}):"):
                    s("dwp[b, h, tt, d, e] = dw[d, e]")
    return s.text()


def _fit(rows: int, width: int, lanes: int) -> int:
    """Rows of ``width``-float accumulators per micro-kernel step that fit the registers (a divisor of ``rows``)."""
    return divisor_at_most(rows, rows_that_fit(width, lanes))
