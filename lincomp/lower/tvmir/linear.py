"""The linear-branch template: chunked (gated) linear attention with the state carried between chunks.

One generated PrimFunc ``linear_fwd`` per variant; ``B`` and ``L`` are symbolic. One task per
(batch, head) runs its chunks in order (docs/semantics.md section 2, the form of reference/linear.py)::

    per chunk of C tokens (features phi(q), phi(k) loaded once; elementwise maps applied on load):
        Gc      = cumulative log-gate inside the chunk (<= 0)
        aT[j,i] = phi(k_j) . phi(q_i) * d_ij  for j <= i        (d_ij = 2^((Gc_i - Gc_j) log2 e))
        o_i     = sum_j aT[j,i] v_j + (phi(q_i) * 2^(Gc_i log2 e)) S           (intra + inter)
        den_i   = sum_j aT[j,i]     + (phi(q_i) * 2^(Gc_i log2 e)) . z
        S       = 2^(Gc_end log2 e) S + sum_j (phi(k_j) 2^((Gc_end - Gc_j) log2 e))^T v_j   (z alike)

Every exponent is <= 0, so no gate strength overflows. Vector gates split the chunk into sub-chunks:
pairs in different sub-chunks factor through the boundary between them (two matmuls), pairs inside
one sub-chunk take one exponential per feature (as flash-linear-attention's chunk_gla does).
Non-causal specs (no gate, no state) sum the whole sequence into S, z first, then read them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lincomp.lower.tvmir.codegen import (LOG2E, NEG_INF, TRANSPOSE_IMPORT, Script, check_config_int, divisor_at_most,
                                         emit_gemm_tile, emit_transpose, exp2, f32, rows_that_fit, tile_cols)
from lincomp.spec import AttentionSpec

INLINE_MAPS = ("identity", "elu1", "relu")
# A chunk whose cumulative log-gate stays above this (every feature) factors exactly through its start:
# 2^(-G_j log2 e) <= e^60 and 2^(G_i log2 e) >= e^-60 stay inside fp32's normal range.
FACTOR_LIMIT = -60.0
# A log-gate below this is a full reset: e^-40 = 4e-18 is far under fp32's resolution (6e-8), so flooring a
# gate here changes no output bit that matters, while a -1e4 gate would make the fp32 cumulative sums of a
# chunk so large that their differences (the decays between later tokens) lose 3 digits (issue 19).
GATE_FLOOR = -40.0


@dataclass(frozen=True)
class LinearConfig:
    """Schedule choices of the linear template (the tuning space)."""

    chunk: int = 64          # tokens per chunk (the math does not depend on it)
    sub_chunk: int = 16      # vector gates: pairs inside a sub-chunk use per-feature exponentials
    mr: int = 4              # rows per micro-kernel step

    def __post_init__(self):
        check_config_int(self.chunk, "linear.chunk", 1, 512, pow2=True)
        check_config_int(self.sub_chunk, "linear.sub_chunk", 1, 512, pow2=True)
        check_config_int(self.mr, "linear.mr", 1, 64)

    def to_dict(self) -> dict:
        return {"chunk": self.chunk, "sub_chunk": self.sub_chunk, "mr": self.mr}

    @classmethod
    def from_dict(cls, d: dict) -> "LinearConfig":
        return cls(**{k: d[k] for k in ("chunk", "sub_chunk", "mr") if k in d})


@dataclass(frozen=True)
class LinearDims:
    """Static sizes: query heads, key/value heads, head dims, feature width, heads of phi(k)."""

    H: int
    Hkv: int
    D: int
    Dv: int
    F: int
    HF: int            # heads of the key features buffer (H with per-head weights, else Hkv)


def inline_features(spec: AttentionSpec) -> bool:
    """Elementwise maps are applied while loading q / k; hedgehog maps come precomputed."""
    return spec.linear.feature_map in INLINE_MAPS


def arg_names(spec: AttentionSpec, *, mode: str, initial_state: bool, return_state: bool,
              save_states: bool = False, precomputed: bool = False) -> list:
    """Arguments of ``linear_fwd``. ``mode``: "o" (the branch output) or "numden" (shared hybrid, and the
    normalised branch in training); ``save_states``: the state entering each chunk, for the backward;
    ``precomputed``: phi(q), phi(k) come as inputs even for an elementwise map (shared_lag.py's scans)."""
    names = ["q", "k"] if inline_features(spec) and not precomputed else ["fq", "fk"]
    names.append("v")
    if spec.linear.gate is not None:
        names += ["g", "gcheck"]
    if initial_state:
        names += ["S0", "z0"]
    names += ["num", "den"] if mode == "numden" else ["o"]
    if return_state:
        names += ["S_out", "z_out"]
    if save_states:
        names.append("Sc")
    return names + ["linear_scale"]


def phi_expr(fmap: str, x: str) -> str:
    """phi(x) of an elementwise feature map as a TVMScript expression."""
    if fmap == "identity":
        return x
    if fmap == "relu":
        return f"T.max({x}, T.float32(0))"
    if fmap == "elu1":   # elu(x) + 1 = x + 1 (x > 0), e^x (x <= 0)
        return f"T.if_then_else({x} > T.float32(0), {x} + T.float32(1), {exp2(f'{x} * {f32(LOG2E)}')})"
    raise ValueError(fmap)


def linear_source(spec: AttentionSpec, dims: LinearDims, cfg: LinearConfig, *, mode: str = "o",
                  initial_state: bool = False, return_state: bool = False, save_states: bool = False,
                  precomputed: bool = False, reverse: bool = False, key_shift: int = 0, key_first: int = 0,
                  accumulate_from: Optional[int] = None, name: str = "linear_fwd", lanes: int = 16) -> str:
    """TVMScript of the chunked linear kernel for ``spec`` (``lanes``: fp32 lanes of a vector register).

    ``save_states`` (causal only) adds ``Sc [B, H, NC, F, Dv (+1)]``: the state entering each of the NC
    chunks, with z as its last column when the denominators are formed (what linear_bwd.py reads).
    ``reverse`` (causal, no gate or state): the scan runs from the last row to the first, so row i sums the rows
    after it (shared_lag.py's side after the window).
    ``key_shift`` / ``key_first`` (precomputed features): scan position t pairs with the key and value of
    sequence row ``row(t) + key_shift``, and with none where that row is outside ``[key_first, L)`` (the lagged
    scans of shared_lag.py, without shifted copies). ``accumulate_from`` (numden): num / den rows at or after it
    are added to, the rows before it are left as they are (the second of two scans summing into one buffer)."""
    lin = spec.linear
    H, Hkv, D, Dv, F, HF = dims.H, dims.Hkv, dims.D, dims.Dv, dims.F, dims.HF
    C = cfg.chunk
    group = H // Hkv
    causal, gate, normalize = spec.causal, lin.gate, lin.normalize
    den = normalize or mode == "numden"           # the denominators phi(q) . z are needed
    keep_z = den or return_state                  # z is carried
    inline = inline_features(spec) and not precomputed
    cs = divisor_at_most(C, cfg.sub_chunk)
    # score blocks: one vector of queries with 32 registers (16 rows of accumulators), two with 16 (AVX2: 4 rows
    # x 2 vectors share each loaded operand; one-vector blocks of 8 rows need a broadcast per FMA)
    sb = 2 * lanes if lanes < 16 else lanes
    cols = tile_cols(Dv, lanes)                           # products of width Dv run in column blocks (AVX2)
    rows_fit = rows_that_fit(Dv, lanes, cols)             # accumulator rows of width Dv (or its block) that fit
    mr = divisor_at_most(C, min(cfg.mr, rows_fit))
    mr_f = divisor_at_most(F, min(cfg.mr, rows_fit))
    names = arg_names(spec, mode=mode, initial_state=initial_state, return_state=return_state,
                      save_states=save_states, precomputed=precomputed)
    assert causal or (gate is None and not initial_state and not return_state and not save_states)
    assert not reverse or (causal and gate is None and not initial_state and not return_state and not save_states)
    assert accumulate_from is None or mode == "numden"
    k = _Ctx(C=C, F=F, Dv=Dv, cs=cs, mr=mr, mr_f=mr_f, cols=cols, score_block=sb, mr_scores=rows_that_fit(sb, lanes),
             gate=gate, den=den, keep_z=keep_z, lanes=lanes, reverse=reverse, key_shift=key_shift,
             key_first=key_first, accumulate_from=accumulate_from)
    assert not k.lagged or (causal and precomputed and not save_states)

    s = Script()
    s("@T.prim_func")
    params = ", ".join(f"{a}: T.float32" if a == "linear_scale" else f"{a}_h: T.handle" for a in names)
    with s.block(f"def {name}({params}):"):
        s(f'T.func_attr({{"global_symbol": "{name}", "tir.noalias": True}})')
        s("B = T.int32()", "L = T.int32()")
        if inline:
            s(f'q = T.match_buffer(q_h, (B, {H}, L, {D}), "float32")',
              f'k = T.match_buffer(k_h, (B, {Hkv}, L, {D}), "float32")')
        else:
            s(f'fq = T.match_buffer(fq_h, (B, {H}, L, {F}), "float32")',
              f'fk = T.match_buffer(fk_h, (B, {HF}, L, {F}), "float32")')
        s(f'v = T.match_buffer(v_h, (B, {Hkv}, L, {Dv}), "float32")')
        if gate == "scalar":
            s(f'g = T.match_buffer(g_h, (B, {H}, L), "float32")')
        elif gate == "vector":
            s(f'g = T.match_buffer(g_h, (B, {H}, L, {F}), "float32")')
        if initial_state:
            s(f'S0 = T.match_buffer(S0_h, (B, {H}, {F}, {Dv}), "float32")',
              f'z0 = T.match_buffer(z0_h, (B, {H}, {F}), "float32")')
        if mode == "numden":
            s(f'num = T.match_buffer(num_h, (B, {H}, L, {Dv}), "float32")',
              f'den = T.match_buffer(den_h, (B, {H}, L), "float32")')
        else:
            s(f'o = T.match_buffer(o_h, (B, {H}, L, {Dv}), "float32")')
        if return_state:
            s(f'S_out = T.match_buffer(S_out_h, (B, {H}, {F}, {Dv}), "float32")',
              f'z_out = T.match_buffer(z_out_h, (B, {H}, {F}), "float32")')
        if gate is not None:
            s(f'gcheck = T.match_buffer(gcheck_h, (B * {H},), "float32")')
        if save_states:
            s("NC = T.int32()", f'Sc = T.match_buffer(Sc_h, (B, {H}, NC, {F}, {Dv + int(den)}), "float32")')
        s("# one task per (batch, head); its chunks run in order")
        with s.block(TRANSPOSE_IMPORT), s.block(f"for task in T.parallel(B * {H}):"):
            s(f"b = task // {H}", f"h = task % {H}", f"hk = h // {group}" if group > 1 else "hk = h")
            fk_head = "h" if HF == H else "hk"
            Fg = k.Fg
            bufs = [("S", f"({F}, {Dv})"), ("qT", f"({F}, {C})"), ("qr", f"({C}, {F})"), ("kc", f"({C}, {F})"),
                    ("aT", f"({C}, {C})")]
            if keep_z:
                bufs.append(("z", f"({F},)"))
            if den:
                bufs.append(("dc", f"({C},)"))
            if gate is not None:
                bufs += [("Gc", f"({C}, {Fg})"), ("GT", f"({Fg}, {C})"), ("decay", f"({Fg},)"),
                         ("eq", f"({C}, {Fg})"), ("kd", f"({C}, {F})")]
                if gate == "scalar":
                    bufs.append(("ek", f"({C},)"))
            if gate == "vector":
                bufs.append(("qd", f"({F}, {C})"))
            if k.lagged:
                bufs.append(("vc", f"({C}, {Dv})"))
            for buf, shape in bufs:
                s(f'{buf} = T.alloc_buffer({shape}, "float32")')
            if gate is not None:
                Gm = k.Gm
                s('small = T.alloc_buffer((1,), "int32")', f'gm = T.alloc_buffer(({Gm},), "float32")')
                with s.block(f"for f in T.vectorized({Gm}):"):
                    s(f"gm[f] = {NEG_INF}")
            s("# the state entering the sequence")
            with s.block(f"for f in range({F}):"):
                with s.block(f"for d in T.vectorized({Dv}):"):
                    s(f"S[f, d] = {'S0[b, h, f, d]' if initial_state else 'T.float32(0)'}")
                if keep_z:
                    s(f"z[f] = {'z0[b, h, f]' if initial_state else 'T.float32(0)'}")
            nchunks = f"(L + {C - 1}) // {C}"
            if not causal:
                s("# pass 1: S = sum_j phi(k_j)^T v_j (z = sum_j phi(k_j)) over the whole sequence")
                with s.block(f"for c in range({nchunks}):"):
                    s(f"c0 = c * {C}")
                    _emit_load_chunk(s, spec, k, inline, fk_head)
                    _emit_state_update(s, k, gated=False)
            s("# " + ("chunks in order: outputs (intra-chunk pairs + the state entering the chunk), then the "
                      "state update" if causal else "pass 2: o_i = phi(q_i) S (/ phi(q_i) . z)"))
            with s.block(f"for c in range({nchunks}):"):
                s(f"c0 = c * {C}")
                if save_states:
                    _emit_save_state(s, k)
                _emit_load_chunk(s, spec, k, inline, fk_head)
                if not causal or gate is None:
                    _emit_load_queries(s, spec, k, inline)
                    if causal:
                        _emit_block_scores(s, k, "kc", "qT", scalar_decay=False)
                else:
                    _emit_gates(s, k)
                    with s.block("if small[0] == 1:"):
                        _emit_factored_scores(s, spec, k, inline)
                    with s.block("else:"):
                        _emit_exact_scores(s, spec, k, inline)
                _emit_outputs(s, k, causal, mode, normalize)
                if causal:
                    _emit_state_update(s, k, gated=gate is not None)
            if return_state:
                with s.block(f"for f in range({F}):"):
                    with s.block(f"for d in T.vectorized({Dv}):"):
                        s("S_out[b, h, f, d] = S[f, d]")
                    s("z_out[b, h, f] = z[f]")
            if gate is not None:
                s("# the largest log-gate seen (+inf for NaN / Inf): the caller rejects g > 0 after the call")
                s("gcheck[task] = gm[0]")
                with s.block(f"for f in range(1, {Gm}):"):
                    s("gcheck[task] = T.max(gcheck[task], gm[f])")
    return s.text()


@dataclass(frozen=True)
class _Ctx:
    C: int
    F: int
    Dv: int
    cs: int
    mr: int
    mr_f: int
    gate: Optional[str]
    den: bool
    keep_z: bool
    lanes: int
    cols: Optional[int] = None   # column block of the width-Dv products (codegen.tile_cols)
    mr_scores: int = 16          # rows per step of the score blocks
    score_block: int = 16        # queries per column block of the scores
    reverse: bool = False    # scan position t reads and writes sequence row L - 1 - t
    key_shift: int = 0       # ... and pairs with the key / value of row at(t) + key_shift
    key_first: int = 0       # (none where that row is before key_first or past L - 1)
    accumulate_from: Optional[int] = None

    def at(self, t: str) -> str:
        """The sequence row of scan position ``t``."""
        return f"L - 1 - ({t})" if self.reverse else t

    @property
    def lagged(self) -> bool:
        return self.key_shift != 0 or self.key_first != 0

    def _shifted(self, t: str) -> str:
        """at(t) + key_shift, unclamped."""
        return f"{self.at(t)} + {self.key_shift}".replace("+ -", "- ") if self.key_shift else self.at(t)

    def key_row(self, t: str) -> str:
        """The key / value row of scan position ``t`` (t < L), clamped into the sequence."""
        return f"T.min(T.max({self._shifted(t)}, 0), L - 1)" if self.lagged else self.at(t)

    def key_valid(self, t: str) -> str:
        """Scan position ``t`` (any int) pairs with a key."""
        cond = [f"{t} < L"]
        if self.lagged:
            cond += [f"{self._shifted(t)} >= {self.key_first}", f"{self._shifted(t)} < L"]
        return " and ".join(cond)

    @property
    def Fg(self) -> int:
        """Gate lanes per token: F for a vector gate, 1 for a scalar one."""
        return self.F if self.gate == "vector" else 1

    @property
    def Gm(self) -> int:
        """Lanes of the running gate maximum: features (vector gate) or the chunk's tokens (scalar gate)."""
        return self.F if self.gate == "vector" else self.C


L2E = f32(LOG2E)


def _emit_save_state(s, k: _Ctx) -> None:
    """Sc[b, h, c] = [S | z]: the state entering chunk c (the backward's inter-chunk terms read it)."""
    with s.block(f"for f in range({k.F}):"):
        with s.block(f"for d in T.vectorized({k.Dv}):"):
            s("Sc[b, h, c, f, d] = S[f, d]")
        if k.den:
            s(f"Sc[b, h, c, f, {k.Dv}] = z[f]")


def _emit_load_chunk(s, spec, k: _Ctx, inline, fk_head) -> None:
    """phi(k) rows of the chunk; rows past L are zero."""
    C, F = k.C, k.F
    fmap = spec.linear.feature_map
    src_k = (lambda r, f: phi_expr(fmap, f"k[b, hk, {k.key_row(f'T.min(c0 + {r}, L - 1)')}, {f}]")) if inline else \
        (lambda r, f: f"fk[b, {fk_head}, {k.key_row(f'T.min(c0 + {r}, L - 1)')}, {f}]")
    with s.block(f"for r in range({C}):"):
        with s.block(f"for f in T.vectorized({F}):"):
            s(f"kc[r, f] = T.if_then_else({k.key_valid('c0 + r')}, {src_k('r', 'f')}, T.float32(0))")
    if k.lagged:
        s("# the chunk's values, zero where no key pairs (so that no Inf / NaN of an unpaired row is read)")
        with s.block(f"for r in range({C}):"):
            with s.block(f"for d in T.vectorized({k.Dv}):"):
                s(f"vc[r, d] = T.if_then_else({k.key_valid('c0 + r')}, "
                  f"v[b, hk, {k.key_row('T.min(c0 + r, L - 1)')}, d], T.float32(0))")


def _query_src(spec, k: _Ctx, inline: bool):
    """``src(r, f)``: phi(q)_f of the chunk's row r (clamped into the sequence), mapped on load or precomputed."""
    fmap = spec.linear.feature_map
    if inline:
        return lambda r, f: phi_expr(fmap, f"q[b, h, {k.at(f'T.min(c0 + {r}, L - 1)')}, {f}]")
    return lambda r, f: f"fq[b, h, {k.at(f'T.min(c0 + {r}, L - 1)')}, {f}]"


def _emit_load_queries(s, spec, k: _Ctx, inline: bool, decay: bool = False) -> None:
    """qT[f, r] = phi(q_r)_f (times linear_scale when the output is not normalised; times the decay
    from the chunk start, 2^(Gc[r] log2 e), with ``decay``); rows past L are zero."""
    C, F = k.C, k.F
    src_q = _query_src(spec, k, inline)
    factors = [] if k.den else ["linear_scale"]
    if decay:
        factors.append("eq[r, f]" if k.gate == "vector" else "eq[r, 0]")
    # o is linear in phi(q): scale it once here (one product per row: LLVM does not reassociate floats)
    scale = f" * ({' * '.join(factors)})" if len(factors) > 1 else "".join(f" * {x}" for x in factors)
    s("# phi(q) row by row" + (", times linear_scale" if not k.den else "")
      + (", decayed from the chunk start" if decay else "") + ", then transposed (queries along the vector lanes)")
    with s.block(f"if c0 + {C} <= L:"):
        with s.block(f"for r in range({C}):"):
            with s.block(f"for f in T.vectorized({F}):"):
                s(f"qr[r, f] = {src_q('r', 'f').replace('T.min(c0 + r, L - 1)', 'c0 + r')}{scale}")
    with s.block("else:"):
        with s.block(f"for r in range({C}):"):
            with s.block(f"for f in T.vectorized({F}):"):
                s(f"qr[r, f] = T.if_then_else(c0 + r < L, {src_q('r', 'f')}{scale}, T.float32(0))")
    _emit_transpose_queries(s, k, "qr")


def _emit_transpose_queries(s, k: _Ctx, rows: str) -> None:
    """qT = the [C, F] buffer ``rows`` transposed, in registers (codegen.emit_transpose)."""
    emit_transpose(s, rows=k.F, cols=k.C, dst=lambda i, j: f"qT[{i}, {j}]", src=lambda i, j: f"{rows}[{i}, {j}]",
                   dst_stride=k.C, src_stride=k.F, lanes=k.lanes)


def _emit_gates(s, k: _Ctx) -> None:
    """Gc[r, :] = cumulative log-gate from the chunk start to token r (0 past L); decay = 2^(Gc_end log2 e);
    small[0] = 1 when every feature decays by less than e^60 inside the chunk (the factored path is exact)."""
    C, gate, Fg = k.C, k.gate, k.Fg
    gt = (lambda r: f"g[b, h, {r}, f]") if gate == "vector" else (lambda r: f"g[b, h, {r}]")
    floor = f"T.float32({GATE_FLOOR})"
    gc = lambda r: f"T.max({gt(r)}, {floor})"  # noqa: E731
    s(f"# cumulative log-gates inside the chunk; each gate floored at {GATE_FLOOR} (a full reset to fp32")
    s("# resolution) so the sums stay small enough for their differences to be exact in fp32")
    with s.block(f"for f in T.vectorized({Fg}):"):
        s(f"Gc[0, f] = {gc('c0')}")
    with s.block(f"for r in range(1, {C}):"):
        with s.block(f"for f in T.vectorized({Fg}):"):
            s(f"Gc[r, f] = Gc[r - 1, f] + T.if_then_else(c0 + r < L, {gc('T.min(c0 + r, L - 1)')}, T.float32(0))")
    with s.block(f"for f in T.vectorized({Fg}):"):
        s(f"decay[f] = {exp2(f'Gc[{C - 1}, f] * {L2E}')}")
    s("# the largest log-gate (+inf for NaN / Inf); rows past L repeat row L - 1")
    inf = "T.float32(math.inf)"
    sane = lambda x: f"T.if_then_else({x} > {NEG_INF} and {x} < {inf}, {x}, {inf})"  # noqa: E731
    if gate == "scalar":      # one lane per token
        with s.block(f"for r in T.vectorized({C}):"):
            s(f"gm[r] = T.max(gm[r], {sane(gt('T.min(c0 + r, L - 1)'))})")
    else:
        with s.block(f"for r in range(T.min({C}, L - c0)):"):
            with s.block(f"for f in T.vectorized({Fg}):"):
                s(f"gm[f] = T.max(gm[f], {sane(gt('c0 + r'))})")
    s("small[0] = 1")
    with s.block(f"for f in range({Fg}):"):
        with s.block(f"if Gc[{C - 1}, f] < T.float32({FACTOR_LIMIT}):"):
            s("small[0] = 0")


def _emit_factored_scores(s, spec, k: _Ctx, inline: bool) -> None:
    """The decay factors through the chunk start: d_ij = 2^(Gc_i log2 e) 2^(-Gc_j log2 e). Queries are
    decayed as they load (the state term needs exactly that), keys by one exponential per entry, and
    the scores are one matmul plus the causal mask; the state update reuses the decayed keys."""
    C, F, gate = k.C, k.F, k.gate
    s("# decay factors through the chunk start: aT = (K e^-G) @ (Q e^G)^T, then the causal mask")
    if gate == "vector":
        # eq holds phi(q) decayed from the chunk start, formed row by row (contiguous loads of q, G), then
        # transposed once: one strided pass instead of two (q and its decay)
        src_q = _query_src(spec, k, inline)
        dec = exp2(f"Gc[r, f] * {L2E}")
        factor = dec if k.den else f"(linear_scale * {dec})"
        with s.block(f"for r in range({C}):"):
            with s.block(f"for f in T.vectorized({F}):"):
                s(f"eq[r, f] = T.if_then_else(c0 + r < L, {src_q('r', 'f')} * {factor}, T.float32(0))")
        s("# phi(q) transposed (queries along the vector lanes)")
        _emit_transpose_queries(s, k, "eq")
        key_factor, end_decay = exp2(f"-Gc[j, f] * {L2E}"), "decay[f]"
    else:   # one factor per token each way, exponentials vectorised over the chunk's tokens
        with s.block(f"for r in T.vectorized({C}):"):
            s(f"eq[r, 0] = {exp2(f'Gc[r, 0] * {L2E}')}", f"ek[r] = {exp2(f'-Gc[r, 0] * {L2E}')}")
        key_factor, end_decay = "ek[j]", "decay[0]"
        _emit_load_queries(s, spec, k, inline, decay=True)
    s("# keys decayed from the chunk start (scores) and, in place, to its end (the state update)")
    with s.block(f"for j in range({C}):"):
        with s.block(f"for f in T.vectorized({F}):"):
            s(f"kd[j, f] = kc[j, f] * {key_factor}", f"kc[j, f] = kd[j, f] * {end_decay}")
    _emit_block_scores(s, k, "kd", "qT", scalar_decay=False)


def _emit_exact_scores(s, spec, k: _Ctx, inline: bool) -> None:
    """Any gate strength: every exponent <= 0. Scalar gate: one exponential per pair; vector gate:
    sub-chunks. Then the queries are decayed from the chunk start for the state term."""
    C, F, gate, Fg = k.C, k.F, k.gate, k.Fg
    s("# strong decay: exact scores with every exponent <= 0")
    _emit_load_queries(s, spec, k, inline)
    with s.block(f"for f in range({Fg}):"):
        with s.block(f"for r in range({C}):"):
            s("GT[f, r] = Gc[r, f]")
    if gate == "vector":
        _emit_scores_subchunks(s, k)
    else:
        _emit_block_scores(s, k, "kc", "qT", scalar_decay=True)
    s("# phi(q) decayed from the chunk start (in place: the scores are done with it)")
    with s.block(f"for f in range({F}):"):
        with s.block(f"for i in T.vectorized({C}):"):
            gi = "GT[f, i]" if gate == "vector" else "GT[0, i]"
            s(f"qT[f, i] = qT[f, i] * {exp2(f'{gi} * {L2E}')}")


def _emit_block_scores(s, k: _Ctx, kbuf: str, qbuf: str, scalar_decay: bool) -> None:
    """aT = kbuf @ qbuf by column blocks of one vector, then the causal mask (and a scalar gate's decay).

    Block cb of queries only needs keys j < (cb + 1) * lanes; the outputs never read aT below that.
    """
    C, F = k.C, k.F
    w = k.score_block if C % k.score_block == 0 else C
    s(f"# aT = {kbuf} @ {qbuf}, one block of queries at a time (keys past the block's last query skipped),")
    s("# then the causal mask" + (" and decay d_ij = 2^((G_i - G_j) log2 e)" if scalar_decay else ""))
    for cb in range(C // w):
        rows = (cb + 1) * w
        col = f"{cb * w} + i" if cb else "i"
        at = (lambda ww, cb=cb: f"{cb * w} + {ww}" if cb else ww)
        emit_gemm_tile(s, rows=rows, mr=divisor_at_most(rows, k.mr_scores), width=w, red=str(F),
                       a=lambda r, x: f"{kbuf}[{r}, {x}]", b=lambda x, ww, at=at: f"{qbuf}[{x}, {at(ww)}]",
                       store=lambda r, ww, val, at=at: f"aT[{r}, {at(ww)}] = {val}")
        with s.block(f"for j in range({rows}):"):
            with s.block(f"for i in T.vectorized({w}):"):
                if scalar_decay:
                    dec = exp2(f"T.min(GT[0, {col}] - GT[0, j], T.float32(0)) * {L2E}")
                    s(f"aT[j, {col}] = T.if_then_else(j <= {col}, aT[j, {col}] * {dec}, T.float32(0))")
                else:
                    s(f"aT[j, {col}] = T.if_then_else(j <= {col}, aT[j, {col}], T.float32(0))")


def _emit_scores_subchunks(s, k: _Ctx) -> None:
    """Vector gate, any strength: pairs across sub-chunks factor through the boundary token between them
    (both exponents <= 0); pairs inside a sub-chunk take one exponential per feature."""
    C, F, cs = k.C, k.F, k.cs
    i0 = f"a * {cs}"   # first token of sub-chunk a (inlined: TVM 0.27 mis-flattens a let used as a loop bound)
    with s.block(f"for a in range({C // cs}):"):
        s("# queries of sub-chunk a decayed to the boundary, keys before it decayed from it")
        with s.block(f"for f in range({F}):"):
            s(f"gref = T.if_then_else(a > 0, GT[f, T.max({i0} - 1, 0)], T.float32(0))")
            with s.block(f"for i in T.vectorized({cs}):"):
                s(f"qd[f, {i0} + i] = qT[f, {i0} + i] * {exp2(f'(GT[f, {i0} + i] - gref) * {L2E}')}")
        with s.block(f"for j in range({i0}):"):
            with s.block(f"for f in T.vectorized({F}):"):
                gref = f"T.if_then_else(a > 0, Gc[T.max({i0} - 1, 0), f], T.float32(0))"
                s(f"kd[j, f] = kc[j, f] * {exp2(f'({gref} - Gc[j, f]) * {L2E}')}")
        _emit_feature_sum(s, k, rows=i0, cell=f"aT[j, {i0} + i]", term=f"kd[j, f] * qd[f, {i0} + i]")
        s("# pairs inside the sub-chunk: one exponential per feature")
        dec = exp2(f"T.min(GT[f, {i0} + i] - GT[f, {i0} + j], T.float32(0)) * {L2E}")
        _emit_feature_sum(s, k, rows=cs, cell=f"aT[{i0} + j, {i0} + i]",
                          term=f"T.if_then_else(j <= i, kc[{i0} + j, f] * qT[f, {i0} + i] * {dec}, T.float32(0))")
        with s.block(f"for j in range({i0} + {cs}, {C}):"):
            with s.block(f"for i in T.vectorized({cs}):"):
                s(f"aT[j, {i0} + i] = T.float32(0)")


def _emit_feature_sum(s, k: _Ctx, *, rows, cell: str, term: str) -> None:
    """``cell = sum_f term`` for key rows j < ``rows`` and one sub-chunk of queries i (vectorised)."""
    with s.block(f"for j in range({rows}):"):
        with s.block(f"for i in T.vectorized({k.cs}):"):
            s(f"{cell} = T.float32(0)")
        with s.block(f"for f in range({k.F}):"):
            with s.block(f"for i in T.vectorized({k.cs}):"):
                s(f"{cell} = {cell} + {term}")


def _emit_outputs(s, k: _Ctx, intra: bool, mode: str, normalize: bool) -> None:
    """o = aT^T V (intra, causal) + (phi(q) decayed from the chunk start) S, written straight to the output.

    The denominators dc (sum of the same weights, with 1 and z) are formed first, so a normalised
    output divides as it is stored.
    """
    C, F, Dv, mr = k.C, k.F, k.Dv, k.mr
    if k.den:
        s("# denominators: sum_j aT[j, i] + phi(q_i) . z")
        with s.block(f"for i in T.vectorized({C}):"):
            s("dc[i] = T.float32(0)")
        if intra:
            with s.block(f"for j in range({C}):"):
                with s.block(f"for i in T.vectorized({C}):"):
                    s("dc[i] = dc[i] + T.if_then_else(j <= i, aT[j, i], T.float32(0))")
        with s.block(f"for f in range({F}):"):
            with s.block(f"for i in T.vectorized({C}):"):
                s("dc[i] = dc[i] + qT[f, i] * z[f]")
        if mode == "numden":
            with s.block(f"for i in range(T.min({C}, L - c0)):"):
                if k.accumulate_from is None:
                    s(f"den[b, h, {k.at('c0 + i')}] = dc[i]")
                else:
                    with s.block(f"if {k.at('c0 + i')} >= {k.accumulate_from}:"):
                        s(f"den[b, h, {k.at('c0 + i')}] = den[b, h, {k.at('c0 + i')}] + dc[i]")
        elif normalize:
            with s.block(f"for i in T.vectorized({C}):"):
                s("dc[i] = T.if_then_else(dc[i] == T.float32(0), T.float32(0), T.float32(1) / dc[i])")
    s("# o = aT^T @ V_chunk + qT^T @ S in one pass (query i only needs keys j <= i), rows inside L stored"
      if intra else "# o = qT^T @ S, rows inside L stored")
    terms = []
    if intra:
        terms.append((lambda r0: f"{r0} + {mr}", lambda r, x: f"aT[{x}, {r}]",
                      _values(k)))
    terms.append((str(F), lambda r, x: f"qT[{x}, {r}]", lambda x, w: f"S[{x}, {w}]"))
    guard = lambda r: f"c0 + {r} < L"   # noqa: E731
    if mode == "numden" and k.accumulate_from is not None:
        def store(r, w, val):
            cell = f"num[b, h, {k.at(f'c0 + {r}')}, {w}]"
            return f"{cell} = {cell} + {val}"
        guard = lambda r: f"c0 + {r} < L and {k.at(f'c0 + {r}')} >= {k.accumulate_from}"   # noqa: E731
    elif mode == "numden":
        store = lambda r, w, val: f"num[b, h, {k.at(f'c0 + {r}')}, {w}] = {val}"   # noqa: E731
    elif normalize:
        store = lambda r, w, val: f"o[b, h, {k.at(f'c0 + {r}')}, {w}] = {val} * dc[{r}]"   # noqa: E731
    else:
        store = lambda r, w, val: f"o[b, h, {k.at(f'c0 + {r}')}, {w}] = {val}"   # noqa: E731
    emit_gemm_tile(s, rows=C, mr=mr, width=Dv, terms=terms, store=store, guard=guard, cols=k.cols)


def _values(k: _Ctx):
    """b(x, w) of a product with the chunk's values: the zero-padded copy when lagged, else v itself."""
    if k.lagged:
        return lambda x, w: f"vc[{x}, {w}]"
    return lambda x, w: f"v[b, hk, {k.at(f'T.min(c0 + {x}, L - 1)')}, {w}]"


def _emit_state_update(s, k: _Ctx, gated: bool) -> None:
    """S = decay * S + kend^T V_chunk, z alike (kend: the chunk's keys decayed to its end)."""
    C, F, Dv, gate = k.C, k.F, k.Dv, k.gate
    s("# state update" + (": keys decayed to the chunk end (the factored path did it already)" if gated else ""))
    if gated:
        with s.block("if small[0] == 0:"):
            with s.block(f"for j in range({C}):"):
                with s.block(f"for f in T.vectorized({F}):"):
                    gj, ge = ("Gc[j, f]", f"Gc[{C - 1}, f]") if gate == "vector" else ("Gc[j, 0]", f"Gc[{C - 1}, 0]")
                    s(f"kc[j, f] = kc[j, f] * {exp2(f'({ge} - {gj}) * {L2E}')}")
    dec = (lambda r: f"decay[{r}]") if gate == "vector" else (lambda r: "decay[0]")
    emit_gemm_tile(s, rows=F, mr=k.mr_f, width=Dv, red=str(C),
                   a=lambda r, x: f"kc[{x}, {r}]", b=_values(k),
                   init=(lambda r, w: f"S[{r}, {w}] * {dec(r)}") if gated else (lambda r, w: f"S[{r}, {w}]"),
                   store=lambda r, w, val: f"S[{r}, {w}] = {val}", cols=k.cols)
    if k.keep_z:
        if gated:
            with s.block(f"for f in T.vectorized({F}):"):
                s(f"z[f] = z[f] * {dec('f')}")
        with s.block(f"for j in range({C}):"):
            with s.block(f"for f in T.vectorized({F}):"):
                s("z[f] = z[f] + kc[j, f]")
