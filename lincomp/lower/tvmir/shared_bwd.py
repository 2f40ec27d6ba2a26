"""The backward of combine="shared"'s in-window linear terms (the template shared_train.py subtracts).

The shared forward forms the out-of-window linear part as (full scan) - (in-window terms), the in-window
terms being ``T_ij = d_ij phi(q_i) . phi(k_j)`` over the window's visible pairs (``d_ij`` the gate's decay,
1 without a gate), with values ``[v_j, 1]``. Given the upstream ``dU_i = [du_i, dd_i]`` of that unnormalised
sum (``du = dO / den``, ``dd = -(dO . o) / den``), one visited (query tile, key tile) pair of the window's
block plan gives::

    dT[BM, BN] = du_tile @ V_tile^T + dd              (masked by the printed rule unless the pair is full)
    W          = dT * d                               (scalar gate: the decay; vector gate: per feature)
    dfq_i     += sum_j W_ij fk_j,   dfk_j += sum_i W_ij fq_i,   dv_j += sum_i T_ij du_i

Two PrimFuncs walk the plan in its two directions, each owning the rows it writes (no atomics):
``shared_bwd_q`` (one task per (batch, head, query tile): dfq) and ``shared_bwd_k`` (one task per (batch,
head, key tile): dfk and dv per query head; the host sums GQA groups). The gate's gradient needs no kernel
output: ``d G_i = fq_i . dfq_i`` and ``d G_j = -fk_j . dfk_j`` (per feature for a vector gate). Without ``dv``
(no value gradient wanted) the key pass skips ``T`` and its product: two products per pair instead of four.
"""

from __future__ import annotations

from dataclasses import dataclass

from lincomp.lower.tvmir.codegen import LOG2E, Script, divisor_at_most, emit_gemm_tile, exp2, f32
from lincomp.lower.tvmir.window import _emit_positions, emit_gate_buffer, tiled, visibility
from lincomp.spec import AttentionSpec


@dataclass(frozen=True)
class SharedBwdDims:
    """Static sizes: query heads, kv heads, key-feature heads (H or Hkv), feature width F, value dim Dv."""

    H: int
    Hkv: int
    HF: int
    F: int
    Dv: int


def arg_names(spec: AttentionSpec, which: str, dv: bool = True) -> list:
    """Arguments of ``shared_bwd_q`` / ``shared_bwd_k`` in order (the launcher passes them so)."""
    names = ["fq", "fk", "v", "du", "dd"] + (["G"] if spec.linear.gate is not None else [])
    names += ["kv_offsets", "kv_indices", "kv_full"] if which == "q" else ["q_offsets", "q_indices", "q_full"]
    if tiled(spec):
        names.append("tokens")
    return names + (["dfq"] if which == "q" else ["dfk", "dv"] if dv else ["dfk"])


def backward_source(spec: AttentionSpec, dims: SharedBwdDims, block_m: int, block_n: int, mr: int = 4,
                    dv: bool = True) -> list:
    """[TVMScript PrimFunc texts]: ``shared_bwd_q`` and ``shared_bwd_k`` over tiles of block_m x block_n
    (``dv``: the key pass also forms d v)."""
    return [_source(spec, dims, block_m, block_n, mr, "q"), _source(spec, dims, block_m, block_n, mr, "k", dv)]


def _source(spec: AttentionSpec, dims: SharedBwdDims, BM: int, BN: int, mr: int, which: str,
            with_dv: bool = True) -> str:
    H, Hkv, HF, F, Dv = dims.H, dims.Hkv, dims.HF, dims.F, dims.Dv
    gate = spec.linear.gate
    grid = tiled(spec)
    if grid and BM != BN:
        raise ValueError(f"grid windows need block_m == block_n, got {BM}, {BN}")
    by_key = which == "k"
    with_dv = with_dv and by_key
    name = f"shared_bwd_{which}"
    names = arg_names(spec, which, with_dv)
    s = Script()
    s("@T.prim_func")
    with s.block(f"def {name}({', '.join(f'{a}_h: T.handle' for a in names)}):"):
        s(f'T.func_attr({{"global_symbol": "{name}", "tir.noalias": True}})')
        s("B = T.int32()", "L = T.int32()", "NT1 = T.int32()", "NNZ = T.int32()")
        at = 5 + int(gate is not None)
        off, idx, full = names[at:at + 3]
        s(f'fq = T.match_buffer(fq_h, (B, {H}, L, {F}), "float32")',
          f'fk = T.match_buffer(fk_h, (B, {HF}, L, {F}), "float32")',
          f'v = T.match_buffer(v_h, (B, {Hkv}, L, {Dv}), "float32")',
          f'du = T.match_buffer(du_h, (B, {H}, L, {Dv}), "float32")',
          f'dd = T.match_buffer(dd_h, (B, {H}, L), "float32")',
          f'{off} = T.match_buffer({off}_h, (NT1,), "int32")',
          f'{idx} = T.match_buffer({idx}_h, (NNZ,), "int32")',
          f'{full} = T.match_buffer({full}_h, (NNZ,), "int32")')
        emit_gate_buffer(s, gate, H, F)
        if grid:
            s(f'tokens = T.match_buffer(tokens_h, (NT1 - 1, {BM}), "int32")')
        if by_key:
            s(f'dfk = T.match_buffer(dfk_h, (B, {H}, L, {F}), "float32")')
        else:
            s(f'dfq = T.match_buffer(dfq_h, (B, {H}, L, {F}), "float32")')
        if with_dv:
            s(f'dv = T.match_buffer(dv_h, (B, {H}, L, {Dv}), "float32")')
        s("# one task per (batch, head, key tile)" if by_key else "# one task per (batch, head, query tile)")
        with s.block(f"for task in T.parallel(B * {H} * (NT1 - 1)):"):
            tile = "kt" if by_key else "t"
            s(f"b = task // ({H} * (NT1 - 1))", f"h = task // (NT1 - 1) % {H}", f"{tile} = task % (NT1 - 1)",
              f"hk = h // {H // Hkv}", f"hf = h // {H // HF}")
            bufs = [("qpos", f"({BM},)", "int32"), ("kpos", f"({BN},)", "int32"), ("vT", f"({Dv}, {BN})", "float32"),
                    ("w", f"({BM}, {BN})", "float32"), ("rdd", f"({BM},)", "float32")]
            # the task's outputs, each accumulated in "<name>_acc" over its tile's rows
            pos, rows = ("kpos", BN) if by_key else ("qpos", BM)
            outs = ([("dfk", F)] + ([("dv", Dv)] if with_dv else [])) if by_key else [("dfq", F)]
            bufs += [(f"{out}_acc", f"({rows}, {width})", "float32") for out, width in outs]
            if with_dv:
                bufs += [("fkT", f"({F}, {BN})", "float32"), ("tt", f"({BM}, {BN})", "float32")]
            for buf, shape, dt in bufs:
                s(f'{buf} = T.alloc_buffer({shape}, "{dt}")')
            for out, width in outs:
                with s.block(f"for r in range({rows}):"):
                    with s.block(f"for c in T.vectorized({width}):"):
                        s(f"{out}_acc[r, c] = T.float32(0)")
            if by_key:
                _emit_positions(s, spec, "kpos", "kt", BN, grid)
                _emit_key_tile(s, BN, F, Dv, with_dv)
                walk = s.block(f"for e in range({off}[kt], {off}[kt + 1]):")
            else:
                _emit_positions(s, spec, "qpos", "t", BM, grid)
                _emit_query_rows(s, BM)
                walk = s.block(f"for e in range({off}[t], {off}[t + 1]):")
            with walk:
                if by_key:
                    s(f"t = {idx}[e]")
                    _emit_positions(s, spec, "qpos", "t", BM, grid)
                    _emit_query_rows(s, BM)
                else:
                    s(f"kt = {idx}[e]")
                    _emit_positions(s, spec, "kpos", "kt", BN, grid)
                    _emit_key_tile(s, BN, F, Dv, False)
                _emit_pair(s, spec, BM, BN, F, Dv, mr, f"{full}[e]", with_dv)
                if with_dv:
                    s("# dv += T^T @ du")
                    emit_gemm_tile(s, rows=BN, mr=divisor_at_most(BN, mr), width=Dv, red=str(BM),
                                   a=lambda r, x: f"tt[{x}, {r}]", b=lambda x, w: f"du[b, h, T.max(qpos[{x}], 0), {w}]",
                                   init=lambda r, w: f"dv_acc[{r}, {w}]",
                                   store=lambda r, w, val: f"dv_acc[{r}, {w}] = {val}")
                _emit_feature_grad(s, gate, BM, BN, F, mr, by_key)
            s("# write the tile's rows (padding slots have no position)")
            with s.block(f"for r in range({rows}):"):
                with s.block(f"if {pos}[r] >= 0:"):
                    for out, width in outs:
                        with s.block(f"for c in T.vectorized({width}):"):
                            s(f"{out}[b, h, {pos}[r], c] = {out}_acc[r, c]")
    return s.text()


def _emit_key_tile(s: Script, BN: int, F: int, Dv: int, features: bool) -> None:
    s("# the key tile's values (and key features), transposed: keys are the vectorised axis")
    with s.block(f"for j in range({BN}):"):
        with s.block(f"for c in range({Dv}):"):
            s("vT[c, j] = v[b, hk, T.max(kpos[j], 0), c]")
        if features:
            with s.block(f"for f in range({F}):"):
                s("fkT[f, j] = fk[b, hf, T.max(kpos[j], 0), f]")


def _emit_query_rows(s: Script, BM: int) -> None:
    with s.block(f"for i in range({BM}):"):
        s("rdd[i] = dd[b, h, T.max(qpos[i], 0)]")


def _decay(gate, f: str = "") -> str:
    """d_ij of the gate (per feature ``f`` for a vector gate), as the forward computes it."""
    at = (lambda p: f"G[b, h, T.max({p}, 0), {f}]") if gate == "vector" else (lambda p: f"G[b, h, T.max({p}, 0)]")
    return exp2(f"T.min(T.Cast(\"float32\", {at('qpos[i]')} - {at('kpos[j]')}), T.float32(0)) * {f32(LOG2E)}")


def _emit_pair(s: Script, spec: AttentionSpec, BM: int, BN: int, F: int, Dv: int, mr: int, full: str,
               with_t: bool) -> None:
    """``w`` = dT (times the scalar decay) and, for the key pass, ``tt`` = T; invisible pairs get 0."""
    gate = spec.linear.gate
    mr_s = divisor_at_most(BM, mr)
    s("# dT = du @ V^T + dd")
    emit_gemm_tile(s, rows=BM, mr=mr_s, width=BN, red=str(Dv),
                   a=lambda r, x: f"du[b, h, T.max(qpos[{r}], 0), {x}]", b=lambda x, w: f"vT[{x}, {w}]",
                   init=None, store=lambda r, w, val: f"w[{r}, {w}] = {val} + rdd[{r}]")
    if with_t:
        if gate == "vector":
            s("# T = sum_f fq fk d (per-feature decays)")
            with s.block(f"for i in range({BM}):"):
                with s.block(f"for j in range({BN}):"):
                    s("tt[i, j] = T.float32(0)")
                    with s.block(f"for f in range({F}):"):
                        s(f"tt[i, j] = tt[i, j] + fq[b, h, T.max(qpos[i], 0), f] * fkT[f, j] * {_decay(gate, 'f')}")
        else:
            s("# T = phi(q) @ phi(k)^T")
            emit_gemm_tile(s, rows=BM, mr=mr_s, width=BN, red=str(F),
                           a=lambda r, x: f"fq[b, h, T.max(qpos[{r}], 0), {x}]", b=lambda x, w: f"fkT[{x}, {w}]",
                           init=None, store=lambda r, w, val: f"tt[{r}, {w}] = {val}")
    vis = visibility(spec, "qpos[i]", "kpos[j]")
    dec = _decay(gate) if gate == "scalar" else None
    outs = ["w"] + (["tt"] if with_t else [])
    # Full tiles (no padding, every pair visible) skip the rule; vectorised over keys either way (a scalar
    # rule per element cost more than the pair's two GEMMs).
    s("# the window's rule unless the plan marks the pair full, and the scalar decay")
    with s.block(f"if {full} == 0:"):
        with s.block(f"for i in range({BM}):"):
            with s.block(f"for j in T.vectorized({BN}):"):
                for out in outs:
                    val = f"{out}[i, j]" + (f" * {dec}" if dec else "")
                    s(f"{out}[i, j] = T.if_then_else(qpos[i] >= 0 and ({vis}), {val}, T.float32(0))")
    if dec:
        with s.block("else:"):
            with s.block(f"for i in range({BM}):"):
                with s.block(f"for j in T.vectorized({BN}):"):
                    for out in outs:
                        s(f"{out}[i, j] = {out}[i, j] * {dec}")


def _emit_feature_grad(s: Script, gate, BM: int, BN: int, F: int, mr: int, by_key: bool) -> None:
    """dfk += W^T @ fq (key pass) or dfq += W @ fk (query pass); per-feature decays for a vector gate."""
    if gate == "vector":
        s("# per-feature decays: an elementwise pass over the pair's features")
        outer, inner = ("j", "i") if by_key else ("i", "j")
        acc, other = ("dfk_acc[j, f]", "fq[b, h, T.max(qpos[i], 0), f]") if by_key else \
            ("dfq_acc[i, f]", "fk[b, hf, T.max(kpos[j], 0), f]")
        with s.block(f"for {outer} in range({BN if by_key else BM}):"):
            with s.block(f"for {inner} in range({BM if by_key else BN}):"):
                with s.block(f"for f in range({F}):"):
                    s(f"{acc} = {acc} + w[i, j] * {other} * {_decay(gate, 'f')}")
        return
    if by_key:
        emit_gemm_tile(s, rows=BN, mr=divisor_at_most(BN, mr), width=F, red=str(BM),
                       a=lambda r, x: f"w[{x}, {r}]", b=lambda x, w: f"fq[b, h, T.max(qpos[{x}], 0), {w}]",
                       init=lambda r, w: f"dfk_acc[{r}, {w}]", store=lambda r, w, val: f"dfk_acc[{r}, {w}] = {val}")
    else:
        emit_gemm_tile(s, rows=BM, mr=divisor_at_most(BM, mr), width=F, red=str(BN),
                       a=lambda r, x: f"w[{r}, {x}]", b=lambda x, w: f"fk[b, hf, T.max(kpos[{x}], 0), {w}]",
                       init=lambda r, w: f"dfq_acc[{r}, {w}]", store=lambda r, w, val: f"dfq_acc[{r}, {w}] = {val}")
