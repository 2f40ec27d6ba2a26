"""Training on the TVM window kernels: the forward that saves the log-sum-exp and the backward kernels.

``TVMKernel.forward_and_save`` / ``saved_like`` / ``backward_saved`` (the custom op's training contract,
:mod:`lincomp.backends.ops`) and direct kernel calls on inputs that require grad (:class:`WindowTrainFn`)
land here. The forward is window.py's kernel with ``save_lse`` (saved: ``lse2 [B, H, L]`` fp32, each row's
log2-sum-exp2 of its base-2 scores, sinks and pooled keys included); the backward runs window_bwd.py's
generated kernels over the same block plan in both directions, ``delta = rowsum(dO * o)`` and ``d sink_logits``
in torch (O(B H L) work). Pooled keys (``window.pool``): the pooled kernels over a dense host plan give
d kp, d vp and add their dq share; the pooling's vjp (d k, d v, d pool_weight) is torch (O(L D) work).
Configs come from the one chooser under the kernel name ``window_bwd``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from lincomp.inputs import bind
from lincomp.ir.blocks import aligned_block, block_plan, window_tile
from lincomp.lower.tvmir import build as _build
from lincomp.lower.tvmir import window as _window
from lincomp.lower.tvmir import window_bwd as _bwd
from lincomp.lower.tvmir.codegen import base2
from lincomp.runtime.buffers import alloc_output
from lincomp.runtime.kernel import Unsupported, wants
from lincomp.runtime.pool import pool_kv_vjp, pooled_kv, window_only
from lincomp.spec import GridWindow
from lincomp.tuning import median_time_ms
from lincomp.tuning import tune as run_tune
from lincomp.tuning.choose import Choice, choose

KERNEL = "window_bwd"


# ---------------------------------------------------------------------------------- config space
def default_config(spec, sizes, L: int) -> dict:
    """The untuned backward choice (measured on a 2-core AVX2 host, benchmarks/results/train_cpu.md): tiles
    of 32 (grid windows: the forward's 16 / 32), about 8 score accumulators per micro-kernel step and one
    row per dq / dk / dv step (a row of D = 64 floats already takes 8 AVX2 registers); dq fused into the
    dk / dv pass when there are at least as many kv heads as cores, else a separate dq kernel."""
    split = sizes.Hkv < _build.usable_cores()
    if isinstance(spec.window, GridWindow):
        bm = 16 if len(spec.window.grid) == 2 else 32
        bm = aligned_block(spec.window, 16, bm) or bm
        tile = window_tile(spec.window, bm)
    else:
        bm, tile = (32 if L > 16 else 16), None
    cfg = _bwd.WindowBwdConfig(bm, bm, tile, max(1, 64 // bm), 1, split)
    return normalise(spec, cfg.to_dict(), max(sizes.D, sizes.Dv))


def config_space(spec, sizes, L: int) -> list:
    """A small measured space (12 to 40 configs): tile sizes x (fused | split dq) x micro-kernel rows of the
    score products and of the dq / dk / dv products. The latter are fitted to the registers (normalise): on
    AVX2, whose 16 registers hold 2 rows of 64, one row (two measured slower), so those configs coincide; with
    AVX-512's 32, 2 rows share each loaded row of dO / Q / K (sliding window 256, one thread: 39.1 -> 30.2 ms)."""
    out = []
    grid = isinstance(spec.window, GridWindow)
    for bm in (16, 32, 64):
        for bn in ((bm,) if grid else (bm, 2 * bm) if bm < 64 else (bm,)):
            for split in (False, True):
                for mr, mr_d in ((max(1, 64 // bn), 1), (max(1, 128 // bn), 1), (max(1, 64 // bn), 2),
                                 (max(1, 64 // bn), 4)):
                    tile = window_tile(spec.window, bm) if grid else None
                    out.append(normalise(spec, _bwd.WindowBwdConfig(bm, bn, tile, mr, mr_d, split).to_dict(),
                                         max(sizes.D, sizes.Dv)))
    return list({_frozen(c): c for c in out}.values())


def normalise(spec, cfg: dict, width_d: int = 64) -> dict:
    """A config as the kernels take it (grid windows: square tiles, a tile shape; 1D: no tile);
    ``width_d``: the widest head dim (the dq / dk / dv products' vector width)."""
    c = _bwd.WindowBwdConfig.from_dict(cfg)
    if isinstance(spec.window, GridWindow):
        c = replace(c, block_n=c.block_m, tile=c.tile or window_tile(spec.window, c.block_m))
    else:
        c = replace(c, tile=None)
    return replace(c, mr=_fit_rows(c.mr, c.block_n, 4), mr_d=_fit_rows(c.mr_d, width_d, 2)).to_dict()


def _fit_rows(asked: int, width: int, default: int) -> int:
    """Micro-kernel rows: as asked (0: ``default``), capped so the accumulators (rows x width floats) and a
    few operands fit the vector registers (spilled accumulators measured 1.5x slower)."""
    lanes, regs = _build.vector_lanes(), _build.vector_registers()
    most = max(1, (regs - 8) // max(1, -(-width // lanes)))
    return max(1, min(asked or default, most, 16))


def choice(kernel, sizes, L: int) -> Choice:
    """The ``window_bwd`` config for this bucket: fixed (``config={"window_bwd": ...}``) > db > default."""
    key = (KERNEL, sizes, _bucket(sizes, L))
    cache = kernel._configs
    if key not in cache:
        cache[key] = choose(
            "tvm", KERNEL, window_only(kernel.spec), "float32", sizes.bucket(L, "window"), device="cpu",
            default=lambda: default_config(kernel.spec, sizes, L), fixed=kernel._fixed.get(KERNEL),
            normalize=lambda cfg: normalise(kernel.spec, cfg, max(sizes.D, sizes.Dv)), db=kernel._db)
    return cache[key]


def _bucket(sizes, L: int) -> str:
    from lincomp.tuning import shape_bucket
    return shape_bucket(**sizes.bucket(L, "window"))


def _frozen(cfg: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()))


# ------------------------------------------------------------------------------------------ modules
def _module(kernel, tag: str, sizes, cfg: dict, make):
    """A compiled module for (tag, sizes, cfg), memoised on the kernel next to its forward modules."""
    key = (tag, sizes, _frozen(cfg))
    built = kernel._mods.get(key)
    if built is None:
        built = _build.build(make(), f"{tag}-{kernel.spec.summary() or 'spec'}")
        kernel._mods[key] = built
    kernel._built = {**kernel._built, tag: built}   # kernel.source shows the training kernels too
    return built


def _dims(sizes) -> "_window.WindowDims":
    return _window.WindowDims(sizes.H, sizes.Hkv, sizes.D, sizes.Dv)


def _bwd_plan(kernel, L: int, cfg: dict) -> tuple:
    """(plan in query-tile order, plan in key-tile order, tokens) as int32 tensors, cached per length."""
    tile = tuple(cfg["tile"]) if cfg.get("tile") else None
    key = (L, cfg["block_m"], cfg["block_n"], tile)
    cache = kernel.__dict__.setdefault("_bwd_plans", {})
    hit = cache.get(key)
    if hit is None:
        p = block_plan(kernel.spec, L, cfg["block_m"], cfg["block_n"], tile)
        i32 = (lambda t: t.to(torch.int32).contiguous())
        fwd = [i32(p.kv_offsets), i32(p.kv_indices), i32(p.kv_full)]
        bwd = [i32(p.q_offsets), i32(p.q_indices), i32(p.q_full)]
        tokens = [i32(p.q_tokens)] if _window.tiled(kernel.spec) else []
        hit = cache[key] = (fwd, bwd, tokens)
        while len(cache) > 16:
            cache.pop(next(iter(cache)))
    return hit


def _pooled_plans(kernel, L: int, cfg: dict) -> tuple:
    """(plan by query tile, plan by pooled key tile) of the pooled kernels, int32, cached per length: dense
    (every tile of grid queries x every tile of pooled keys); a pair is full when neither tile has padding."""
    key = ("pooled", L, cfg["block_m"], cfg["block_n"])
    cache = kernel.__dict__.setdefault("_bwd_plans", {})
    hit = cache.get(key)
    if hit is None:
        BM, BN, n, P = cfg["block_m"], cfg["block_n"], kernel.spec.prefix, kernel.spec.window.pooled_tokens
        nq, nk = -(-(L - n) // BM), -(-P // BN)
        qfull, kfull = (torch.arange(1, nq + 1) * BM + n <= L), (torch.arange(1, nk + 1) * BN <= P)
        i32 = (lambda t: t.to(torch.int32).contiguous())
        fwd = [i32(torch.arange(nq + 1) * nk), i32(torch.arange(nk).repeat(nq)), i32(qfull[:, None] & kfull[None, :])]
        bwd = [i32(torch.arange(nk + 1) * nq), i32(torch.arange(nq).repeat(nk)), i32(kfull[:, None] & qfull[None, :])]
        hit = cache[key] = ([t.reshape(-1) for t in fwd], [t.reshape(-1) for t in bwd])
    return hit


def _pooled_backward(kernel, call, mod, c, cfg: dict, do, lse2, delta, dq, dk, dv) -> torch.Tensor:
    """The pooled keys' share: dq += (in place), dk / dv of the grid tokens += the pooling's vjp of d kp / d vp;
    returns d pool_weight (pool_weight's shape)."""
    spec, B, Hkv, L, D, Dv = kernel.spec, call.B, call.Hkv, call.L, call.D, call.Dv
    P, n = spec.window.pooled_tokens, spec.prefix
    kp, vp = (x.contiguous() for x in pooled_kv(spec, call.k, call.v, call.pool_weight.to(torch.float32)))
    dkp, dvp = alloc_output((B, Hkv, P, D), torch.float32), alloc_output((B, Hkv, P, Dv), torch.float32)
    by_query, by_key = _pooled_plans(kernel, L, _bwd.pooled_config(c).to_dict())
    head = [call.q, kp, vp, do, lse2, delta]
    if c.split_dq:
        mod.fn("pooled_bwd_dkdv")(*head, *by_key, dkp, dvp, call.scale)
        mod.fn("pooled_bwd_dq")(*head, *by_query, dq, call.scale)
    else:
        mod.fn("pooled_bwd_dkdv")(*head, *by_key, dkp, dvp, dq, call.scale)
    grid, f = spec.window.grid, spec.pool
    dk_grid, dw_k = pool_kv_vjp(dkp, call.k, grid, f, n, call.pool_weight)
    dv_grid, dw_v = pool_kv_vjp(dvp, call.v, grid, f, n, call.pool_weight)
    dk[:, :, n:] += dk_grid
    dv[:, :, n:] += dv_grid
    return (dw_k + dw_v).reshape(call.pool_weight.shape)


# ------------------------------------------------------------------------------------------- calls
def saved_like(kernel, q, k, v, **tensors) -> list:
    if _bwd.unsupported_reason(kernel.spec) is not None:
        return []
    return [q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32)]


def forward_and_save(kernel, q, k, v, **kwargs) -> tuple:
    """(o [B, H, L, Dv], [lse2 [B, H, L] fp32]) from the window kernel with ``save_lse``; (o, None) for a spec
    without a TVM backward (the custom op calls this for inference too: the forward stays on the kernels,
    a gradient, if one is asked, comes from the reference)."""
    if _bwd.unsupported_reason(kernel.spec) is not None:
        with torch.no_grad():
            return kernel.forward(q, k, v, **kwargs), None
    call = kernel._bind_checked(q, k, v, **kwargs)
    if call.return_state:
        raise Unsupported("return_state: a softmax-only spec has no state to return")
    if call.key_padding_mask is not None:   # the padded forward runs on the kernels; no backward kernel for it
        with torch.no_grad():
            return kernel.forward(q, k, v, **kwargs), None
    out_dtype = q.dtype
    kernel._prepare(call)
    sizes = kernel.sizes_of(call)
    choices = kernel._choices_for(sizes, call.L)
    cfg = choices["window"].params
    dims = _dims(sizes)
    mod = _module(kernel, "window_lse", sizes, cfg, lambda: [_window.window_source(
        kernel.spec, dims, _window.WindowConfig.from_dict(cfg), save_lse=True)])
    B, H, L = call.B, call.H, call.L
    o, lse2 = alloc_output((B, H, L, call.Dv), torch.float32), alloc_output((B, H, L), torch.float32)
    mod.fn("window_fwd")(*kernel._window_inputs(call, cfg), o, lse2, call.scale)
    kernel.config = {**kernel.config, "window_fwd": choices["window"].as_dict()}
    return (o if out_dtype == torch.float32 else o.to(out_dtype)), [lse2]


def backward_saved(kernel, grad_o, o, saved, q, k, v, *, scale=None, row_stats: bool = False,
                   rows_only: bool = False, needs=None, **tensors) -> dict:
    """{"q", "k", "v", "sink_logits", "pool_weight"}: gradients of sum(grad_o * o) from o and the saved lse2;
    ``row_stats`` adds "rows": (rsum [B, H, L] = sum_j ds_ij, ridx [B, H, L] int32 = each row's argmax key,
    -1: none); ``rows_only``: {"rows": (rsum, None)} alone, from one pass of two products per pair.
    ``needs`` (the names wanted, None: all): without q, k, v and pool_weight no pass over the pairs runs (the
    sinks' gradient needs only the rows' lse and delta)."""
    call = bind(kernel.spec, q, k, v, scale=scale, check_values=False, **tensors)
    kernel._prepare(call)
    sizes = kernel.sizes_of(call)
    ch = choice(kernel, sizes, call.L)
    cfg = ch.params
    B, H, Hkv, L, D, Dv = call.B, call.H, call.Hkv, call.L, call.D, call.Dv
    do = kernel._fit("grad_o", grad_o.contiguous())
    delta = (do * o.to(torch.float32)).sum(-1).contiguous()                         # [B, H, L]
    lse2 = saved[0].to(torch.float32)
    lse2 = torch.where(lse2 == -math.inf, math.inf, lse2).contiguous()   # a row without keys: p = 2^-inf = 0
    c = _bwd.WindowBwdConfig.from_dict(cfg)
    if not wants(needs, "q", "k", "v", "pool_weight") and not (row_stats or rows_only):
        return {"q": None, "k": None, "v": None, "pool_weight": None, "sink_logits": _sink_grad(call, lse2, delta)}
    tag = "window_bwd_rows_only" if rows_only else "window_bwd_rows" if row_stats else "window_bwd"
    mod = _module(kernel, tag, sizes, cfg, lambda: _bwd.backward_source(kernel.spec, _dims(sizes), c, row_stats,
                                                                        rows_only))
    fwd_plan, bwd_plan, tokens = _bwd_plan(kernel, L, cfg)
    head = [call.q, call.k, call.v, do, lse2, delta]
    if rows_only:
        rsum = torch.zeros((B, H, L))
        mod.fn("window_bwd_rows")(*head, *fwd_plan, *tokens, rsum, call.scale)
        kernel.config = {**kernel.config, KERNEL: ch.as_dict()}
        return {"rows": (rsum, None)}
    dk, dv = alloc_output((B, Hkv, L, D), torch.float32), alloc_output((B, Hkv, L, Dv), torch.float32)
    rows = ([torch.zeros((B, H, L)), torch.full((B, H, L), -math.inf), torch.full((B, H, L), -1, dtype=torch.int32)]
            if row_stats else [])   # updated in place by the pass that owns the query rows
    if c.split_dq:
        dq = alloc_output((B, H, L, D), torch.float32)
        mod.fn("window_bwd_dkdv")(*head, *bwd_plan, *tokens, dk, dv, call.scale)
        mod.fn("window_bwd_dq")(*head, *fwd_plan, *tokens, dq, *rows, call.scale)
    else:
        dq = torch.zeros((B, H, L, D), dtype=torch.float32)   # accumulated in place by the dk / dv pass
        mod.fn("window_bwd_dkdv")(*head, *bwd_plan, *tokens, dk, dv, dq, *rows, call.scale)
    dpool = None
    if kernel.spec.pool is not None:
        dpool = _pooled_backward(kernel, call, mod, c, cfg, do, lse2, delta, dq, dk, dv)
    kernel.config = {**kernel.config, KERNEL: ch.as_dict()}
    out = {"q": dq, "k": dk, "v": dv, "sink_logits": _sink_grad(call, lse2, delta), "pool_weight": dpool}
    if row_stats:
        out["rows"] = (rows[0], rows[2])
    return out


def _sink_grad(call, lse2: torch.Tensor, delta: torch.Tensor):
    """d sink_logits [H, m] (None without sinks): a sink is a key with value 0, so dp = 0 and d logit = -sum over
    rows of p_sink * delta (p_sink = 2^(t log2 e - lse2); lse2 +inf for a row without keys)."""
    if call.sink_logits is None:
        return None
    p = torch.exp2(base2(call.sink_logits).double()[None, :, None, :] - lse2.double()[..., None])
    return -(p * delta.double()[..., None]).sum((0, 2))


def tune_backward(kernel, q, k, v, *, db, force: bool, progress, reps: int, space=None, **tensors):
    """Measure ``space`` (default :func:`config_space`) for the backward at these inputs' sizes (one fixed
    grad_o); store the best. Each config's gradients are checked against the default's. None when the spec
    has no TVM backward."""
    if _bwd.unsupported_reason(kernel.spec) is not None:
        return None
    with torch.no_grad():
        o, saved = forward_and_save(kernel, q, k, v, **tensors)
        call = bind(kernel.spec, q, k, v, **tensors)
        sizes = kernel.sizes_of(call)
        g = torch.randn(o.shape, generator=torch.Generator().manual_seed(0))
        base = dict(choice(kernel, sizes, call.L).params)
        fixed, key = kernel._fixed.get(KERNEL), (KERNEL, sizes, _bucket(sizes, call.L))

        def run(cfg):
            kernel._configs[key] = Choice("tuning", cfg, {})
            return backward_saved(kernel, g, o, saved, q, k, v, **tensors)

        ref = run(base)

        def build(cfg):
            cfg = normalise(kernel.spec, cfg, max(sizes.D, sizes.Dv))
            got = run(cfg)
            for n in ("q", "k", "v"):
                err = ((got[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item()
                if not err <= 1e-4:
                    raise RuntimeError(f"config disagrees with the default config on d{n} (rel err {err:.2e})")
            return lambda: run(cfg)

        try:
            res = run_tune(space or config_space(kernel.spec, sizes, call.L), build,
                           lambda fn: median_time_ms(fn, warmup=1, reps=reps, device="cpu"),
                           backend="tvm", kernel=KERNEL, spec=window_only(kernel.spec), dtype="float32",
                           dims=sizes.bucket(call.L, "window"), db=db, device="cpu", force=force, progress=progress)
        finally:
            kernel._configs.pop(key, None)
        if fixed is None:
            kernel._configs[key] = Choice("tuned", normalise(kernel.spec, res.config, max(sizes.D, sizes.Dv)),
                                          choice(kernel, sizes, call.L).key)
    return res


class WindowTrainFn(torch.autograd.Function):
    """A direct ``kernel(q, k, v, ...)`` call on inputs that require grad: the same kernels as the op."""

    @staticmethod
    def forward(ctx, kernel, kwargs, q, k, v, sink_logits, pool_weight):
        o, saved = forward_and_save(kernel, q, k, v, **_with(kwargs, sink_logits, pool_weight))
        ctx.kernel, ctx.kwargs = kernel, kwargs
        ctx.save_for_backward(q, k, v, sink_logits, pool_weight, o, *saved)
        return o

    @staticmethod
    def backward(ctx, grad_o):
        q, k, v, sink_logits, pool_weight, o, *saved = ctx.saved_tensors
        g = backward_saved(ctx.kernel, grad_o, o, saved, q, k, v, **_with(ctx.kwargs, sink_logits, pool_weight))
        cast = (lambda d, x: None if (d is None or x is None) else d.to(x.dtype))
        return (None, None, cast(g["q"], q), cast(g["k"], k), cast(g["v"], v), cast(g["sink_logits"], sink_logits),
                cast(g["pool_weight"], pool_weight))


def _with(kwargs: dict, sink_logits, pool_weight) -> dict:
    """kwargs plus the differentiable weights that are given."""
    given = {"sink_logits": sink_logits, "pool_weight": pool_weight}
    return dict(kwargs, **{n: t for n, t in given.items() if t is not None})


def train_call(kernel, q, k, v, **kwargs):
    """``kernel(q, k, v, ...)`` with autograd through the TVM backward (Unsupported: not covered)."""
    why = _bwd.unsupported_reason(kernel.spec)
    if why is not None:
        raise Unsupported(why)
    extra = set(kwargs) - {"scale", "sink_logits", "pool_weight", "return_state", "linear_scale"}
    if extra:
        raise Unsupported(f"{sorted(extra)} with inputs that require grad have no TVM backward")
    if kwargs.get("return_state"):
        raise Unsupported("return_state with a softmax-only spec")
    sink, pool_weight = kwargs.pop("sink_logits", None), kwargs.pop("pool_weight", None)
    kw = {n: kwargs[n] for n in ("scale",) if kwargs.get(n) is not None}
    return WindowTrainFn.apply(kernel, kw, q, k, v, sink, pool_weight)
