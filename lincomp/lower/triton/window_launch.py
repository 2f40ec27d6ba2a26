"""The window family's launch layer: configs, launchers, config choice and tuning.

Configs are dicts {block_m, block_n, tile (grid windows), num_warps, num_stages}; ``normalize_config``
checks one, ``heuristic_config`` gives one without tuning, ``search_space`` the ones the autotuner times.
``forward_launch`` / ``backward_launches`` build the kernel launches of the generated module
(``lincomp.lower.triton.window``) for given tensors; ``window_forward`` / ``window_backward`` run them.

Imports triton only through ``load_kernels`` (at the first launch).
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, NamedTuple, Optional

import torch

from lincomp.ir.blocks import aligned_block, block_plan, window_tile
from lincomp.lower.triton.common import alloc, interpreting
from lincomp.lower.triton.window import load_kernels
from lincomp.lower.triton.window_plan import tile_lists
from lincomp.runtime.kernel import Unsupported
from lincomp.spec import AttentionSpec, GridWindow
from lincomp.testing import random_inputs
from lincomp.tuning import TuningDB, device_name, shape_bucket, tune
from lincomp.tuning.choose import Choice, choose
from lincomp.tuning.db import dtype_name

KERNELS = ("window_fwd", "window_bwd")          # tuning-db kernel names
MAX_HEAD_DIM = 256

LOG2E = 1.4426950408889634
# Fixed config of the interpreter (it cannot time anything): small tiles, many of them.
INTERPRETER_CONFIG = {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}


# ======================================================================================== configs
def _pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def block_d(D: int) -> int:
    """Padded head dim: a power of two >= 16 (tl.dot needs K >= 16)."""
    return max(16, _pow2(D))


def normalize_config(spec: AttentionSpec, config: Mapping) -> dict:
    """Check a config and fill defaults: {block_m, block_n, tile, num_warps, num_stages}."""
    cfg = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}
    unknown = set(config) - {"block_m", "block_n", "tile", "num_warps", "num_stages"}
    if unknown:
        raise ValueError(f"window config: unknown keys {sorted(unknown)}; use block_m, block_n, tile, num_warps, "
                         "num_stages")
    cfg.update(config)
    for name in ("block_m", "block_n", "num_warps"):
        v = cfg[name]
        if not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"window config: {name} must be a power of two, got {v!r}")
    if cfg["block_m"] < 16 or cfg["block_n"] < 16:
        raise ValueError(f"window config: block_m and block_n must be >= 16 (tl.dot), got {cfg}")
    if not isinstance(cfg["num_stages"], int) or cfg["num_stages"] < 1:
        raise ValueError(f"window config: num_stages must be an int >= 1, got {cfg['num_stages']!r}")
    w = spec.window
    if isinstance(w, GridWindow):
        if cfg["block_m"] != cfg["block_n"]:
            raise ValueError(f"window config: a {w.kind} window needs block_m == block_n, got {cfg}")
        tile = cfg.get("tile") or window_tile(w, cfg["block_m"])
        tile = [int(x) for x in tile]
        if len(tile) != len(w.grid) or math.prod(tile) != cfg["block_m"]:
            raise ValueError(f"window config: tile {tile} must have {len(w.grid)} axes and product block_m")
        cfg["tile"] = tile
    else:
        cfg.pop("tile", None)
    return cfg


def heuristic_config(kind: str, spec: AttentionSpec, D: int, Dv: int) -> dict:
    """A sensible GPU config without tuning (H100-class shared memory; no spills on sm_90)."""
    d = max(block_d(D), block_d(Dv))
    w = spec.window
    if isinstance(w, GridWindow):
        if kind == "window_fwd":
            # Small radii waste less of each tile with 64-token tiles (8 x 8 in 2D).
            blk = 64 if (w.shape == "tile" or w.radius <= 8 or d > 128) else 128
            if d > 128:
                blk = 32 if len(w.grid) == 3 else 64
            blk = aligned_block(w, 16, blk) or blk   # sliding tiles: blocks inside a tile, none partly visible
            warps = 4 if (blk == 64 and d <= 64) or blk == 32 else 8
            cfg = {"block_m": blk, "block_n": blk, "num_warps": warps, "num_stages": 2}
        else:
            blk = 64 if d <= 128 else 32
            blk = aligned_block(w, 16, blk) or blk
            cfg = {"block_m": blk, "block_n": blk, "num_warps": 4 if d <= 64 else 8, "num_stages": 2 if d <= 128 else 1}
    else:
        m, n, nw, ns = (FWD_SPACE_1D if kind == "window_fwd" else BWD_SPACE_1D)[_dim_class(d)][0]
        cfg = {"block_m": m, "block_n": n, "num_warps": nw, "num_stages": ns}
    return normalize_config(spec, cfg)


# (block_m, block_n, num_warps, num_stages) per padded head dim, checked with aot.compile_launch for
# sm_90: every entry fits H100 shared memory and compiles without register spills (a 128-row tile
# needs 8 warps at D >= 64; 128-wide backward tiles spill).
FWD_SPACE_1D = {
    64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 4)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 64, 4, 4), (128, 32, 8, 3), (64, 32, 4, 4)],
    256: [(64, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
}
BWD_SPACE_1D = {
    64: [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 32, 4, 2)],
    128: [(64, 64, 8, 2), (32, 64, 4, 2), (32, 64, 8, 2), (64, 64, 8, 1), (32, 32, 4, 2)],
    256: [(32, 32, 8, 1), (32, 32, 4, 1), (32, 32, 8, 2)],
}


def _dim_class(d: int) -> int:
    return 64 if d <= 64 else 128 if d <= 128 else 256


def search_space(kind: str, spec: AttentionSpec, D: int, Dv: int) -> list:
    """Configs the autotuner times (JSON-native dicts), the heuristic first."""
    d = _dim_class(max(block_d(D), block_d(Dv)))
    w = spec.window
    space = [heuristic_config(kind, spec, D, Dv)]
    if isinstance(w, GridWindow):
        if kind == "window_fwd":
            blocks = {64: [(64, 4), (64, 8), (128, 8)], 128: [(64, 4), (64, 8), (128, 8)], 256: [(32, 4), (64, 8)]}[d]
        else:
            blocks = {64: [(64, 4), (64, 8), (32, 4)], 128: [(64, 8), (32, 4)], 256: [(32, 8), (32, 4)]}[d]
        for blk, warps in blocks:
            tiles = [list(window_tile(w, blk))]
            if len(w.grid) == 2:  # the same area, other aspect ratios
                th, tw = tiles[0]
                alts = ([th * 2, tw // 2], [th // 2, tw * 2])
            else:                 # fewer frames per tile, wider rectangles
                tt, th, tw = tiles[0]
                alts = ([tt // 2, th * 2, tw], [tt // 2, th, tw * 2])
            for alt in alts:
                if min(alt) >= 1 and all(a <= 2 * g for a, g in zip(alt, w.grid)):
                    tiles.append(alt)
            for tile in tiles:
                space.append({"block_m": blk, "block_n": blk, "tile": tile, "num_warps": warps,
                              "num_stages": 2 if d < 256 or kind == "window_fwd" else 1})
    else:
        table = FWD_SPACE_1D if kind == "window_fwd" else BWD_SPACE_1D
        space += [{"block_m": m, "block_n": n, "num_warps": nw, "num_stages": ns} for m, n, nw, ns in table[d]]
    out, seen = [], set()
    for cfg in space:
        cfg = normalize_config(spec, cfg)
        key = json.dumps(cfg, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out


def _tile3(spec: AttentionSpec, cfg: Mapping) -> tuple:
    tile = cfg.get("tile")
    if not tile:
        return (1, 1, 1)
    return tuple([1] * (3 - len(tile)) + list(tile))


def _plan(spec: AttentionSpec, L: int, cfg: Mapping):
    tile = tuple(cfg["tile"]) if cfg.get("tile") else None
    return block_plan(spec, L, cfg["block_m"], cfg["block_n"], tile=tile)


# ======================================================================================= launchers
def check_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise Unsupported (-> reference fallback) for calls the kernels do not handle."""
    if q.device.type == "cuda":
        pass
    elif q.device.type == "cpu":
        if not interpreting():
            raise Unsupported("CPU tensors need TRITON_INTERPRET=1 for the Triton target (or use target='tvm')")
    else:
        raise Unsupported(f"device {q.device.type} is not a CUDA device")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise Unsupported(f"dtype {q.dtype} (the kernels take float16, bfloat16, float32)")
    if q.dtype == torch.bfloat16 and interpreting():
        raise Unsupported("bfloat16 is not supported by the Triton interpreter")
    D, Dv = q.shape[-1], v.shape[-1]
    if max(D, Dv) > MAX_HEAD_DIM:
        raise Unsupported(f"head dim {max(D, Dv)} > {MAX_HEAD_DIM}")
    L = q.shape[2]
    for name, t in (("q", q), ("k", k), ("v", v)):
        if L * max(t.stride(2), 1) >= 2 ** 31:
            raise Unsupported(f"{name}: L * row stride does not fit in int32 offsets")
    if -(-L // 16) > 65535:   # query tiles run on the launch grid's second axis
        raise Unsupported(f"L = {L} needs more than 65535 query tiles")


def _rows_contig(t: torch.Tensor) -> torch.Tensor:
    """The kernels need unit stride on the last axis (any other strides are fine)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _precision(dtype: torch.dtype, tf32: bool) -> str:
    """tl.dot input precision: exact fp32 ("ieee") unless tf32 is allowed; ignored for 16-bit operands."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if tf32 else "ieee"


class Launch(NamedTuple):
    """One kernel launch: ``kernel[grid](*args, **kwargs)`` (also what ``aot.compile_launch`` compiles)."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict

    def __call__(self):
        self.kernel[self.grid](*self.args, **self.kwargs)


def forward_launch(mod, spec: AttentionSpec, q, k, v, sink_logits, key_padding_mask, scale: float, cfg: Mapping,
                   tf32: bool = False):
    """(Launch of window_fwd, o [B, H, L, Dv], lse [B, H, L]); o and lse are allocated, not yet written."""
    q, k, v = _rows_contig(q), _rows_contig(k), _rows_contig(v)
    B, H, L, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    plan = _plan(spec, L, cfg)
    lists, _ = tile_lists(plan, q.device)
    o = alloc((B, H, L, Dv), q.dtype, q.device)
    lse = alloc((B, H, L), torch.float32, q.device)
    sinks = sink_logits.contiguous() if sink_logits is not None else q
    kpm = key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else q
    m = spec.sinks if sink_logits is not None else 0
    tt, th, tw = _tile3(spec, cfg)
    args = (q, k, v, o, lse, sinks, kpm, *lists.tensors(),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            sinks.stride(0) if m else 0, kpm.stride(0) if key_padding_mask is not None else 0,
            H, H // Hkv, L, float(scale) * LOG2E)
    kwargs = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=block_d(D), BLOCK_DV=block_d(Dv),
                  BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], TILE_T=tt, TILE_H=th, TILE_W=tw,
                  NUM_SINKS=m, SINK_PAD=max(2, _pow2(m)), HAS_KPM=key_padding_mask is not None,
                  INPUT_PRECISION=_precision(q.dtype, tf32), num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    return Launch(mod.window_fwd, (B * H, plan.num_q_tiles), args, kwargs), o, lse


def window_forward(spec: AttentionSpec, q, k, v, sink_logits, key_padding_mask, scale: float, cfg: Mapping,
                   tf32: bool = False):
    """Run the forward kernel: (o [B, H, L, Dv] in q's dtype, lse [B, H, L] fp32, natural log)."""
    launch, o, lse = forward_launch(load_kernels(spec), spec, q, k, v, sink_logits, key_padding_mask, scale, cfg,
                                    tf32)
    launch()
    return o, lse


def backward_launches(mod, spec: AttentionSpec, do, q, k, v, o, lse, dlse, key_padding_mask, scale: float,
                      cfg: Mapping, tf32: bool = False):
    """([Launch of delta, dq, dk/dv kernels], delta, dq, dk, dv), to be run in this order."""
    q, k, v, o, do = (_rows_contig(t) for t in (q, k, v, o, do))
    B, H, L, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    dev = q.device
    delta = alloc((B, H, L), torch.float32, dev)
    dlse_t = dlse.contiguous() if dlse is not None else lse
    blk = 16 if interpreting() else 64
    delta_launch = Launch(mod.window_bwd_delta, (B * H, -(-L // blk)),
                          (o, do, dlse_t, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1),
                           do.stride(2), H, L),
                          dict(HEAD_DIM_V=Dv, BLOCK_DV=block_d(Dv), BLOCK=blk, HAS_DLSE=dlse is not None))
    plan = _plan(spec, L, cfg)
    fwd_lists, bwd_lists = tile_lists(plan, dev)
    kpm = key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else q
    stride_mb = kpm.stride(0) if key_padding_mask is not None else 0
    dq = alloc((B, H, L, D), q.dtype, dev)
    dk = alloc((B, Hkv, L, D), k.dtype, dev)
    dv = alloc((B, Hkv, L, Dv), v.dtype, dev)
    tt, th, tw = _tile3(spec, cfg)
    qk_scale = float(scale) * LOG2E
    common = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=block_d(D), BLOCK_DV=block_d(Dv), BLOCK_M=cfg["block_m"],
                  BLOCK_N=cfg["block_n"], TILE_T=tt, TILE_H=th, TILE_W=tw, HAS_KPM=key_padding_mask is not None,
                  INPUT_PRECISION=_precision(q.dtype, tf32), num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    dq_launch = Launch(mod.window_bwd_dq, (B * H, plan.num_q_tiles),
                       (q, k, v, do, lse, delta, dq, kpm, *fwd_lists.tensors(),
                        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
                        dq.stride(0), dq.stride(1), dq.stride(2), stride_mb, H, H // Hkv, L, qk_scale, float(scale)),
                       common)
    dkdv_launch = Launch(mod.window_bwd_dkdv, (B * Hkv, plan.num_k_tiles),
                         (q, k, v, do, lse, delta, dk, dv, kpm, *bwd_lists.tensors(),
                          q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                          v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
                          dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
                          stride_mb, H, Hkv, H // Hkv, L, qk_scale, float(scale)),
                         common)
    return [delta_launch, dq_launch, dkdv_launch], delta, dq, dk, dv


def window_backward(spec: AttentionSpec, do, q, k, v, o, lse, dlse, sink_logits, key_padding_mask, scale: float,
                    cfg: Mapping, tf32: bool = False):
    """Run the backward kernels: (dq, dk, dv, d sink_logits or None)."""
    launches, delta, dq, dk, dv = backward_launches(load_kernels(spec), spec, do, q, k, v, o, lse, dlse,
                                                    key_padding_mask, scale, cfg, tf32)
    for launch in launches:
        launch()
    dsink = None
    if sink_logits is not None:
        # d t_c = -sum_{b,i} p_ic * delta_i with p_ic = exp(t_c - lse_i) (sinks have value 0).
        lse_safe = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
        p_sink = torch.exp(sink_logits.float()[None, :, None, :] - lse_safe[..., None])     # [B, H, L, m]
        dsink = (-(p_sink * delta[..., None]).sum((0, 2))).to(sink_logits.dtype)
    return dq, dk, dv, dsink


def token_map(spec: AttentionSpec, L: int, cfg: Mapping, device="cpu") -> torch.Tensor:
    """[T, block_m] tokens of every query tile as the generated ``tile_tokens`` computes them (-1 = empty)."""
    mod = load_kernels(spec)
    plan = _plan(spec, L, cfg)
    out = torch.full((plan.num_q_tiles, cfg["block_m"]), -2, dtype=torch.int32, device=device)
    tt, th, tw = _tile3(spec, cfg)
    mod.tile_tokens_kernel[(plan.num_q_tiles,)](out, L, BLOCK=cfg["block_m"], TILE_T=tt, TILE_H=th, TILE_W=tw)
    return out


# ================================================================================ config choice
_CHOSEN: dict = {}   # (kernel, spec, device name, dtype, bucket, autotune) -> Choice (this process)


def _dims(q, v) -> dict:
    return {"L": int(q.shape[2]), "D": int(q.shape[3]), "Dv": int(v.shape[3])}


def choose_config(kernel: str, spec: AttentionSpec, q, v, *, autotune: bool = False, runner=None,
                  db=None) -> Choice:
    """The config of ``kernel`` for this call (``lincomp.tuning.choose``): the interpreter's fixed config
    (it cannot time anything); else the tuning db (exact key, then the nearest length bucket), tuning on
    first use when ``autotune`` (``runner(config) -> zero-arg callable``), else the heuristic. Chosen once
    per key per process."""
    dims = _dims(q, v)
    if q.device.type != "cuda" or interpreting():
        return Choice("default", normalize_config(spec, INTERPRETER_CONFIG),
                      {"backend": "triton", "kernel": kernel, "device": "interpreter", "dtype": str(q.dtype),
                       "bucket": shape_bucket(**dims)})
    D, Dv = dims["D"], dims["Dv"]
    dev = device_name(q.device)
    key = (kernel, spec, dev, str(q.dtype), shape_bucket(**dims), bool(autotune))
    if key not in _CHOSEN:
        db = db if db is not None else TuningDB()
        run_tune = (lambda: tune(search_space(kernel, spec, D, Dv), runner, backend="triton", kernel=kernel,
                                 spec=spec, dtype=q.dtype, dims=dims, db=db, device=dev).config) \
            if autotune and runner is not None else None
        _CHOSEN[key] = choose("triton", kernel, spec, q.dtype, dims, device=dev,
                              default=lambda: heuristic_config(kernel, spec, D, Dv),
                              normalize=lambda cfg: normalize_config(spec, cfg), tune=run_tune, db=db)
    return _CHOSEN[key]


def _check_against(first: list):
    """A closure that rejects a config whose output differs from the first config's (a broken tiling)."""
    def check(outs):
        outs = [o for o in outs if o is not None]
        if not first:
            first.extend(o.detach().float().clone() for o in outs)
            return
        for a, b in zip(outs, first):
            a = a.detach().float()
            if not torch.isfinite(a).all():
                raise RuntimeError("non-finite output")
            err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
            if err > 2e-2:
                raise RuntimeError(f"output differs from the first config's (rel err {err:.3g})")
    return check


def fwd_runner(spec, q, k, v, sink_logits, key_padding_mask, scale, tf32=False):
    """``runner(config)`` for tuning the forward on these inputs (checks each config's output)."""
    check = _check_against([])

    def build(cfg):
        cfg = normalize_config(spec, cfg)
        check(window_forward(spec, q, k, v, sink_logits, key_padding_mask, scale, cfg, tf32))  # compiles
        return lambda: window_forward(spec, q, k, v, sink_logits, key_padding_mask, scale, cfg, tf32)
    return build


def bwd_runner(spec, do, q, k, v, o, lse, dlse, sink_logits, key_padding_mask, scale, tf32=False):
    check = _check_against([])

    def build(cfg):
        cfg = normalize_config(spec, cfg)
        check(window_backward(spec, do, q, k, v, o, lse, dlse, sink_logits, key_padding_mask, scale, cfg, tf32))
        return lambda: window_backward(spec, do, q, k, v, o, lse, dlse, sink_logits, key_padding_mask, scale,
                                       cfg, tf32)
    return build


def tune_window(spec, *, L: Optional[int] = None, B: int = 1, H: int = 16, Hkv: Optional[int] = None, D: int = 128,
                dtype=torch.bfloat16, device="cuda", backward: bool = True, db=None, force: bool = False,
                progress=None, seed: int = 0, inputs: Optional[Mapping] = None,
                max_configs: Optional[int] = None) -> dict:
    """Tune the forward (and backward) kernels of ``spec`` for one shape on ``device``; store in the db.

    ``inputs`` ({"q", "k", "v", optional "sink_logits"} on the device) replaces the random inputs
    (then B, H, Hkv, L, D, dtype come from q); ``max_configs`` keeps the first configs of each space
    (the heuristic first). Returns {"window_fwd": TuneResult, "window_bwd": TuneResult}. A key already in
    the db does no work (unless ``force``). Needs a CUDA device (the interpreter cannot time anything).
    """
    spec = AttentionSpec.coerce(spec)
    if inputs is None:
        device = torch.device(device)
        L = spec.expected_length() or L
        if L is None:
            raise ValueError("tune_window: give L for a spec without a grid window")
        if device.type == "cuda" and not interpreting():
            inputs = random_inputs(spec, B=B, H=H, L=L, D=D, Hkv=Hkv, dtype=dtype, device=device, seed=seed)
    q = inputs["q"] if inputs is not None else None
    if q is None or q.device.type != "cuda" or interpreting():
        raise ValueError("tune_window needs a CUDA device without TRITON_INTERPRET (the interpreter cannot time)")
    k, v, sink = inputs["k"], inputs["v"], inputs.get("sink_logits")
    D, Dv, dtype = q.shape[-1], v.shape[-1], q.dtype
    scale = D ** -0.5
    db = db if db is not None else TuningDB()
    dev = device_name(q.device)
    dims = _dims(q, v)
    limit = (lambda space: space[:max_configs]) if max_configs else (lambda space: space)
    out = {"window_fwd": tune(limit(search_space("window_fwd", spec, D, Dv)), fwd_runner(spec, q, k, v, sink, None, scale),
                              backend="triton", kernel="window_fwd", spec=spec, dtype=dtype, dims=dims, db=db,
                              device=dev, force=force, progress=progress)}
    if backward:
        o, lse = window_forward(spec, q, k, v, sink, None, scale, normalize_config(spec, out["window_fwd"].config))
        do = torch.randn_like(o)
        out["window_bwd"] = tune(limit(search_space("window_bwd", spec, D, Dv)),
                                 bwd_runner(spec, do, q, k, v, o, lse, None, sink, None, scale),
                                 backend="triton", kernel="window_bwd", spec=spec, dtype=dtype, dims=dims, db=db,
                                 device=dev, force=force, progress=progress)
    for kernel, r in out.items():   # later calls in this process see the new result (other buckets: the db)
        for key in [key for key in _CHOSEN if key[:3] == (kernel, spec, dev)]:
            del _CHOSEN[key]
        _CHOSEN[(kernel, spec, dev, str(dtype), _bucket(dims), False)] = Choice(
            "tuned", normalize_config(spec, r.config),
            {"backend": "triton", "kernel": kernel, "device": dev, "dtype": dtype_name(dtype), "bucket": _bucket(dims)})
    return out


def _bucket(dims):
    return shape_bucket(**dims)
