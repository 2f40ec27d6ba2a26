"""The window (softmax) template: block-sparse flash attention over a :class:`~lincomp.ir.blocks.BlockPlan`.

One generated PrimFunc ``window_fwd`` per variant. The plan's CSR arrays are buffers; the kernel loops
over them (``for e in range(kv_offsets[t], kv_offsets[t + 1])``), so one compiled module serves every
length (``B`` and ``L`` are symbolic; the plan is rebuilt per length, the code is not).

Per (batch, head, query tile) -- the parallel loop -- with ``BM`` queries and ``BN`` keys per tile::

    qT[D, BM]   = scale * log2(e) * q[tile rows]^T        (gathered once; grid tiles are re-ordered tokens)
    for each key tile of the plan:
        sT[BN, BM] = K_tile @ qT                          (micro-kernel: MR key rows x BM queries)
        mask sT unless the plan marks the pair full     (generated visibility rule)
        online softmax in base 2 (running max m, sum l; sinks start m and l)
        acc[BM, Dv] = corr * acc + sT^T @ V_tile         (micro-kernel: MR query rows x Dv)
    o = acc / l     (+ the hybrid epilogue: "sum" adds the linear output, "shared" merges num/den)

``sT`` is kept transposed (keys x queries) so every softmax step is a vertical, vectorised operation
over the BM queries of the tile.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Tuple

from lincomp.lower.tvmir.codegen import (BF16_LANES, LOG2E, NEG_INF, Script, check_config_int, divisor_at_most,
                                         emit_bf16_tile, emit_gemm_tile, exp2, f32, ramp)
from lincomp.ir.lowered import lower
from lincomp.spec import AttentionSpec, GridWindow


# Value columns per P @ V pass: a wider head dim (128) runs in column blocks, so mr_pv rows of accumulators
# fit the registers (kernel.py fits mr_pv to this width).
PV_COLS = 64


@dataclass(frozen=True)
class WindowConfig:
    """Schedule choices of the window template (the tuning space)."""

    block_m: int = 64                    # queries per tile (the vectorised axis of sT)
    block_n: int = 64                    # keys per tile (grid windows: == block_m)
    tile: Optional[Tuple[int, ...]] = None  # grid tile shape (prod == block_m); None: default_tile
    mr_qk: int = 4                       # key rows per QK micro-kernel step
    mr_pv: int = 4                       # query rows per PV micro-kernel step
    kv_group: int = 1                    # key tiles per online-softmax step (longer PV reductions)

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            check_config_int(getattr(self, name), f"window.{name}", 1, 256, pow2=True)
        for name in ("mr_qk", "mr_pv"):
            check_config_int(getattr(self, name), f"window.{name}", 0, 64)   # 0: as many as fit
        check_config_int(self.kv_group, "window.kv_group", 1, 64)
        if self.tile is not None:
            if not isinstance(self.tile, (tuple, list)) or not 2 <= len(self.tile) <= 3:
                raise ValueError(f"config window.tile must be a list of 2 or 3 ints, got {self.tile!r}")
            for n, t in enumerate(self.tile):
                check_config_int(t, f"window.tile[{n}]", 1, 256)
            if math.prod(self.tile) != self.block_m:
                raise ValueError(f"config window.tile {list(self.tile)} must have product block_m={self.block_m}")

    def to_dict(self) -> dict:
        d = {"block_m": self.block_m, "block_n": self.block_n, "mr_qk": self.mr_qk, "mr_pv": self.mr_pv,
             "kv_group": self.kv_group}
        if self.tile is not None:
            d["tile"] = list(self.tile)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WindowConfig":
        d = dict(d)
        if d.get("tile") is not None:
            d["tile"] = tuple(d["tile"])
        return cls(**{k: d[k] for k in ("block_m", "block_n", "tile", "mr_qk", "mr_pv", "kv_group") if k in d})


@dataclass(frozen=True)
class WindowDims:
    """Static sizes baked into the code (B and L stay symbolic)."""

    H: int
    Hkv: int
    D: int
    Dv: int
    F: Optional[int] = None      # feature width (combine="shared" only)
    HF: Optional[int] = None     # heads of the key features (H for per-head weights, else Hkv)


def tiled(spec: AttentionSpec) -> bool:
    """Grid windows visit re-ordered (tiled) tokens; the others keep the identity order."""
    return isinstance(spec.window, GridWindow)


def arg_names(spec: AttentionSpec, key_bias: bool = False, save_lse: bool = False, lagged: bool = False) -> list:
    """Buffer / scalar arguments of ``window_fwd`` in order (the launcher passes them so); ``key_bias`` adds
    the per-key bias input, ``save_lse`` the ``lse`` output after ``o`` (training: what window_bwd.py needs);
    ``lagged`` (combine="shared"): the linear num / den already hold only the keys outside the window
    (shared_lag.py), so the kernel takes no features and subtracts nothing."""
    names = ["q", "k", "v", "kv_offsets", "kv_indices", "kv_full"]
    if tiled(spec):
        names.append("tokens")
    if spec.sinks:
        names.append("sink_logits")
    if spec.pool is not None:
        names += ["kp", "vp"]
    if spec.combine == "sum":
        names += ["lin_o", "alpha"]
    if spec.combine == "shared":
        names += ["lin_num", "lin_den", "window_gamma"]
        if not lagged:
            names += ["fq", "fk"] + (["G"] if spec.linear.gate is not None else []) + ["cond"]
    return names + (["key_bias"] if key_bias else []) + ["o"] + (["lse"] if save_lse else []) + ["scale"]


# ------------------------------------------------------------------------------------ visibility
def visibility(spec: AttentionSpec, pi: str, pj: str) -> str:
    """The generated predicate "query at position pi sees key at position pj": the IR's rule printed as
    TVMScript, after ``pj >= 0`` (a negative position marks a padding key slot)."""
    lowered = lower(spec)
    if lowered.rule.op == "const":   # no window, not causal: every real key
        return f"{pj} >= 0" if lowered.rule.value else "False"
    return f"{pj} >= 0 and ({lowered.tvm_expr(pi, pj)})"


# ---------------------------------------------------------------------------------------- template
def storage(D: int, bf16: bool) -> tuple:
    """(row width, dtype) of the q / k buffers and the dtype of v: fp32 values, or bf16 bits (q, k as int32
    words of two values along the head dim, v as int16)."""
    return (D // 2, "int32", "int16") if bf16 else (D, "float32", "float32")


@contextmanager
def signature(s: Script, name: str, names: list, dims: WindowDims, kv_rows: str = "L", bf16: bool = False):
    """``def name(...):`` of a window PrimFunc (buffers ``<arg>_h``, ``scale`` a float) with its symbolic
    sizes (B, L, NT1 = tiles + 1, NNZ = plan entries) and q, k, v matched (k, v with ``kv_rows`` rows: the
    pooled backward passes the pooled keys); the body goes inside. ``bf16``: q, k are bf16 pairs (int32
    words, D / 2 per row), v bf16 bits (int16)."""
    s("@T.prim_func")
    params = ", ".join(f"{a}: T.float32" if a == "scale" else f"{a}_h: T.handle" for a in names)
    with s.block(f"def {name}({params}):"):
        s(f'T.func_attr({{"global_symbol": "{name}", "tir.noalias": True}})')
        s("B = T.int32()", "L = T.int32()", "NT1 = T.int32()", "NNZ = T.int32()")
        kd, kt, vt = storage(dims.D, bf16)
        s(f'q = T.match_buffer(q_h, (B, {dims.H}, L, {kd}), "{kt}")',
          f'k = T.match_buffer(k_h, (B, {dims.Hkv}, {kv_rows}, {kd}), "{kt}")',
          f'v = T.match_buffer(v_h, (B, {dims.Hkv}, {kv_rows}, {dims.Dv}), "{vt}")')
        yield


def bf16_unsupported(spec: AttentionSpec, dims: WindowDims, cfg: WindowConfig) -> Optional[str]:
    """Why the window kernel cannot take bf16 inputs for this variant (None: it can). The bf16 kernel is the
    softmax-only inference forward; its dot products pair bf16 values along the head dim and along the keys."""
    if spec.combine is not None:
        return f"combine={spec.combine!r} (the bf16 kernel is softmax-only)"
    if dims.D % 2 or dims.Dv % BF16_LANES:
        return f"head dims D={dims.D}, Dv={dims.Dv} (bf16 needs an even D and Dv a multiple of {BF16_LANES})"
    if cfg.block_m % BF16_LANES:
        return f"block_m={cfg.block_m} (bf16 needs a multiple of {BF16_LANES})"
    return None


def window_source(spec: AttentionSpec, dims: WindowDims, cfg: WindowConfig, name: str = "window_fwd",
                  key_bias: bool = False, save_lse: bool = False, lagged: bool = False, bf16: bool = False) -> str:
    """TVMScript of the window kernel for ``spec`` (a PrimFunc named ``name``).

    ``key_bias``: one more input ``key_bias [B, L]`` added to every score of key j in base-2 units (-inf hides
    the key: a key-padding mask); a row left with no key outputs 0. ``save_lse``: also write ``lse [B, H, L]``,
    each row's log2-sum-exp2 of its base-2 scores, sinks included (-inf: no key). ``lagged``: see arg_names.
    ``bf16``: q, k, v (and pooled keys) come as bf16 bits; scores and P @ V use the CPU's bf16 dot products
    (fp32 accumulation, P rounded to bf16 as flash attention does on GPUs; softmax in fp32); o is written as
    bf16 (int32 words of two values).
    """
    if bf16:
        why = bf16_unsupported(spec, dims, cfg)
        if why or save_lse:
            raise ValueError(f"no bf16 window kernel for {why or 'training (save_lse)'}")
    H, Hkv, D, Dv = dims.H, dims.Hkv, dims.D, dims.Dv
    BM, BN, G = cfg.block_m, cfg.block_n, max(1, cfg.kv_group)
    GN = G * BN     # keys per online-softmax step
    grid = tiled(spec)
    if grid and BM != BN:
        raise ValueError(f"grid windows need block_m == block_n, got {BM}, {BN}")
    group = H // Hkv
    shared, summed = spec.combine == "shared", spec.combine == "sum"
    inwin = shared and not lagged   # the in-window linear terms are formed here, to subtract from the full scan
    if lagged and (not shared or save_lse):
        raise ValueError("lagged: combine='shared' inference only")
    gate = spec.linear.gate if shared else None
    F, HF = dims.F, dims.HF
    mr_qk = divisor_at_most(GN, cfg.mr_qk)
    mr_pv = divisor_at_most(BM, cfg.mr_pv)
    names = arg_names(spec, key_bias, save_lse, lagged)

    s = Script()
    with signature(s, name, names, dims, bf16=bf16):
        s('kv_offsets = T.match_buffer(kv_offsets_h, (NT1,), "int32")',
          'kv_indices = T.match_buffer(kv_indices_h, (NNZ,), "int32")',
          'kv_full = T.match_buffer(kv_full_h, (NNZ,), "int32")')
        if grid:
            s(f'tokens = T.match_buffer(tokens_h, (NT1 - 1, {BM}), "int32")')
        if spec.sinks:
            s(f'sink_logits = T.match_buffer(sink_logits_h, ({H}, {spec.sinks}), "float32")')
        if spec.pool is not None:
            NP = pooled_rows(spec, GN)
            kd, kt, vt = storage(D, bf16)
            s(f'kp = T.match_buffer(kp_h, (B, {Hkv}, {NP}, {kd}), "{kt}")',
              f'vp = T.match_buffer(vp_h, (B, {Hkv}, {NP}, {Dv}), "{vt}")')
        if summed:
            s(f'lin_o = T.match_buffer(lin_o_h, (B, {H}, L, {Dv}), "float32")',
              f'alpha = T.match_buffer(alpha_h, ({H},), "float32")')
        if shared:
            s(f'lin_num = T.match_buffer(lin_num_h, (B, {H}, L, {Dv}), "float32")',
              f'lin_den = T.match_buffer(lin_den_h, (B, {H}, L), "float32")',
              f'window_gamma = T.match_buffer(window_gamma_h, ({H},), "float32")')
        if inwin:
            s(f'fq = T.match_buffer(fq_h, (B, {H}, L, {F}), "float32")',
              f'fk = T.match_buffer(fk_h, (B, {HF}, L, {F}), "float32")')
            emit_gate_buffer(s, gate, H, F)
            s('cond = T.match_buffer(cond_h, (B, {H}, L), "float32")'.replace("{H}", str(H)))
        if key_bias:
            s('key_bias = T.match_buffer(key_bias_h, (B, L), "float32")')
        if bf16:   # bf16 output bits, two per word
            s(f'o = T.match_buffer(o_h, (B, {H}, L, {Dv // 2}), "int32")')
        else:
            s(f'o = T.match_buffer(o_h, (B, {H}, L, {Dv}), "float32")')
        if save_lse:
            s(f'lse = T.match_buffer(lse_h, (B, {H}, L), "float32")')
        s("# one task per (batch, head, query tile)")
        with s.block_if('with T.attr(0, "pragma_import_llvm", BF16_LLVM):  # the bf16 dot-product helpers'
                        if bf16 else None), s.block(f"for task in T.parallel(B * {H} * (NT1 - 1)):"):
            s("b = task // ({H} * (NT1 - 1))".format(H=H),
              f"h = task // (NT1 - 1) % {H}",
              "t = task % (NT1 - 1)",
              f"hk = h // {group}" if group > 1 else "hk = h")
            fk_head = "h" if (shared and HF == H) else "hk"
            for buf, shape, dt in (("qpos", f"({BM},)", "int32"), ("kpos", f"({GN},)", "int32"),
                                   ("qT", f"({storage(D, bf16)[0]}, {BM})", storage(D, bf16)[1]),
                                   ("sT", f"({max(GN, pooled_step(spec, GN)) if spec.pool else GN}, {BM})", "float32"),
                                   ("acc", f"({BM}, {Dv})", "float32"), ("m", f"({BM},)", "float32"),
                                   ("l", f"({BM},)", "float32"), ("mu", f"({BM},)", "float32"),
                                   ("corr", f"({BM},)", "float32")):
                s(f'{buf} = T.alloc_buffer({shape}, "{dt}")')
            if bf16:   # P (bf16 pairs of keys per query) and V (bf16 pairs of keys per column), per step
                steps = max(GN, pooled_step(spec, GN)) if spec.pool else GN
                s(f'P2 = T.alloc_buffer(({steps // 2}, {BM}), "int32")',
                  f'V2 = T.alloc_buffer(({steps // 2}, {Dv}), "int32")')
            if inwin:
                s(f'fqT = T.alloc_buffer(({F}, {BM}), "float32")',
                  f'aT = T.alloc_buffer(({GN}, {BM}), "float32")',
                  f'accl = T.alloc_buffer(({BM}, {Dv}), "float32")',
                  f'll = T.alloc_buffer(({BM},), "float32")')
            _emit_positions(s, spec, "qpos", "t", BM, grid)
            s("# the query tile transposed by pairs of the head dim (bf16 words; the scores are scaled)" if bf16 else
              "# the query tile, transposed and pre-scaled for base-2 softmax")
            with s.block(f"for i in range({BM}):"):
                with s.block(f"for d in range({storage(D, bf16)[0]}):"):
                    s("qT[d, i] = q[b, h, T.max(qpos[i], 0), d]" + ("" if bf16 else f" * (scale * {f32(LOG2E)})"))
            if inwin:
                with s.block(f"for i in range({BM}):"):
                    with s.block(f"for f in range({F}):"):
                        s("fqT[f, i] = fq[b, h, T.max(qpos[i], 0), f]")
            _emit_init(s, spec, BM, Dv, inwin)
            vis = visibility(spec, "qpos[i]", "kpos[j]")
            loop = ("for e in range(kv_offsets[t], kv_offsets[t + 1]):" if G == 1 else
                    f"for eg in range((kv_offsets[t + 1] - kv_offsets[t] + {G - 1}) // {G}):")
            if G > 1:
                s(f"# key tiles of the plan in groups of {G}: one online-softmax step per group")
                s(f'full = T.alloc_buffer(({G},), "int32")')
            with s.block(loop):
                if G == 1:
                    s("kt = kv_indices[e]")
                    _emit_positions(s, spec, "kpos", "kt", BN, grid)
                else:
                    with s.block(f"for gi in range({G}):"):
                        s(f"e = kv_offsets[t] + eg * {G} + gi",
                          "kt = kv_indices[T.min(e, NNZ - 1)]",
                          "full[gi] = T.if_then_else(e < kv_offsets[t + 1], kv_full[T.min(e, NNZ - 1)], 0)")
                        _emit_positions(s, spec, "kpos", "kt", BN, grid, offset=f"gi * {BN}",
                                        valid="e < kv_offsets[t + 1]")
                def plan_mask():
                    if key_bias:   # before the plan's mask, so full tiles get it too
                        with s.block(f"for j in range({GN}):"):
                            with s.block(f"for i in T.vectorized({BM}):"):
                                s("sT[j, i] = sT[j, i] + key_bias[b, T.max(kpos[j], 0)]")
                    def masked(rows):
                        with s.block(f"for j in {rows}:"):
                            with s.block(f"for i in T.vectorized({BM}):"):
                                s(f"sT[j, i] = T.if_then_else({vis}, sT[j, i], {NEG_INF})",
                                  "mu[i] = T.max(mu[i], sT[j, i])")
                    _emit_per_tile(s, G, BN, masked, lambda rows: _emit_row_max(s, rows, BM))

                _emit_step(s, GN, BM, D, Dv, mr_qk, mr_pv, plan_mask,
                           key=lambda r, x: f"k[b, hk, T.max(kpos[{r}], 0), {x}]",
                           val=lambda x, w: f"v[b, hk, T.max(kpos[{x}], 0), {w}]", bf16=bf16)
                if inwin:
                    _emit_shared_inwindow(s, spec, BM, G, BN, Dv, F, gate, fk_head, vis, mr_qk, mr_pv)
            if spec.pool is not None:
                _emit_pooled(s, spec, GN, BM, D, Dv, mr_qk, mr_pv, bf16)
            _emit_epilogue(s, spec, BM, Dv, shared, summed, save_lse, lagged, bf16)
    return s.text()


def emit_gate_buffer(s: Script, gate: Optional[str], H: int, F: int) -> None:
    """The log-gate cumsum ``G`` (float64: differences of long sums): [B, H, L] scalar, [B, H, L, F] vector."""
    if gate == "scalar":
        s(f'G = T.match_buffer(G_h, (B, {H}, L), "float64")')
    elif gate == "vector":
        s(f'G = T.match_buffer(G_h, (B, {H}, L, {F}), "float64")')


def pooled_step(spec: AttentionSpec, GN: int) -> int:
    """Pooled keys per online-softmax step: a multiple of GN near 64 (the pooled keys are dense, so longer
    steps only save rescales of the accumulator), GN when there are few."""
    return GN if spec.window.pooled_tokens <= GN else GN * max(1, 64 // GN)


def pooled_rows(spec: AttentionSpec, GN: int) -> int:
    """Rows of the pooled key / value buffers: P rounded up to whole pooled steps (zero padding)."""
    step = pooled_step(spec, GN)
    return -(-spec.window.pooled_tokens // step) * step


def _emit_per_tile(s: Script, G: int, BN: int, masked, full) -> None:
    """``masked(rows)`` for the step's key tiles the plan marks partly visible, ``full(rows)`` for the others
    (``rows``: the tile's rows of sT as a range expression; a step holds G tiles of BN keys)."""
    with s.block_if(f"for gi in range({G}):" if G > 1 else None):
        rows = f"range(gi * {BN}, gi * {BN} + {BN})" if G > 1 else f"range({BN})"
        with s.block("if kv_full[e] == 0:" if G == 1 else "if full[gi] == 0:"):
            masked(rows)
        with s.block("else:"):
            full(rows)


def _emit_row_max(s: Script, rows: str, BM: int) -> None:
    with s.block(f"for j in {rows}:"):
        with s.block(f"for i in T.vectorized({BM}):"):
            s("mu[i] = T.max(mu[i], sT[j, i])")


def _emit_step(s: Script, GN: int, BM: int, D: int, Dv: int, mr_qk: int, mr_pv: int, mask, key, val,
               bf16: bool = False) -> None:
    """One online-softmax step over GN keys: scores, ``mask()`` (writes masked sT and the running max mu),
    rescale, exponentiate, accumulate P @ V. ``key(r, x)`` / ``val(x, w)`` index the key / value rows
    (``bf16``: ``key`` an int32 pair of the head dim, ``val`` an int16 element)."""
    s(f"# sT = K @ qT: scores of {GN} keys (rows) x {BM} queries (vectorised)")
    if bf16:
        emit_bf16_tile(s, rows=GN, mr=mr_qk, width=BM, pairs=str(D // 2), a=key,
                       b=lambda x, o: f"qT[{x}, {ramp(o)}]",
                       store=lambda r, o, val_: f"sT[{r}, {ramp(o)}] = {val_} * "
                                                f"T.broadcast(scale * {f32(LOG2E)}, {BF16_LANES})")
    else:
        emit_gemm_tile(s, rows=GN, mr=mr_qk, width=BM, red=str(D), a=key,
                       b=lambda x, w: f"qT[{x}, {w}]", init=None,
                       store=lambda r, w, val_: f"sT[{r}, {w}] = {val_}")
    s("# mask (unless every pair is visible) and the running max")
    with s.block(f"for i in T.vectorized({BM}):"):
        s("mu[i] = m[i]")
    mask()
    s("# new max m, rescale factor corr = 2^(m_old - m_new); a row with no key yet shifts by 0")
    with s.block(f"for i in T.vectorized({BM}):"):
        s(f"corr[i] = {exp2(f'm[i] - T.if_then_else(mu[i] == {NEG_INF}, T.float32(0), mu[i])')}",
          "m[i] = mu[i]",
          f"mu[i] = T.if_then_else(m[i] == {NEG_INF}, T.float32(0), m[i])",
          "l[i] = l[i] * corr[i]")
    s("# p = 2^(s - m) in place; l += row sums")
    with s.block(f"for j in range({GN}):"):
        with s.block(f"for i in T.vectorized({BM}):"):
            s(f"sT[j, i] = {exp2('sT[j, i] - mu[i]', bf16)}",
              "l[i] = l[i] + sT[j, i]")
    if bf16:
        _emit_pv_bf16(s, GN, BM, Dv, mr_pv, val)
        return
    s("# acc = corr * acc + P @ V (MR query rows x Dv, vectorised)")
    emit_gemm_tile(s, rows=BM, mr=mr_pv, width=Dv, red=str(GN), a=lambda r, x: f"sT[{x}, {r}]", b=val, cols=PV_COLS,
                   init=lambda r, w: f"acc[{r}, {w}] * corr[{r}]",
                   store=lambda r, w, val_: f"acc[{r}, {w}] = {val_}")


def _emit_pv_bf16(s: Script, GN: int, BM: int, Dv: int, mr_pv: int, val) -> None:
    """``acc = corr * acc + P @ V`` on bf16 dot products: P and V packed by pairs of keys (int32 words)."""
    s("# P and V as bf16 pairs of keys: P2[x, i] = (p[2x, i], p[2x+1, i]), V2[x, w] = (v[2x, w], v[2x+1, w])")
    with s.block(f"for x in range({GN // 2}):"):
        for o in range(0, BM, BF16_LANES):
            s(f'P2[x, {ramp(o)}] = T.call_pure_extern("int32x{BF16_LANES}", "lincomp_pack_bf16", '
              f"sT[2 * x, {ramp(o)}], sT[2 * x + 1, {ramp(o)}])")
        with s.block(f"for w in T.vectorized({Dv}):"):
            s(f'V2[x, w] = T.bitwise_or(T.bitwise_and(T.Cast("int32", {val("2 * x", "w")}), 65535), '
              f'T.shift_left(T.Cast("int32", {val("2 * x + 1", "w")}), 16))')
    s("# acc = corr * acc + P @ V (MR query rows x Dv columns, 16 per dot product)")
    for c0 in range(0, Dv, PV_COLS):
        width = min(PV_COLS, Dv - c0)
        emit_bf16_tile(s, rows=BM, mr=mr_pv, width=width, pairs=str(GN // 2),
                       a=lambda r, x: f"P2[{x}, {r}]", b=lambda x, o, c0=c0: f"V2[{x}, {ramp(c0 + o)}]",
                       init=lambda r, o, c0=c0: f"acc[{r}, {ramp(c0 + o)}] * T.broadcast(corr[{r}], {BF16_LANES})",
                       store=lambda r, o, val_, c0=c0: f"acc[{r}, {ramp(c0 + o)}] = {val_}")


def _emit_pooled(s: Script, spec: AttentionSpec, GN: int, BM: int, D: int, Dv: int, mr_qk: int, mr_pv: int,
                 bf16: bool = False) -> None:
    """CLEAR's pooled keys (``window.pool``): after the plan's tiles, a grid tile's queries attend to all P
    pooled keys ``kp`` / ``vp`` (pooled once per call, outside) in the same online softmax. Tiles of
    prefix queries (every slot < n) skip them; padding slots compute rows nobody writes."""
    P, n = spec.window.pooled_tokens, spec.prefix
    rows = pooled_rows(spec, GN)
    GN = pooled_step(spec, GN)            # keys per pooled step from here on
    steps = rows // GN
    s(f"# pooled keys: {P} of them, {steps} steps of {GN}; only tiles holding grid queries")
    s('qmax = T.alloc_buffer((1,), "int32")')
    s("qmax[0] = -1")
    with s.block(f"for i in range({BM}):"):
        s("qmax[0] = T.max(qmax[0], qpos[i])")
    with s.block(f"if qmax[0] >= {n}:"):
        with s.block(f"for pt in range({steps}):"):
            def mask():
                if P % GN == 0:      # every pooled key is real: no mask, max only
                    _emit_row_max(s, f"range({GN})", BM)
                    return
                with s.block(f"for j in range({GN}):"):
                    with s.block(f"for i in T.vectorized({BM}):"):
                        s(f"sT[j, i] = T.if_then_else(pt * {GN} + j < {P}, sT[j, i], {NEG_INF})",
                          "mu[i] = T.max(mu[i], sT[j, i])")

            _emit_step(s, GN, BM, D, Dv, mr_qk, mr_pv, mask,
                       key=lambda r, x: f"kp[b, hk, pt * {GN} + {r}, {x}]",
                       val=lambda x, w: f"vp[b, hk, pt * {GN} + {x}, {w}]", bf16=bf16)


def _emit_positions(s: Script, spec: AttentionSpec, buf: str, tile: str, size: int, grid: bool,
                    offset: str = "", valid: str = "") -> None:
    """Token position of each slot of a tile (-1: a padding slot, or a tile past the list when ``valid``
    is false); written to ``buf[offset + i]``."""
    at = f"{offset} + i" if offset else "i"
    with s.block(f"for i in T.vectorized({size}):" if not grid else f"for i in range({size}):"):
        pos = f"tokens[{tile}, i]" if grid else f"T.if_then_else({tile} * {size} + i < L, {tile} * {size} + i, -1)"
        s(f"{buf}[{at}] = T.if_then_else({valid}, {pos}, -1)" if valid else f"{buf}[{at}] = {pos}")


def _emit_init(s: Script, spec: AttentionSpec, BM: int, Dv: int, inwin: bool) -> None:
    """m, l start at the sinks (keys with logit t and value 0), else at -inf and 0; acc at 0 (``inwin``: the
    in-window linear sums ll, accl too)."""
    if spec.sinks:
        logits = [f"sink_logits[h, {c}]" for c in range(spec.sinks)]
        mx = logits[0]
        for x in logits[1:]:
            mx = f"T.max({mx}, {x})"
        s("# sinks: extra logits in the denominator only; the caller passes them times log2(e) (a product")
        s("# here would fuse into an fma with the max subtracted from it: wrong by an ulp of a huge logit).")
        s("# Sinks all at -inf (switched off) add nothing: shift by 0, as a row with no key yet does.")
        s(f"sink_max = {mx}")
        s(f"sink_shift = T.if_then_else(sink_max == {NEG_INF}, T.float32(0), sink_max)")
        s("sink_sum = " + " + ".join(exp2(f"{x} - sink_shift") for x in logits))
        m0, l0 = "sink_max", "sink_sum"
    else:
        m0, l0 = NEG_INF, "T.float32(0)"
    with s.block(f"for i in T.vectorized({BM}):"):
        s(f"m[i] = {m0}", f"l[i] = {l0}")
        if inwin:
            s("ll[i] = T.float32(0)")
    with s.block(f"for i in range({BM}):"):
        with s.block(f"for d in T.vectorized({Dv}):"):
            s("acc[i, d] = T.float32(0)")
            if inwin:
                s("accl[i, d] = T.float32(0)")


def _emit_shared_inwindow(s, spec, BM, G, BN1, Dv, F, gate, fk_head, vis, mr_qk, mr_pv) -> None:
    """combine="shared": the linear terms of keys inside the window, to subtract from the full scan
    (a step of G key tiles of BN1 keys; only partly visible tiles are masked)."""
    BN = G * BN1
    s("# linear terms of the keys inside the window (the scan counted every key j <= i; remove these)")
    if gate == "vector":
        with s.block(f"for j in range({BN}):"):
            with s.block(f"for i in T.vectorized({BM}):"):
                s("aT[j, i] = T.float32(0)")
            with s.block(f"for f in range({F}):"):
                with s.block(f"for i in T.vectorized({BM}):"):
                    dec = exp2(f"T.min(T.Cast(\"float32\", G[b, h, T.max(qpos[i], 0), f] - "
                               f"G[b, h, T.max(kpos[j], 0), f]), T.float32(0)) * {f32(LOG2E)}")
                    s(f"aT[j, i] = aT[j, i] + fqT[f, i] * fk[b, {fk_head}, T.max(kpos[j], 0), f] * {dec}")
    else:
        emit_gemm_tile(s, rows=BN, mr=mr_qk, width=BM, red=str(F),
                       a=lambda r, x: f"fk[b, {fk_head}, T.max(kpos[{r}], 0), {x}]",
                       b=lambda x, w: f"fqT[{x}, {w}]", init=None,
                       store=lambda r, w, val: f"aT[{r}, {w}] = {val}", tag="cl")
        if gate == "scalar":
            with s.block(f"for j in range({BN}):"):
                with s.block(f"for i in T.vectorized({BM}):"):
                    dec = exp2(f"T.min(T.Cast(\"float32\", G[b, h, T.max(qpos[i], 0)] - G[b, h, T.max(kpos[j], 0)]), "
                               f"T.float32(0)) * {f32(LOG2E)}")
                    s(f"aT[j, i] = aT[j, i] * {dec}")
    def row_sums(rows, mask):
        with s.block(f"for j in {rows}:"):
            with s.block(f"for i in T.vectorized({BM}):"):
                if mask:
                    s(f"aT[j, i] = T.if_then_else({vis}, aT[j, i], T.float32(0))")
                s("ll[i] = ll[i] + aT[j, i]")
    if BM < 32 and G == 1:   # measured on Zen 3 (MiniLM shape): there the branch costs more than the mask saves
        row_sums(f"range({BN})", True)
    else:
        _emit_per_tile(s, G, BN1, lambda rows: row_sums(rows, True), lambda rows: row_sums(rows, False))
    emit_gemm_tile(s, rows=BM, mr=mr_pv, width=Dv, red=str(BN), cols=PV_COLS,
                   a=lambda r, x: f"aT[{x}, {r}]",
                   b=lambda x, w: f"v[b, hk, T.max(kpos[{x}], 0), {w}]",
                   init=lambda r, w: f"accl[{r}, {w}]",
                   store=lambda r, w, val: f"accl[{r}, {w}] = {val}", tag="cl")


def _emit_epilogue(s: Script, spec: AttentionSpec, BM: int, Dv: int, shared: bool, summed: bool,
                   save_lse: bool = False, lagged: bool = False, bf16: bool = False) -> None:
    s("# write the tile's rows (padding slots have no position)")
    with s.block(f"for i in range({BM}):"):
        with s.block("if qpos[i] >= 0:"):
            s("p = qpos[i]")
            if save_lse and not shared:   # m + log2(l): -inf for a row without keys (m = -inf, l = 0)
                s(f"lse[b, h, p] = T.if_then_else(l[i] == T.float32(0), {NEG_INF}, m[i] + T.log2(l[i]))")
            if lagged:   # num / den hold the keys outside the window alone: nothing cancels
                s("gam = window_gamma[h]", "den = gam * l[i] + lin_den[b, h, p]")
                with s.block(f"for d in T.vectorized({Dv}):"):
                    s("o[b, h, p, d] = T.if_then_else(den == T.float32(0), T.float32(0), "
                      "(gam * acc[i, d] + lin_num[b, h, p, d]) / den)")
            elif shared:
                s("gam = window_gamma[h]",
                  "den = gam * l[i] + lin_den[b, h, p] - ll[i]",
                  "# the out-of-window linear part is the full scan minus the in-window terms: its rounding",
                  "# error is ~2^-24 (|lin_den| + |ll|); cond = that over |den| (the caller checks it)",
                  "# (a row whose keys are all padded has nothing at all: no cancellation, output 0)",
                  "cond[b, h, p] = T.if_then_else(den == T.float32(0) and lin_den[b, h, p] + ll[i] != T.float32(0), "
                  "T.float32(math.inf), T.if_then_else(den == T.float32(0), T.float32(0), "
                  "(T.abs(lin_den[b, h, p]) + T.abs(ll[i])) / T.abs(den)))")
                with s.block(f"for d in T.vectorized({Dv}):"):
                    s("o[b, h, p, d] = T.if_then_else(den == T.float32(0), T.float32(0), "
                      "(gam * acc[i, d] + lin_num[b, h, p, d] - accl[i, d]) / den)")
                if save_lse:   # training (shared_train.py): the row's lse over the shared normaliser, den in place
                    s(f"lse[b, h, p] = T.if_then_else(den > T.float32(0), m[i] + T.log2(den / gam), {NEG_INF})",
                      "lin_den[b, h, p] = den")
            else:
                s("inv = T.if_then_else(l[i] == T.float32(0), T.float32(0), T.float32(1) / l[i])   # NaN stays NaN")
                if bf16:   # rounded to bf16 here (16 columns a call), not by another pass over o
                    for c in range(0, Dv, BF16_LANES):
                        s(f"o[b, h, p, {ramp(c // 2, BF16_LANES // 2)}] = T.call_pure_extern(\"int32x{BF16_LANES // 2}\", "
                          f"\"lincomp_round_bf16\", acc[i, {ramp(c)}] * T.broadcast(inv, {BF16_LANES}))")
                    return
                with s.block(f"for d in T.vectorized({Dv}):"):
                    if summed:
                        s("o[b, h, p, d] = lin_o[b, h, p, d] + alpha[h] * acc[i, d] * inv")
                    else:
                        s("o[b, h, p, d] = acc[i, d] * inv")
