"""The window (softmax) backward template: FlashAttention-2 style gradients over a block plan.

The forward (window.py with ``save_lse``) leaves ``o`` and each row's base-2 log-sum-exp ``lse2``
(sinks included). With ``delta = rowsum(dO * o)`` (host), one visited (query tile, key tile) pair gives::

    s[BM, BN]  = Q_tile @ K_tile^T                 (keys vectorised: kT[D, BN] gathered once per key tile)
    p          = 2^(s * scale * log2(e) - lse2)    (masked unless the plan marks the pair full: the IR rule)
    dp[BM, BN] = dO_tile @ V_tile^T
    ds         = p * (dp - delta)                  (the gradient of the natural-log scores)
    dv += p^T @ dO,   dk += ds^T @ Q,   dq += ds @ K          (dq, dk scaled by ``scale`` at the end)

Two PrimFuncs iterate the plan in its two directions:

- ``window_bwd_dkdv``: one task per (batch, kv head, key tile) walking the TRANSPOSED plan (the query
  tiles that see the key tile), summing over the heads of a GQA group; with ``split_dq=False`` it is one
  task per (batch, kv head), walking its key tiles in order and adding ``ds @ K`` into dq in place (no
  second pass over the pairs: 5 products per pair instead of 7, but only B * Hkv parallel tasks);
- ``window_bwd_dq`` (``split_dq=True`` only): one task per (batch, head, query tile) walking the plan.

Grid windows visit re-ordered tokens (``tokens``, as the forward). Hybrids have no backward here (the
caller raises Unsupported); combine="shared" (shared_train.py) runs this template on its window part with
``row_stats``: the pass that owns the query rows (dq) also adds each row's ``sum_j ds`` into ``rsum [B, H, L]``
and keeps its highest visible raw score and key (``rbest``, ``ridx``): the gradient of the window gain and of
the row max the shared normaliser is not shifted by. When no q / k / v gradient is wanted (attention transfer
trains only the feature maps and the gain) ``window_bwd_rows`` is that pass alone with ``rsum`` only: two
products per pair (s and dp) instead of five.

Pooled keys (CLEAR's ``window.pool``): the saved lse2 already spans window + pooled keys, so the window
kernels above give the window keys' share unchanged; ``pooled_bwd_dkdv`` / ``pooled_bwd_dq`` are the same
template over the ``P`` pooled keys ``kp``, ``vp`` [B, Hkv, P, D] (the last key tile's padding slots have
position -1) against every grid query (prefix queries see no pooled key: the query tiles
start after the prefix). They walk a dense host plan (every pooled key tile x every query tile), produce
``dkp`` / ``dvp`` and ADD their share into the window pass's dq. The pooling's own vjp (d k, d v, d pool_weight
from dkp, dvp) is a reshape and a contraction on the host (runtime/pool.py ``pool_kv_vjp``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Tuple

from lincomp.lower.tvmir.codegen import LOG2E, NEG_INF, Script, check_config_int, divisor_at_most, emit_gemm_tile, exp2, f32
from lincomp.lower.tvmir.window import WindowDims, _emit_positions, signature, tiled, visibility
from lincomp.spec import AttentionSpec


@dataclass(frozen=True)
class WindowBwdConfig:
    """Schedule choices of the backward (the ``window_bwd`` tuning space)."""

    block_m: int = 32                    # queries per tile
    block_n: int = 32                    # keys per tile (the vectorised axis; grid windows: == block_m)
    tile: Optional[Tuple[int, ...]] = None  # grid tile shape (prod == block_m)
    mr: int = 4                          # rows per micro-kernel step of the score products (width block_n)
    mr_d: int = 4                        # rows per step of the dq / dk / dv products (width D)
    split_dq: bool = False               # True: a separate dq kernel (more parallel tasks, 7 products per pair)

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            check_config_int(getattr(self, name), f"window_bwd.{name}", 1, 256, pow2=True)
        check_config_int(self.mr, "window_bwd.mr", 0, 64)
        check_config_int(self.mr_d, "window_bwd.mr_d", 0, 64)
        if not isinstance(self.split_dq, bool):
            raise TypeError(f"config window_bwd.split_dq must be a bool, got {self.split_dq!r}")
        if self.tile is not None and (len(self.tile) not in (2, 3) or _prod(self.tile) != self.block_m):
            raise ValueError(f"config window_bwd.tile {list(self.tile)} must have 2 or 3 axes and product "
                             f"block_m={self.block_m}")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tile"}
        return d if self.tile is None else {**d, "tile": list(self.tile)}

    @classmethod
    def from_dict(cls, d: dict) -> "WindowBwdConfig":
        tile = d.get("tile")
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d and f.name != "tile"},
                   tile=None if tile is None else tuple(tile))


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def unsupported_reason(spec: AttentionSpec) -> Optional[str]:
    """Why the backward kernels cannot differentiate ``spec`` (None: they can)."""
    if spec.linear is not None:
        return "hybrid specs (a linear branch) have no TVM window backward here"
    if not spec.has_softmax:
        return "no softmax branch"
    return None


def arg_names(spec: AttentionSpec, which: str, pooled: bool = False, row_stats: bool = False) -> list:
    """Arguments of ``window_bwd_dkdv`` / ``window_bwd_dq`` / ``window_bwd_rows`` in order (the launcher passes them so); the
    ``pooled_bwd_*`` kernels take the same with k, v, dk, dv the pooled ones and no tokens; ``row_stats``: the
    in-place row outputs ``rsum``, ``rbest``, ``ridx`` of the pass that owns dq."""
    names = ["q", "k", "v", "do", "lse2", "delta"]
    by_query = which in ("dq", "rows")
    names += ["kv_offsets", "kv_indices", "kv_full"] if by_query else ["q_offsets", "q_indices", "q_full"]
    if tiled(spec) and not pooled:
        names.append("tokens")
    outs = {"dkdv": ["dk", "dv", "dq"], "dkdv_split": ["dk", "dv"], "dq": ["dq"], "rows": []}[which]
    rows = ["rsum"] if which == "rows" else ["rsum", "rbest", "ridx"] if row_stats and which != "dkdv_split" else []
    return names + outs + rows + ["scale"]


def backward_source(spec: AttentionSpec, dims: WindowDims, cfg: WindowBwdConfig, row_stats: bool = False,
                    rows_only: bool = False) -> list:
    """[TVMScript PrimFunc texts] of the backward for ``spec``: dkdv (and dq when ``split_dq``); a pooled
    spec adds the pooled keys' pair (``pooled_bwd_*``); ``rows_only``: ``window_bwd_rows`` alone."""
    if rows_only:
        if spec.pool is not None:
            raise ValueError("rows_only: pooled keys have no row statistics pass")
        return [_source(spec, dims, cfg, "rows")]
    which = ("dkdv_split", "dq") if cfg.split_dq else ("dkdv",)
    out = [_source(spec, dims, cfg, w, row_stats=row_stats) for w in which]
    if spec.pool is not None:
        out += [_source(spec, dims, pooled_config(cfg), w, pooled=True) for w in which]
    return out


def pooled_config(cfg: WindowBwdConfig) -> WindowBwdConfig:
    """The pooled kernels' tiles: 64 grid queries x 32 pooled keys, 3 score rows per micro-kernel step (12
    accumulators), whatever the window's tiles (the pooled pair is dense: no plan, no mask but padding).
    Measured on the 2-core AVX2 host, CLEAR df=4 64x64 + 64: 11-12% less CPU time for the whole backward
    than the window's 16 x 16 tiles (32 x 32, 64 x 32 with 2 rows, 64 x 16 with 6 rows: within 3% of them)."""
    return replace(cfg, block_m=64, block_n=32, tile=None, mr=3)


def _source(spec: AttentionSpec, dims: WindowDims, cfg: WindowBwdConfig, which: str, pooled: bool = False,
            row_stats: bool = False) -> str:
    H, Hkv, D, Dv = dims.H, dims.Hkv, dims.D, dims.Dv
    BM, BN = cfg.block_m, cfg.block_n
    grid = tiled(spec) and not pooled
    if grid and BM != BN:
        raise ValueError(f"grid windows need block_m == block_n, got {BM}, {BN}")
    group = H // Hkv
    P, n = (spec.window.pooled_tokens, spec.prefix) if pooled else (None, None)
    kv_rows = str(P) if pooled else "L"     # a padding key slot (position -1) reads row 0 and gets p = 0

    def positions(buf: str, tile: str, size: int) -> None:
        if not pooled:
            return _emit_positions(s, spec, buf, tile, size, grid)
        pos, end = (f"{tile} * {size} + i", str(P)) if buf == "kpos" else (f"{n} + {tile} * {size} + i", "L")
        with s.block(f"for i in T.vectorized({size}):"):
            s(f"{buf}[i] = T.if_then_else({pos} < {end}, {pos}, -1)")
    vis = "kpos[j] >= 0" if pooled else visibility(spec, "qpos[i]", "kpos[j]")
    mr_s = divisor_at_most(BM, cfg.mr or 4)        # rows of the [BM, BN] score products
    mr_k = divisor_at_most(BN, cfg.mr_d or 4)      # rows of the dk / dv products
    mr_q = divisor_at_most(BM, cfg.mr_d or 4)      # rows of the dq products
    rows_only = which == "rows"
    by_key = which not in ("dq", "rows")
    fused_dq = which == "dkdv"
    name = ("pooled" if pooled else "window") + {"dq": "_bwd_dq", "rows": "_bwd_rows"}.get(which, "_bwd_dkdv")
    names = arg_names(spec, which, pooled, row_stats)
    rows = "sum" if rows_only else "rsum" in names
    s = Script()
    with signature(s, name, names, dims, kv_rows):
        off, idx, full = names[6:9]
        s(f'do = T.match_buffer(do_h, (B, {H}, L, {Dv}), "float32")',
          f'lse2 = T.match_buffer(lse2_h, (B, {H}, L), "float32")',
          f'delta = T.match_buffer(delta_h, (B, {H}, L), "float32")',
          f'{off} = T.match_buffer({off}_h, (NT1,), "int32")',
          f'{idx} = T.match_buffer({idx}_h, (NNZ,), "int32")',
          f'{full} = T.match_buffer({full}_h, (NNZ,), "int32")')
        if grid:
            s(f'tokens = T.match_buffer(tokens_h, (NT1 - 1, {BM}), "int32")')
        if by_key:
            s(f'dk = T.match_buffer(dk_h, (B, {Hkv}, {kv_rows}, {D}), "float32")',
              f'dv = T.match_buffer(dv_h, (B, {Hkv}, {kv_rows}, {Dv}), "float32")')
        if "dq" in names:
            s(f'dq = T.match_buffer(dq_h, (B, {H}, L, {D}), "float32")')
        if rows:
            s(f'rsum = T.match_buffer(rsum_h, (B, {H}, L), "float32")')
        if rows is True:
            s(f'rbest = T.match_buffer(rbest_h, (B, {H}, L), "float32")',
              f'ridx = T.match_buffer(ridx_h, (B, {H}, L), "int32")')
        if fused_dq:
            s("# one task per (batch, kv head): its key tiles in order, so dq rows are only ever added to by it")
            outer = s.block(f"for task in T.parallel(B * {Hkv}):")
        elif by_key:
            s("# one task per (batch, kv head, key tile)")
            outer = s.block(f"for task in T.parallel(B * {Hkv} * (NT1 - 1)):")
        else:
            s("# one task per (batch, head, query tile)")
            outer = s.block(f"for task in T.parallel(B * {H} * (NT1 - 1)):")
        with outer:
            bufs = [("qpos", f"({BM},)", "int32"), ("kpos", f"({BN},)", "int32"),
                    ("kT", f"({D}, {BN})", "float32"), ("vT", f"({Dv}, {BN})", "float32"),
                    ("sc", f"({BM}, {BN})", "float32"), ("ds", f"({BM}, {BN})", "float32"),
                    ("rl", f"({BM},)", "float32"), ("rd", f"({BM},)", "float32")]
            if by_key:
                bufs += [("dk_acc", f"({BN}, {D})", "float32"), ("dv_acc", f"({BN}, {Dv})", "float32")]
            elif not rows_only:
                bufs += [("dq_acc", f"({BM}, {D})", "float32")]
            for buf, shape, dt in bufs:
                s(f'{buf} = T.alloc_buffer({shape}, "{dt}")')
            if fused_dq:
                s(f"b = task // {Hkv}", f"hk = task % {Hkv}")
                kt_loop = s.block("for kt in range(NT1 - 1):")
            elif by_key:
                s(f"b = task // ({Hkv} * (NT1 - 1))", f"hk = task // (NT1 - 1) % {Hkv}", "kt = task % (NT1 - 1)")
                kt_loop = s.block_if(None)
            else:
                s(f"b = task // ({H} * (NT1 - 1))", f"h = task // (NT1 - 1) % {H}", "t = task % (NT1 - 1)",
                  f"hk = h // {group}" if group > 1 else "hk = h")
                kt_loop = s.block_if(None)
            with kt_loop:
                if by_key:
                    positions("kpos", "kt", BN)
                    _emit_kv_tile(s, BN, D, Dv)
                    with s.block(f"for j in range({BN}):"):
                        with s.block(f"for d in T.vectorized({D}):"):
                            s("dk_acc[j, d] = T.float32(0)")
                        with s.block(f"for d in T.vectorized({Dv}):"):
                            s("dv_acc[j, d] = T.float32(0)")
                    heads = s.block(f"for hh in range({group}):")
                    with heads:
                        s(f"h = hk * {group} + hh")
                        with s.block("for e in range(q_offsets[kt], q_offsets[kt + 1]):"):
                            s("t = q_indices[e]")
                            positions("qpos", "t", BM)
                            _emit_rows(s, BM)
                            _emit_pair(s, vis, BM, BN, D, Dv, mr_s, "q_full[e]", rows)
                            s("# dv += p^T @ dO, dk += ds^T @ Q (padding query rows have p = ds = 0)")
                            emit_gemm_tile(s, rows=BN, mr=mr_k, width=Dv, red=str(BM),
                                           a=lambda r, x: f"sc[{x}, {r}]",
                                           b=lambda x, w: f"do[b, h, T.max(qpos[{x}], 0), {w}]",
                                           init=lambda r, w: f"dv_acc[{r}, {w}]",
                                           store=lambda r, w, val: f"dv_acc[{r}, {w}] = {val}")
                            emit_gemm_tile(s, rows=BN, mr=mr_k, width=D, red=str(BM),
                                           a=lambda r, x: f"ds[{x}, {r}]",
                                           b=lambda x, w: f"q[b, h, T.max(qpos[{x}], 0), {w}]",
                                           init=lambda r, w: f"dk_acc[{r}, {w}]",
                                           store=lambda r, w, val: f"dk_acc[{r}, {w}] = {val}")
                            if fused_dq:
                                s("# dq += scale * ds @ K, in place (this task owns these dq rows' updates)")
                                emit_gemm_tile(s, rows=BM, mr=mr_q, width=D, red=str(BN),
                                               a=lambda r, x: f"ds[{r}, {x}] * scale",
                                               b=lambda x, w: f"k[b, hk, T.max(kpos[{x}], 0), {w}]",
                                               init=lambda r, w: f"dq[b, h, T.max(qpos[{r}], 0), {w}]",
                                               store=lambda r, w, val: f"dq[b, h, qpos[{r}], {w}] = {val}",
                                               guard=lambda r: f"qpos[{r}] >= 0")
                    s("# write the key tile's rows (padding slots have no position)")
                    with s.block(f"for j in range({BN}):"):
                        with s.block("if kpos[j] >= 0:"):
                            with s.block(f"for d in T.vectorized({D}):"):
                                s("dk[b, hk, kpos[j], d] = dk_acc[j, d] * scale")
                            with s.block(f"for d in T.vectorized({Dv}):"):
                                s("dv[b, hk, kpos[j], d] = dv_acc[j, d]")
                else:
                    positions("qpos", "t", BM)
                    _emit_rows(s, BM)
                    if not rows_only:
                        with s.block(f"for i in range({BM}):"):
                            with s.block(f"for d in T.vectorized({D}):"):
                                s("dq_acc[i, d] = T.float32(0)")
                    with s.block("for e in range(kv_offsets[t], kv_offsets[t + 1]):"):
                        s("kt = kv_indices[e]")
                        positions("kpos", "kt", BN)
                        _emit_kv_tile(s, BN, D, Dv)
                        _emit_pair(s, vis, BM, BN, D, Dv, mr_s, "kv_full[e]", rows)
                        if not rows_only:
                            emit_gemm_tile(s, rows=BM, mr=mr_q, width=D, red=str(BN),
                                           a=lambda r, x: f"ds[{r}, {x}]",
                                           b=lambda x, w: f"k[b, hk, T.max(kpos[{x}], 0), {w}]",
                                           init=lambda r, w: f"dq_acc[{r}, {w}]",
                                           store=lambda r, w, val: f"dq_acc[{r}, {w}] = {val}")
                    if not rows_only:
                        with s.block(f"for i in range({BM}):"):
                            with s.block("if qpos[i] >= 0:"):
                                with s.block(f"for d in T.vectorized({D}):"):
                                    if pooled:   # the window pass wrote the window keys' share
                                        s("dq[b, h, qpos[i], d] = dq[b, h, qpos[i], d] + dq_acc[i, d] * scale")
                                    else:
                                        s("dq[b, h, qpos[i], d] = dq_acc[i, d] * scale")
    return s.text()


def _emit_kv_tile(s: Script, BN: int, D: int, Dv: int) -> None:
    s("# the key tile's keys and values, transposed (keys are the vectorised axis of every product)")
    with s.block(f"for j in range({BN}):"):
        with s.block(f"for d in range({D}):"):
            s("kT[d, j] = k[b, hk, T.max(kpos[j], 0), d]")
        with s.block(f"for d in range({Dv}):"):
            s("vT[d, j] = v[b, hk, T.max(kpos[j], 0), d]")


def _emit_rows(s: Script, BM: int) -> None:
    """Per query row: lse2 (the host maps a row without keys to +inf, so its p is 0) and delta."""
    with s.block(f"for i in range({BM}):"):
        s("rl[i] = lse2[b, h, T.max(qpos[i], 0)]", "rd[i] = delta[b, h, T.max(qpos[i], 0)]")


def _emit_pair(s: Script, vis: str, BM: int, BN: int, D: int, Dv: int, mr: int, full: str,
               rows: bool = False) -> None:
    """p (in ``sc``) and ds for one (query tile, key tile) pair; padding and invisible pairs (``vis``: the
    generated rule, "query qpos[i] sees key kpos[j]") get p = ds = 0. ``rows``: also the row statistics
    (``rbest`` / ``ridx`` from the raw scores, ``rsum`` += row sums of ds); "sum": ``rsum`` only."""
    s("# sc = Q @ K^T (queries x keys, keys vectorised)")
    emit_gemm_tile(s, rows=BM, mr=mr, width=BN, red=str(D),
                   a=lambda r, x: f"q[b, h, T.max(qpos[{r}], 0), {x}]", b=lambda x, w: f"kT[{x}, {w}]",
                   init=None, store=lambda r, w, val: f"sc[{r}, {w}] = {val}")
    if rows is True:
        s("# each row's highest visible raw score and its key (first of equals in visiting order)")
        with s.block(f"for i in range({BM}):"):
            with s.block("if qpos[i] >= 0:"):
                with s.block(f"for j in range({BN}):"):
                    with s.block(f"if ({full} != 0 and kpos[j] >= 0 or {vis}) and "
                                 "sc[i, j] > rbest[b, h, qpos[i]]:"):
                        s("rbest[b, h, qpos[i]] = sc[i, j]", "ridx[b, h, qpos[i]] = kpos[j]")
    s("# p = 2^(s * scale * log2(e) - lse2), masked by the rule unless the plan marks the pair full")
    c = f"scale * {f32(LOG2E)}"
    with s.block(f"if {full} == 0:"):
        with s.block(f"for i in range({BM}):"):
            with s.block(f"for j in T.vectorized({BN}):"):
                s(f"sc[i, j] = T.if_then_else(qpos[i] >= 0 and ({vis}), {exp2(f'sc[i, j] * {c} - rl[i]')}, "
                  "T.float32(0))")
    with s.block("else:"):
        with s.block(f"for i in range({BM}):"):
            with s.block(f"for j in T.vectorized({BN}):"):
                s(f"sc[i, j] = {exp2(f'sc[i, j] * {c} - rl[i]')}")
    s("# ds = p * (dO @ V^T - delta)")
    emit_gemm_tile(s, rows=BM, mr=mr, width=BN, red=str(Dv),
                   a=lambda r, x: f"do[b, h, T.max(qpos[{r}], 0), {x}]", b=lambda x, w: f"vT[{x}, {w}]",
                   init=None, store=lambda r, w, val: f"ds[{r}, {w}] = sc[{r}, {w}] * ({val} - rd[{r}])")
    if rows:
        with s.block(f"for i in range({BM}):"):
            with s.block("if qpos[i] >= 0:"):
                with s.block(f"for j in range({BN}):"):
                    s("rsum[b, h, qpos[i]] = rsum[b, h, qpos[i]] + ds[i, j]")


__all__ = ["WindowBwdConfig", "backward_source", "arg_names", "unsupported_reason", "NEG_INF"]
