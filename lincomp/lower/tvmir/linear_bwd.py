"""The linear-branch backward template: gradients of the chunked (gated) scan from the saved chunk states.

One generated PrimFunc ``linear_bwd`` per variant (``B``, ``L`` symbolic); one task per (batch, head)
walks its chunks in reverse, carrying dT = dLoss / d(state entering the next chunk) -- the mirror of
the forward's S. The forward (linear.py, ``save_states``) stored ``Sc[c]``, the state entering chunk c,
so nothing of the forward runs again. With the normaliser the value rows carry one more column (a 1),
whose state column is z and whose output gradient is d den: one scan covers num and den.

Per chunk of C tokens (Gc: cumulative log-gate from the chunk start, every exponent below <= 0)::

    P[i, j]  = phi(q_i) . phi(k_j) * d_ij                 (j <= i; d_ij = e^(Gc_i - Gc_j), per feature)
    dA[i, j] = do_i . v_j                                  (j <= i)
    dphi(q_i) = sum_j dA[i, j] d_ij phi(k_j) + e^Gc_i (S_c do_i)
    dphi(k_j) = sum_i dA[i, j] d_ij phi(q_i) + e^(Gc_end - Gc_j) (dT v_j)
    dv_j      = sum_i P[i, j] do_i + (phi(k_j) e^(Gc_end - Gc_j)) dT
    dT       <- e^Gc_end dT + sum_i (phi(q_i) e^Gc_i)^T do_i

Scalar gates (and none) decay the C x C matrices; a vector gate factors d_ij through the chunk start
(two decayed operands, matmuls) while its chunk decays by less than e^60, and takes one exponential
per (pair, feature) beyond that. The gate's own gradient comes from the identity
dG_t = phi(q_t) . dphi(q_t) - phi(k_t) . dphi(k_t) (every pair decays by e^(G_i - G_j)): d g_s is the sum
of dG_t over t >= s, which the reverse walk accumulates (in float64) as it stores each row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lincomp.lower.tvmir.codegen import (LOG2E, TRANSPOSE_IMPORT, Script, check_config_int, divisor_at_most,
                                         emit_gemm_tile, emit_transpose, exp2, f32, rows_that_fit, tile_cols)
from lincomp.lower.tvmir.linear import FACTOR_LIMIT, GATE_FLOOR

L2E = f32(LOG2E)


@dataclass(frozen=True)
class LinearBwdConfig:
    """Schedule choices of the backward (tuning kernel name "linear_bwd"). ``chunk`` is also the chunk of
    the forward that saves the states in training, so both walk the same chunk boundaries."""

    chunk: int = 16
    mr: int = 4          # rows per micro-kernel step of the row-major products (width Dv; 16-column blocks on AVX2)

    def __post_init__(self):
        check_config_int(self.chunk, "linear_bwd.chunk", 16, 128, pow2=True)   # >= MIN_CHUNK of the saved states
        check_config_int(self.mr, "linear_bwd.mr", 1, 64)

    def to_dict(self) -> dict:
        return {"chunk": self.chunk, "mr": self.mr}

    @classmethod
    def from_dict(cls, d: dict) -> "LinearBwdConfig":
        return cls(**{k: d[k] for k in ("chunk", "mr") if k in d})


@dataclass(frozen=True)
class BwdDims:
    """Query heads H, value heads Hkv, heads of phi(k) HF, feature width F, value width Dv; ``aug``: the
    value rows carry the normaliser's column of ones (Dsv = Dv + 1)."""

    H: int
    Hkv: int
    HF: int
    F: int
    Dv: int
    aug: bool

    @property
    def Dsv(self) -> int:
        return self.Dv + int(self.aug)


def arg_names(gate: Optional[str]) -> list:
    """Arguments of ``linear_bwd`` (all float32, contiguous)."""
    return ["fq", "fk", "v"] + (["g"] if gate else []) + ["Sc", "do", "dfq", "dfk", "dv", "dS0"] + \
        (["dg"] if gate else [])


def linear_bwd_source(gate: Optional[str], dims: BwdDims, cfg: LinearBwdConfig, *, lanes: int = 16,
                      name: str = "linear_bwd", dv: bool = True) -> str:
    """TVMScript of ``name(fq, fk, v, [g], Sc, do, dfq, dfk, dv, dS0, [dg])``.

    fq [B, H, L, F], fk [B, HF, L, F], v [B, Hkv, L, Dv], g [B, H, L] or [B, H, L, F] (log-gates),
    Sc [B, H, NC, F, Dsv] (states entering each chunk), do [B, H, L, Dsv] (d num, and d den in the last
    column with the normaliser) -> dfq [B, H, L, F], dfk [B, H, L, F] (per query head), dv [B, H, L, Dv]
    (per query head), dS0 [B, H, F, Dsv] (the gradient of the state entering the sequence), dg like g.
    ``dv=False`` (no gradient of v is wanted: attention transfer with frozen projections): the scores P and
    the dv products are skipped and ``dv`` is left unwritten.
    """
    H, Hkv, HF, F, Dv, Dsv = dims.H, dims.Hkv, dims.HF, dims.F, dims.Dv, dims.Dsv
    C = cfg.chunk
    regs = 32 if lanes >= 16 else 16
    cols_v, cols_s = tile_cols(Dv, lanes), tile_cols(Dsv, lanes)   # column blocks of the width Dv / Dv(+1) products
    mr_v = divisor_at_most(C, min(cfg.mr, rows_that_fit(Dv, lanes, cols_v)))     # rows of width Dv (dv)
    mr_f = divisor_at_most(F, min(cfg.mr, rows_that_fit(Dsv, lanes, cols_s)))    # rows of width Dv(+1) (dT)
    mr_c = divisor_at_most(F, max(1, (regs - 6) // -(-C // lanes)))                  # rows of width C
    mr_cc = divisor_at_most(C, max(1, (regs - 6) // -(-C // lanes)))
    k = _K(C=C, F=F, Dv=Dv, Dsv=Dsv, gate=gate, mr_v=mr_v, mr_f=mr_f, mr_c=mr_c, mr_cc=mr_cc,
           fk_head="h" if HF == H else "hk", dv=dv, cols_v=cols_v, cols_s=cols_s,
           lanes=divisor_at_most(F, lanes), vl=lanes)
    s = Script()
    s("@T.prim_func")
    names = arg_names(gate)
    with s.block(f"def {name}({', '.join(f'{a}_h: T.handle' for a in names)}):"):
        s(f'T.func_attr({{"global_symbol": "{name}", "tir.noalias": True}})')
        s("B = T.int32()", "L = T.int32()", "NC = T.int32()")
        s(f'fq = T.match_buffer(fq_h, (B, {H}, L, {F}), "float32")',
          f'fk = T.match_buffer(fk_h, (B, {HF}, L, {F}), "float32")',
          f'v = T.match_buffer(v_h, (B, {Hkv}, L, {Dv}), "float32")')
        gshape = {"scalar": f"(B, {H}, L)", "vector": f"(B, {H}, L, {F})"}.get(gate)
        if gshape:
            s(f'g = T.match_buffer(g_h, {gshape}, "float32")')
        s(f'Sc = T.match_buffer(Sc_h, (B, {H}, NC, {F}, {Dsv}), "float32")',
          f'do = T.match_buffer(do_h, (B, {H}, L, {Dsv}), "float32")',
          f'dfq = T.match_buffer(dfq_h, (B, {H}, L, {F}), "float32")',
          f'dfk = T.match_buffer(dfk_h, (B, {H}, L, {F}), "float32")',
          f'dv = T.match_buffer(dv_h, (B, {H}, L, {Dv}), "float32")',
          f'dS0 = T.match_buffer(dS0_h, (B, {H}, {F}, {Dsv}), "float32")')
        if gshape:
            s(f'dg = T.match_buffer(dg_h, {gshape}, "float32")')
        s("# one task per (batch, head); its chunks run last to first, carrying dT")
        with s.block(TRANSPOSE_IMPORT), s.block(f"for task in T.parallel(B * {H}):"):
            group = H // Hkv
            s(f"b = task // {H}", f"h = task % {H}", f"hk = h // {group}" if group > 1 else "hk = h")
            Fg = F if gate == "vector" else 1
            bufs = [("dT", (F, Dsv)), ("dd", (C,)), ("kc", (C, F)), ("qT", (F, C)), ("vcT", (Dsv, C)), ("dcT", (Dsv, C)),
                    ("PT", (C, C)), ("dA", (C, C)), ("dAT", (C, C)), ("tq", (F, C)), ("tk", (F, C)),
                    ("tqr", (C, F)), ("tkr", (C, F))]
            if gate is not None:
                bufs += [("Gc", (C, Fg)), ("GT", (Fg, C)), ("decay", (Fg,)), ("qdT", (F, C)), ("ke", (C, F)),
                         ("kend", (C, Fg))]
            if gate == "vector":
                bufs += [("eqT", (F, C)), ("eqr", (C, F)), ("kd", (C, F)), ("ek", (C, F))]
            elif gate == "scalar":
                bufs += [("eq", (C,)), ("Dm", (C, C)), ("dceT", (Dsv, C))]
            for buf, shape in bufs:
                s(f'{buf} = T.alloc_buffer({shape}, "float32")')
            if gate == "vector":
                s('small = T.alloc_buffer((1,), "int32")')
            if gate == "scalar":
                s(f'gpart = T.alloc_buffer(({k.lanes},), "float64")')
            if gate is not None:
                s(f'gacc = T.alloc_buffer(({Fg},), "float64")', f'grow = T.alloc_buffer(({F},), "float32")')
                with s.block(f"for f in range({Fg}):"):
                    s("gacc[f] = T.float64(0)")
            with s.block(f"for f in range({F}):"):
                with s.block(f"for w in T.vectorized({Dsv}):"):
                    s("dT[f, w] = T.float32(0)")
            nch = f"(L + {C - 1}) // {C}"
            with s.block(f"for cc in range({nch}):"):
                s(f"c = {nch} - 1 - cc", f"c0 = c * {C}")
                _emit_loads(s, k)
                if gate is not None:
                    _emit_gates(s, k)
                if gate == "vector":
                    with s.block("if small[0] == 1:"):
                        _emit_vector_factored(s, k)
                    with s.block("else:"):
                        _emit_vector_exact(s, k)
                else:
                    _emit_matrix_decay(s, k)
                _emit_dv_and_state(s, k)
            with s.block(f"for f in range({F}):"):
                with s.block(f"for w in T.vectorized({Dsv}):"):
                    s("dS0[b, h, f, w] = dT[f, w]")
    return s.text()


@dataclass(frozen=True)
class _K:
    C: int
    F: int
    Dv: int
    Dsv: int
    gate: Optional[str]
    mr_v: int
    mr_f: int
    mr_c: int
    mr_cc: int
    fk_head: str
    dv: bool = True
    cols_v: Optional[int] = None
    cols_s: Optional[int] = None
    lanes: int = 8           # partial sums of the scalar gate's gradient (F must be a multiple)
    vl: int = 16             # the target's vector lanes (register-transpose blocks)


def _emit_loads(s, k: _K) -> None:
    """kc = phi(k) rows, qT = phi(q) transposed, vcT / dcT = v (with the column of ones) / do transposed;
    rows past L are zero, so every product below needs no further bound. Whole chunks load unguarded."""
    for full in (True, False):
        with s.block(f"if c0 + {k.C} <= L:" if full else "else:"):
            _emit_load_rows(s, k, full)
    if k.Dsv > k.Dv:
        with s.block(f"for r in T.vectorized({k.C}):"):
            s(f"vcT[{k.Dv}, r] = T.if_then_else(c0 + r < L, T.float32(1), T.float32(0))")


def _emit_load_rows(s, k: _K, full: bool) -> None:
    C, F, Dv, Dsv = k.C, k.F, k.Dv, k.Dsv
    if full:   # whole chunks: transposed in registers
        with s.block(f"for r in range({C}):"):
            with s.block(f"for f in T.vectorized({F}):"):
                s(f"kc[r, f] = fk[b, {k.fk_head}, c0 + r, f]")
        for dst, src, rows in (("qT", "fq[b, h, c0 + {}, {}]", F), ("vcT", "v[b, hk, c0 + {}, {}]", Dv),
                               ("dcT", "do[b, h, c0 + {}, {}]", Dsv)):
            emit_transpose(s, rows=rows, cols=C, dst=lambda i, j, d=dst: f"{d}[{i}, {j}]",
                           src=lambda i, j, t=src: t.format(i, j), dst_stride=C, src_stride=rows, lanes=k.vl)
        return

    def load(src: str) -> str:
        if full:
            return src.format(row="c0 + r")
        return f"T.if_then_else(c0 + r < L, {src.format(row='T.min(c0 + r, L - 1)')}, T.float32(0))"
    with s.block(f"for r in range({C}):"):
        with s.block(f"for f in T.vectorized({F}):"):
            s(f"kc[r, f] = {load('fk[b, ' + k.fk_head + ', {row}, f]')}")
    for dst, src, rows in (("qT", "fq[b, h, {row}, f]", F), ("vcT", "v[b, hk, {row}, f]", Dv),
                           ("dcT", "do[b, h, {row}, f]", Dsv)):
        with s.block(f"for f in range({rows}):"):
            with s.block(f"for r in T.vectorized({C}):"):
                s(f"{dst}[f, r] = {load(src)}")


def _emit_gates(s, k: _K) -> None:
    """Gc = cumulative log-gate from the chunk start (each gate floored as in the forward; 0 past L),
    GT its transpose, decay = e^Gc_end, kend = e^(Gc_end - Gc_j), qdT = phi(q) e^Gc, ke = phi(k) kend."""
    C, F, gate = k.C, k.F, k.gate
    Fg = F if gate == "vector" else 1
    gt = (lambda r: f"g[b, h, {r}, f]") if gate == "vector" else (lambda r: f"g[b, h, {r}]")
    gc = lambda r: f"T.max({gt(r)}, T.float32({GATE_FLOOR}))"  # noqa: E731
    with s.block(f"for f in T.vectorized({Fg}):"):
        s(f"Gc[0, f] = {gc('c0')}")
    with s.block(f"for r in range(1, {C}):"):
        with s.block(f"for f in T.vectorized({Fg}):"):
            s(f"Gc[r, f] = Gc[r - 1, f] + T.if_then_else(c0 + r < L, {gc('T.min(c0 + r, L - 1)')}, T.float32(0))")
    if gate == "vector":
        emit_transpose(s, rows=F, cols=C, dst=lambda i, j: f"GT[{i}, {j}]", src=lambda i, j: f"Gc[{i}, {j}]",
                       dst_stride=C, src_stride=F, lanes=k.vl)
    else:
        with s.block(f"for r in T.vectorized({C}):"):
            s("GT[0, r] = Gc[r, 0]")
    with s.block(f"for f in T.vectorized({Fg}):"):
        s(f"decay[f] = {exp2(f'Gc[{C - 1}, f] * {L2E}')}")
    with s.block(f"for r in range({C}):"):
        with s.block(f"for f in T.vectorized({Fg}):"):
            s(f"kend[r, f] = {exp2(f'(Gc[{C - 1}, f] - Gc[r, f]) * {L2E}')}")
    fg = "f" if gate == "vector" else "0"
    with s.block(f"for r in range({C}):"):
        with s.block(f"for f in T.vectorized({F}):"):
            s(f"ke[r, f] = kc[r, f] * kend[r, {fg}]")
    if gate == "vector":   # e^Gc row by row (the stores' factor), transposed for the decayed queries
        with s.block(f"for r in range({C}):"):
            with s.block(f"for f in T.vectorized({F}):"):
                s(f"eqr[r, f] = {exp2(f'Gc[r, f] * {L2E}')}")
        emit_transpose(s, rows=F, cols=C, dst=lambda i, j: f"eqT[{i}, {j}]", src=lambda i, j: f"eqr[{i}, {j}]",
                       dst_stride=C, src_stride=F, lanes=k.vl)
        with s.block(f"for f in range({F}):"):
            with s.block(f"for r in T.vectorized({C}):"):
                s("qdT[f, r] = qT[f, r] * eqT[f, r]")
        s("small[0] = 1")
        with s.block(f"for f in range({F}):"):
            with s.block(f"if Gc[{C - 1}, f] < T.float32({FACTOR_LIMIT}):"):
                s("small[0] = 0")
    else:
        with s.block(f"for r in T.vectorized({C}):"):
            s(f"eq[r] = {exp2(f'GT[0, r] * {L2E}')}")
        with s.block(f"for f in range({F}):"):
            with s.block(f"for r in T.vectorized({C}):"):
                s("qdT[f, r] = qT[f, r] * eq[r]")


def _mask(s, buf: str, C: int, row_is_key: bool) -> None:
    """Zero the non-causal half of a C x C buffer (``row_is_key``: buf[j, i], else buf[i, j])."""
    cond = "r <= x" if row_is_key else "x <= r"
    with s.block(f"for r in range({C}):"):
        with s.block(f"for x in T.vectorized({C}):"):
            s(f"{buf}[r, x] = T.if_then_else({cond}, {buf}[r, x], T.float32(0))")


def _mask_dA(s, k: _K) -> None:
    """dA strictly causal (j < i), its diagonal do_i . v_i kept apart in dd: the pairs (i, i) do not decay,
    so their terms of dphi(q_i), dphi(k_i) are added at the store, outside the gate identity (whose two
    halves would otherwise cancel them, leaving fp32 noise where strong gates make d g small)."""
    with s.block(f"for r in range({k.C}):"):
        s("dd[r] = dA[r, r]")
        with s.block(f"for x in T.vectorized({k.C}):"):
            s("dA[r, x] = T.if_then_else(x < r, dA[r, x], T.float32(0))")


def _emit_scores(s, k: _K, kbuf: str, qbuf: str) -> None:
    """PT[j, i] = kbuf[j] . qbuf[:, i] and dA[i, j] = do_i . v_j (both unmasked), dense C x C products."""
    C, F, Dsv = k.C, k.F, k.Dsv
    if k.dv:   # P feeds dv alone
        emit_gemm_tile(s, rows=C, mr=k.mr_cc, width=C, red=str(F), a=lambda r, x: f"{kbuf}[{r}, {x}]",
                       b=lambda x, w: f"{qbuf}[{x}, {w}]", store=lambda r, w, val: f"PT[{r}, {w}] = {val}")
    emit_gemm_tile(s, rows=C, mr=k.mr_cc, width=C, red=str(Dsv), a=lambda r, x: f"dcT[{x}, {r}]",
                   b=lambda x, w: f"vcT[{x}, {w}]", store=lambda r, w, val: f"dA[{r}, {w}] = {val}")


def _transpose_dA(s, k: _K) -> None:
    with s.block(f"for r in range({k.C}):"):
        with s.block(f"for x in T.vectorized({k.C}):"):
            s("dAT[r, x] = dA[x, r]")


def _emit_store_grads(s, k: _K, qfactor: Optional[str] = None, kfactor: Optional[str] = None) -> None:
    """dfq / dfk rows inside L from tq / tk (transposed back to rows, times a per-(row, feature) factor); with a
    gate, d g by the reverse cumulative sum of dG_t = phi(q_t) . dphi(q_t) - phi(k_t) . dphi(k_t) (float64),
    0 for a gate under the floor (the kernels never saw it)."""
    for t in ("tq", "tk"):
        emit_transpose(s, rows=k.C, cols=k.F, dst=lambda i, j, t=t: f"{t}r[{i}, {j}]", src=lambda i, j, t=t: f"{t}[{i}, {j}]",
                       dst_stride=k.F, src_stride=k.C, lanes=k.vl)
    n = f"T.min({k.C}, L - c0)"
    with s.block(f"for rr in range({n}):"):
        s(f"r = {n} - 1 - rr")   # last row first: the sum runs from the sequence's end
        with s.block(f"for f in T.vectorized({k.F}):"):
            off = {out: f"{buf}[r, f]" + (f" * {fac}" if fac else "")
                   for out, buf, fac in (("dfq", "tqr", qfactor), ("dfk", "tkr", kfactor))}
            s(f"dfq[b, h, c0 + r, f] = {off['dfq']} + dd[r] * kc[r, f]",
              f"dfk[b, h, c0 + r, f] = {off['dfk']} + dd[r] * fq[b, h, c0 + r, f]")
            if k.gate is not None:   # the identity over the decaying pairs only (see _mask_dA)
                s(f"grow[f] = fq[b, h, c0 + r, f] * ({off['dfq']}) - kc[r, f] * ({off['dfk']})")
        if k.gate == "vector":
            with s.block(f"for f in T.vectorized({k.F}):"):
                s("gacc[f] = gacc[f] + T.Cast(\"float64\", grow[f])")
                s(f"dg[b, h, c0 + r, f] = T.if_then_else(g[b, h, c0 + r, f] < T.float32({GATE_FLOOR}), T.float32(0), "
                  "T.Cast(\"float32\", gacc[f]))")
        elif k.gate == "scalar":
            # the row's sum over features in lanes of float64 partial sums (no serial chain of F adds per row),
            # then one add into the running sum
            with s.block(f"for l in T.vectorized({k.lanes}):"):
                s("gpart[l] = T.Cast(\"float64\", grow[l])")
            with s.block(f"for f8 in range(1, {k.F // k.lanes}):"):
                with s.block(f"for l in T.vectorized({k.lanes}):"):
                    s(f"gpart[l] = gpart[l] + T.Cast(\"float64\", grow[f8 * {k.lanes} + l])")
            s("gacc[0] = gacc[0] + (" + " + ".join(f"gpart[{l}]" for l in range(k.lanes)) + ")")
            s(f"dg[b, h, c0 + r] = T.if_then_else(g[b, h, c0 + r] < T.float32({GATE_FLOOR}), T.float32(0), "
              "T.Cast(\"float32\", gacc[0]))")


def _state_a(k: _K, scale: bool):
    """a(f, w) of the products with the carried states: S_c from Sc, or dT (times decay_f with ``scale``)."""
    return lambda r, x: f"dT[{r}, {x}] * decay[{r}]" if scale else f"dT[{r}, {x}]"


def _emit_matrix_decay(s, k: _K) -> None:
    """No gate or a scalar one: the decay d_ij is one number per pair, applied to the C x C matrices."""
    C, Dsv, gate = k.C, k.Dsv, k.gate
    _emit_scores(s, k, "kc", "qT")
    if gate == "scalar":
        s("# d_ij = e^(Gc_i - Gc_j) on j <= i (Dm[j, i]), applied to the scores and to dA")
        with s.block(f"for r in range({C}):"):
            with s.block(f"for x in T.vectorized({C}):"):
                s(f"Dm[r, x] = T.if_then_else(r <= x, {exp2(f'T.min(GT[0, x] - GT[0, r], T.float32(0)) * {L2E}')}, "
                  "T.float32(0))")
                if k.dv:
                    s("PT[r, x] = PT[r, x] * Dm[r, x]")
        with s.block(f"for r in range({C}):"):
            s("dd[r] = dA[r, r]")   # the diagonal apart, as _mask_dA does
            with s.block(f"for x in T.vectorized({C}):"):
                s("dA[r, x] = T.if_then_else(x < r, dA[r, x] * Dm[x, r], T.float32(0))")
        _transpose_dA(s, k)
        s("# do decayed from the chunk start (the state term of dphi(q)); v decayed to the chunk end (of dphi(k))")
        with s.block(f"for w in range({Dsv}):"):
            with s.block(f"for r in T.vectorized({C}):"):
                s("dceT[w, r] = dcT[w, r] * eq[r]", "vcT[w, r] = vcT[w, r] * kend[r, 0]")
        dce = "dceT"
    else:
        if k.dv:
            _mask(s, "PT", C, row_is_key=True)
        _mask_dA(s, k)
        _transpose_dA(s, k)
        dce = "dcT"
    _emit_feature_grads(s, k, "kc", "qT", dce, scaled=False)
    _emit_store_grads(s, k)


def _emit_feature_grads(s, k: _K, kbuf: str, qbuf: str, dce: str, scaled: bool) -> None:
    """tq = dphi(q)^T = kbuf^T dA^T (pairs) + S_c dce (the state entering the chunk), tk = dphi(k)^T =
    qbuf dA + dT vcT (dT times the chunk's decay with ``scaled``); factors of rows x features come at the store."""
    C, F, Dsv = k.C, k.F, k.Dsv
    s("# tq = dphi(q)^T: intra-chunk pairs + the state entering the chunk; tk = dphi(k)^T: pairs + dT")
    emit_gemm_tile(s, rows=F, mr=k.mr_c, width=C,
                   terms=[(str(C), lambda r, x: f"{kbuf}[{x}, {r}]", lambda x, w: f"dAT[{x}, {w}]"),
                          (str(Dsv), lambda r, x: f"Sc[b, h, c, {r}, {x}]", lambda x, w: f"{dce}[{x}, {w}]")],
                   store=lambda r, w, val: f"tq[{r}, {w}] = {val}")
    emit_gemm_tile(s, rows=F, mr=k.mr_c, width=C,
                   terms=[(str(C), lambda r, x: f"{qbuf}[{r}, {x}]", lambda x, w: f"dA[{x}, {w}]"),
                          (str(Dsv), _state_a(k, scaled), lambda x, w: f"vcT[{x}, {w}]")],
                   store=lambda r, w, val: f"tk[{r}, {w}] = {val}")


def _emit_vector_factored(s, k: _K) -> None:
    """Vector gate, chunk decay above e^-60: d_ij = e^Gc_i e^-Gc_j factors into decayed operands."""
    C, F = k.C, k.F
    s("# keys decayed from the chunk start (e^-Gc <= e^60: exact in fp32)")
    with s.block(f"for r in range({C}):"):
        with s.block(f"for f in T.vectorized({F}):"):
            s(f"ek[r, f] = {exp2(f'-Gc[r, f] * {L2E}')}", "kd[r, f] = kc[r, f] * ek[r, f]")
    _emit_scores(s, k, "kd", "qdT")
    if k.dv:
        _mask(s, "PT", C, row_is_key=True)
    _mask_dA(s, k)
    _transpose_dA(s, k)
    _emit_feature_grads(s, k, "kd", "qdT", "dcT", scaled=True)
    _emit_store_grads(s, k, qfactor="eqr[r, f]", kfactor="ek[r, f]")


def _emit_vector_exact(s, k: _K) -> None:
    """Vector gate, any strength: one exponential per (pair, feature), every exponent <= 0."""
    C, F, Dsv = k.C, k.F, k.Dsv
    dec = lambda i, j: exp2(f"T.min(GT[f, {i}] - GT[f, {j}], T.float32(0)) * {L2E}")  # noqa: E731
    if k.dv:
        s("# strong decay: scores with a per-feature exponential per pair")
        with s.block(f"for r in range({C}):"):
            with s.block(f"for x in T.vectorized({C}):"):
                s("PT[r, x] = T.float32(0)")
            with s.block(f"for f in range({F}):"):
                with s.block(f"for x in T.vectorized({C}):"):
                    s(f"PT[r, x] = PT[r, x] + T.if_then_else(r <= x, kc[r, f] * qT[f, x] * {dec('x', 'r')}, "
                      "T.float32(0))")
    emit_gemm_tile(s, rows=C, mr=k.mr_cc, width=C, red=str(Dsv), a=lambda r, x: f"dcT[{x}, {r}]",
                   b=lambda x, w: f"vcT[{x}, {w}]", store=lambda r, w, val: f"dA[{r}, {w}] = {val}")
    _mask_dA(s, k)
    _transpose_dA(s, k)
    s("# state terms, decayed per feature (e^Gc_i, e^(Gc_end - Gc_j) <= 1), then the pairs")
    emit_gemm_tile(s, rows=F, mr=k.mr_c, width=C, red=str(Dsv), a=lambda r, x: f"Sc[b, h, c, {r}, {x}]",
                   b=lambda x, w: f"dcT[{x}, {w}]", store=lambda r, w, val: f"tq[{r}, {w}] = {val} * eqT[{r}, {w}]")
    emit_gemm_tile(s, rows=F, mr=k.mr_c, width=C, red=str(Dsv), a=_state_a(k, False),
                   b=lambda x, w: f"vcT[{x}, {w}]", store=lambda r, w, val: f"tk[{r}, {w}] = {val}")
    with s.block(f"for f in range({F}):"):
        with s.block(f"for x in T.vectorized({C}):"):
            s("tk[f, x] = tk[f, x] * kend[x, f]")
        with s.block(f"for j in range({C}):"):
            with s.block(f"for x in T.vectorized({C}):"):
                s(f"tq[f, x] = tq[f, x] + T.if_then_else(j <= x, kc[j, f] * dAT[j, x] * {dec('x', 'j')}, T.float32(0))")
        with s.block(f"for i in range({C}):"):
            with s.block(f"for x in T.vectorized({C}):"):
                s(f"tk[f, x] = tk[f, x] + T.if_then_else(x <= i, qT[f, i] * dA[i, x] * {dec('i', 'x')}, T.float32(0))")
    _emit_store_grads(s, k)


def _emit_dv_and_state(s, k: _K) -> None:
    """dv_j = sum_i P[i, j] do_i + ke_j dT (rows inside L), then dT <- decay dT + qd^T do."""
    C, F, Dv, Dsv, gate = k.C, k.F, k.Dv, k.Dsv, k.gate
    ke = "ke" if gate is not None else "kc"
    qd = "qdT" if gate is not None else "qT"
    do_row = lambda x, w: f"do[b, h, T.min(c0 + {x}, L - 1), {w}]"  # noqa: E731  (rows past L meet zeros)
    if k.dv:
        s("# dv = P^T do + (phi(k) decayed to the chunk end) dT")
        emit_gemm_tile(s, rows=C, mr=k.mr_v, width=Dv,
                       terms=[(str(C), lambda r, x: f"PT[{r}, {x}]", do_row),
                              (str(F), lambda r, x: f"{ke}[{r}, {x}]", lambda x, w: f"dT[{x}, {w}]")],
                       store=lambda r, w, val: f"dv[b, h, c0 + {r}, {w}] = {val}", guard=lambda r: f"c0 + {r} < L",
                       cols=k.cols_v)
    s("# dT <- decay dT + (phi(q) decayed from the chunk start)^T do: the gradient of the state entering c")
    dec = (lambda r: f"decay[{r}]") if gate == "vector" else (lambda r: "decay[0]")
    emit_gemm_tile(s, rows=F, mr=k.mr_f, width=Dsv, red=str(C), a=lambda r, x: f"{qd}[{r}, {x}]", b=do_row,
                   init=(lambda r, w: f"dT[{r}, {w}] * {dec(r)}") if gate else (lambda r, w: f"dT[{r}, {w}]"),
                   store=lambda r, w, val: f"dT[{r}, {w}] = {val}", cols=k.cols_s)
