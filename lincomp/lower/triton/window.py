"""Window (softmax) branch -> generated Triton: source, launchers, configs, autotuning, the Kernel.

``compile_window(spec, **hints)`` returns a :class:`WindowKernel` whose ``source`` is the generated
Triton module: ``templates/triton/window_common.py.tmpl`` (the window rule and the tile -> token
map, generated per spec), ``window_fwd.py.tmpl`` (one forward algorithm) and ``window_bwd.py.tmpl``
(one backward algorithm). Everything that varies (prefix, sinks, causal, full-tile skipping, GQA, key
padding, head dims, block and grid-tile shapes) is generated code or a constexpr.

Token order: 1D / terraced / dense windows keep tokens in place (tile t = tokens t*B .. t*B+B-1).
2D / 3D windows visit tiles of grid rectangles (``lincomp.ir.blocks``); the kernels gather those rows
in place through ``tile_tokens`` (pure index arithmetic: no permuted copy of q, k, v, o, do, dq, dk,
dv, and no second indirection in the inner loop). Each gathered row is D contiguous elements and a
tile row is TILE_W consecutive tokens, so the loads stay coalesced.

This module imports triton only when a kernel is loaded or launched (``kernel.source`` works anywhere).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import string
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional

import torch

from lincomp.inputs import bind
from lincomp.ir.blocks import block_plan, default_tile
from lincomp.lower.triton.window_plan import tile_lists
from lincomp.runtime.kernel import Kernel, Unsupported
from lincomp.runtime.pool import merge_pooled, pooled_kv, window_only
from lincomp.spec import AttentionSpec, GridWindow, TerracedWindow, Window1D

KERNELS = ("window_fwd", "window_bwd")          # tuning-db kernel names
MAX_HEAD_DIM = 256
POISON_ENV = "LINCOMP_POISON_OUTPUTS"         # "1": fill outputs with NaN before a kernel writes them

LOG2E = 1.4426950408889634
# Fixed config of the interpreter (it cannot time anything): small tiles, many of them.
INTERPRETER_CONFIG = {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}


# ======================================================================================== codegen
def _template_dir() -> Path:
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "templates" / "triton", here.parents[3] / "templates" / "triton"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError("lincomp templates/triton not found next to the package")


@functools.lru_cache(maxsize=None)
def _template(name: str) -> string.Template:
    return string.Template((_template_dir() / name).read_text())


def _mask_body(spec: AttentionSpec) -> tuple:
    """(lines of window_mask, one-line description) for ``spec``: the window rule as an expression."""
    n, w = spec.prefix, spec.window
    R, C = "_rows({}, TRANSPOSED)".format, "_cols({}, TRANSPOSED)".format
    lines = []
    if w is None:
        doc = "no window: every key" + (" j <= i" if spec.causal else "")
        lines.append(f"vis = {C('kj')} <= {R('qi')}   # causal" if spec.causal else
                     f"vis = ({R('qi')} >= -1) & ({C('kj')} >= -1)   # dense: every pair")
        return lines, doc
    if n:
        lines += [f"qp = qi - {n}   # positions after the {n} prefix tokens", f"kp = kj - {n}"]
        qp, kp = "qp", "kp"
    else:
        qp, kp = "qi", "kj"
    if isinstance(w, Window1D):
        doc = f"1D: i - {w.left} <= j <= i + {w.right}"
        lines.append(f"d = {R(qp)} - {C(kp)}   # i - j")
        if spec.causal and not n:   # causal is d >= 0 itself: one test fewer per pair
            doc += "; causal: j <= i"
            lines.append(f"vis = (d <= {w.left}) & (d >= 0)")
            return lines, doc
        lines.append(f"rule = (d <= {w.left}) & (d >= {-w.right})")
    elif isinstance(w, TerracedWindow):
        b = w.block
        doc = f"terraced blocks of {b}: j <= i and block(j) in {{block(i) - 1, block(i)}}"
        lines.append(f"d = {R(qp)} - {C(kp)}   # i - j")
        lines.append(f"dblock = {R(f'{qp} // {b}')} - {C(f'{kp} // {b}')}")
        lines.append("rule = (d >= 0) & (dblock <= 1)")
    else:
        names = ("f", "y", "x")[-len(w.grid):]
        strides = [math.prod(w.grid[a + 1:]) for a in range(len(w.grid))]
        for side, p in (("q", qp), ("k", kp)):
            for a, (name, g, st) in enumerate(zip(names, w.grid, strides)):
                expr = p if st == 1 else f"{p} // {st}"
                if a > 0:
                    expr = f"{expr} % {g}" if st == 1 else f"({expr}) % {g}"
                lines.append(f"{side}{name} = {expr}")
        for name in names:
            lines.append(f"d{name} = {R('q' + name)} - {C('k' + name)}")
        r = w.radius
        if w.shape == "circle":
            doc = f"{w.kind} circle on grid {list(w.grid)}: " + " + ".join(f"d{x}^2" for x in names) + f" < {r}^2"
            lines.append("rule = " + " + ".join(f"d{x} * d{x}" for x in names) + f" < {r * r}")
        else:
            doc = f"{w.kind} square on grid {list(w.grid)}: max |d| <= {r}"
            lines.append("rule = " + " & ".join(f"(tl.abs(d{x}) <= {r})" for x in names))
    if n:
        doc += f"; prefix {n}: rows and keys < {n} see / are seen by all"
        lines.append(f"vis = rule | ({R('qi')} < {n}) | ({C('kj')} < {n})")
    else:
        lines.append("vis = rule")
    if spec.causal:
        doc += "; causal: j <= i"
        if n or not isinstance(w, TerracedWindow):   # the terraced rule has j <= i already
            lines.append(f"vis = vis & ({C('kj')} <= {R('qi')})")
    return lines, doc


def _tokens_body(spec: AttentionSpec) -> tuple:
    """(lines of tile_tokens, description): tile index -> original token indices."""
    w, n = spec.window, spec.prefix
    if not isinstance(w, GridWindow):
        return (["tok = t * BLOCK + tl.arange(0, BLOCK)", "valid = tok < L"],
                "in place (tile t holds tokens t*BLOCK .. t*BLOCK+BLOCK-1)")
    nd = len(w.grid)
    tile_names = ("TILE_T", "TILE_H", "TILE_W")[-nd:]
    count_names = ("TILES_T", "TILES_Y", "TILES_X")[-nd:]
    axes = ("f", "y", "x")[-nd:]
    lines = ["slot = tl.arange(0, BLOCK)"]
    for a, (cn, g, tn) in enumerate(zip(count_names, w.grid, tile_names)):
        if a > 0:   # the outermost count is never needed
            lines.append(f"{cn}: tl.constexpr = ({g} + {tn} - 1) // {tn}   # tiles along axis {axes[a]}")
    if n:
        lines.append(f"PREFIX_TILES: tl.constexpr = ({n} + BLOCK - 1) // BLOCK")
        lines.append("u = t - PREFIX_TILES   # index among the grid tiles (after the prefix tiles)")
    else:
        lines.append("u = t")
    for a, (ax, tn) in enumerate(zip(axes, tile_names)):
        outer = " * ".join(count_names[a + 1:])
        inner = " * ".join(tile_names[a + 1:])
        tcoord = "u" if not outer else (f"u // {outer}" if " " not in outer else f"u // ({outer})")
        if a > 0:
            tcoord = f"{tcoord} % {count_names[a]}"
        icoord = "slot" if not inner else (f"slot // {inner}" if " " not in inner else f"slot // ({inner})")
        if a > 0:
            icoord = f"{icoord} % {tn}"
        lines.append(f"{ax} = ({tcoord}) * {tn} + {icoord}")
    strides = [math.prod(w.grid[a + 1:]) for a in range(nd)]
    flat = " + ".join(ax if st == 1 else f"{ax} * {st}" for ax, st in zip(axes, strides))
    lines.append(f"tok = {n} + {flat}" if n else f"tok = {flat}")
    lines.append("valid = " + " & ".join(f"({ax} < {g})" for ax, g in zip(axes, w.grid)))
    if n:
        lines += ["is_prefix = t < PREFIX_TILES   # prefix tiles hold their tokens in place",
                  "ptok = t * BLOCK + slot",
                  "tok = tl.where(is_prefix, ptok, tok)",
                  f"valid = tl.where(is_prefix, ptok < {n}, valid)"]
    shape = " x ".join(tile_names)
    return lines, (f"{w.kind} grid {list(w.grid)} in tiles of {shape} tokens (a config choice; row-major inside "
                   f"a tile and across tiles)" + (f"; the {n} prefix tokens first, in tiles of their own" if n else ""))


@functools.lru_cache(maxsize=256)
def render_source(spec: AttentionSpec) -> str:
    """The generated Triton module for ``spec`` (common helpers + forward + backward)."""
    spec = AttentionSpec.coerce(spec)
    if spec.linear is not None:
        raise ValueError(f"the window templates lower softmax-only specs; {spec.summary()} has a linear branch")
    mask_lines, rule_doc = _mask_body(spec)
    tok_lines, order_doc = _tokens_body(spec)
    indent = lambda lines: "\n".join("    " + ln for ln in lines)
    common = _template("window_common.py.tmpl").substitute(
        spec_repr=repr(spec), rule_doc=rule_doc, order_doc=order_doc,
        mask_body=indent(mask_lines), tokens_body=indent(tok_lines))
    return common + _template("window_fwd.py.tmpl").substitute() + _template("window_bwd.py.tmpl").substitute()


def interpreting() -> bool:
    """True when Triton runs kernels through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


_MODULES: dict = {}


def load_kernels(spec: AttentionSpec, mode: Optional[str] = None):
    """The imported generated module for ``spec``: ``mode`` "interp" (TRITON_INTERPRET) or "jit" (compiled);
    default: whatever TRITON_INTERPRET says. One module per mode."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise Unsupported(f"triton is not installed ({e})") from None
    from lincomp.runtime.cache import load_generated_module

    mode = mode or ("interp" if interpreting() else "jit")
    if mode not in ("interp", "jit"):
        raise ValueError(f"mode must be 'interp' or 'jit', got {mode!r}")
    if mode == "interp" and not _triton_imported_interpreted():
        raise Unsupported("TRITON_INTERPRET=1 was set after triton was imported (triton's own library is "
                          "compiled-mode); set it before the first import of triton")
    key = (spec, mode)
    if key not in _MODULES:
        with interpreter_env(mode == "interp"):   # @triton.jit reads TRITON_INTERPRET at import
            _MODULES[key] = load_generated_module(render_source(spec), f"window_{mode}", folder="triton")
    return _MODULES[key]


def _triton_imported_interpreted() -> bool:
    """Whether triton's library functions (tl.zeros, tl.sum: @triton.jit) were made for the interpreter."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction
    return not isinstance(tl.zeros, JITFunction)


@contextlib.contextmanager
def interpreter_env(on: bool):
    """TRITON_INTERPRET set to ``on`` inside the block (restored after)."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


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
        tile = cfg.get("tile") or default_tile(w.grid, cfg["block_m"])
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
            blk = 64 if (w.radius <= 8 or d > 128) else 128
            if d > 128:
                blk = 32 if len(w.grid) == 3 else 64
            warps = 4 if (blk == 64 and d <= 64) or blk == 32 else 8
            cfg = {"block_m": blk, "block_n": blk, "num_warps": warps, "num_stages": 2}
        else:
            blk = 64 if d <= 128 else 32
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
            tiles = [list(default_tile(w.grid, blk))]
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


def _alloc(shape, dtype, device) -> torch.Tensor:
    if os.environ.get(POISON_ENV, "") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


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
    o = _alloc((B, H, L, Dv), q.dtype, q.device)
    lse = _alloc((B, H, L), torch.float32, q.device)
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
    delta = _alloc((B, H, L), torch.float32, dev)
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
    dq = _alloc((B, H, L, D), q.dtype, dev)
    dk = _alloc((B, Hkv, L, D), k.dtype, dev)
    dv = _alloc((B, Hkv, L, Dv), v.dtype, dev)
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
_CHOSEN: dict = {}   # (kernel, spec, device name, dtype, bucket, autotune) -> config (this process)


def _dims(q, v) -> dict:
    return {"L": int(q.shape[2]), "D": int(q.shape[3]), "Dv": int(v.shape[3])}


def choose_config(kernel: str, spec: AttentionSpec, q, v, *, autotune: bool = False, runner=None,
                  db=None) -> dict:
    """The config for this call: interpreter -> fixed; else the tuning db (exact key, then the nearest
    length bucket), tuning first when ``autotune`` (``runner(config) -> zero-arg callable``); else the
    heuristic. Chosen once per key per process."""
    if q.device.type != "cuda" or interpreting():
        return normalize_config(spec, INTERPRETER_CONFIG)
    from lincomp.tuning import TuningDB, device_name, tune

    dims = _dims(q, v)
    D, Dv = dims["D"], dims["Dv"]
    dev = device_name(q.device)
    from lincomp.tuning.db import shape_bucket
    key = (kernel, spec, dev, str(q.dtype), shape_bucket(**dims), bool(autotune))
    if key in _CHOSEN:
        return _CHOSEN[key]
    db = db if db is not None else TuningDB()
    cfg = None
    if autotune and runner is not None:
        res = tune(search_space(kernel, spec, D, Dv), runner, backend="triton", kernel=kernel, spec=spec,
                   dtype=q.dtype, dims=dims, db=db, device=dev)
        cfg = res.config
    else:
        hit = db.lookup("triton", kernel, spec, q.dtype, dims, device=dev, nearest=True)
        if hit is not None:
            try:
                cfg = normalize_config(spec, hit.config)
            except ValueError:
                cfg = None
    cfg = normalize_config(spec, cfg) if cfg is not None else heuristic_config(kernel, spec, D, Dv)
    _CHOSEN[key] = cfg
    return cfg


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
    from lincomp.testing import random_inputs
    from lincomp.tuning import TuningDB, device_name, tune

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
        _CHOSEN[(kernel, spec, dev, str(dtype), _bucket(dims), False)] = normalize_config(spec, r.config)
    return out


def _bucket(dims):
    from lincomp.tuning.db import shape_bucket
    return shape_bucket(**dims)


# ========================================================================================= Kernel
class WindowKernel(Kernel):
    """The window (softmax) branch as generated Triton kernels, differentiable, torch.compile-traceable.

    ``kernel(q, k, v, scale=None, sink_logits=None, key_padding_mask=None) -> o [B, H, L, Dv]``.
    ``kernel.source`` is the generated module; ``kernel.config`` the configs of the last call
    ({"window_fwd": ..., "window_bwd": ...}).
    """

    target = "triton"
    differentiable = True

    def __init__(self, spec, *, config: Optional[Mapping] = None, autotune: bool = False, allow_tf32: bool = False):
        spec = AttentionSpec.coerce(spec)
        super().__init__(spec, source=render_source(spec))
        self.autotune = bool(autotune)
        self.allow_tf32 = bool(allow_tf32)
        fixed = {}
        if config:
            per_kernel = any(key in config for key in KERNELS)
            for kern in KERNELS:
                c = config.get(kern) if per_kernel else config
                if c:
                    fixed[kern] = normalize_config(spec, c)
        self.fixed = fixed
        self.config = dict(fixed)
        self._options = json.dumps({"autotune": self.autotune, "tf32": self.allow_tf32, **fixed}, sort_keys=True)
        self._spec_json = window_only(spec).canonical_json()   # pooled keys: merged after the window op

    def forward(self, q, k, v, *, scale=None, **tensors):
        call = bind(self.spec, q, k, v, scale=scale, **tensors)
        check_supported(call.q, call.k, call.v)
        from lincomp.runtime.window_ops import window_attention
        o, lse = window_attention(call.q, call.k, call.v, call.sink_logits, call.key_padding_mask,
                                  self._spec_json, call.scale, self._options)
        if call.pool_weight is not None:   # CLEAR's pooled keys: pooled once, merged by the rows' lse
            kp, vp = pooled_kv(self.spec, call.k, call.v, call.pool_weight)
            o = merge_pooled(o, lse, call.q, kp, vp, self.spec.prefix, call.scale)
        if not torch.compiler.is_compiling():   # bookkeeping only; nothing for a traced graph
            self.config = last_configs(window_only(self.spec), call.q, call.v, self._options)
        return o

    def tune(self, q, k, v, *, force: bool = False, progress=True, db=None, **tensors) -> list:
        """Kernel-interface tuning (``lincomp.tune``): forward and backward configs for these inputs."""
        inputs = {"q": q, "k": k, "v": v, "sink_logits": tensors.get("sink_logits")}
        res = tune_window(window_only(self.spec), inputs=inputs, db=db, force=force, progress=progress)
        return [res[kern] for kern in KERNELS if kern in res]


def last_configs(spec, q, v, options: str) -> dict:
    """The configs the ops chose for this call's key (what ``kernel.config`` reports)."""
    opts = json.loads(options)
    out = {}
    for kern in KERNELS:
        if kern in opts:
            out[kern] = opts[kern]
        elif q.device.type != "cuda" or interpreting():
            out[kern] = normalize_config(spec, INTERPRETER_CONFIG)
        else:
            from lincomp.tuning import device_name
            key = (kern, spec, device_name(q.device), str(q.dtype), _bucket(_dims(q, v)), bool(opts.get("autotune")))
            if key in _CHOSEN:
                out[kern] = _CHOSEN[key]
    return out


_KNOWN_HINTS = {"config", "autotune", "allow_tf32"}


def compile_window(spec, **hints) -> WindowKernel:
    """A :class:`WindowKernel` for a softmax-only ``spec``.

    Hints: ``config`` (a dict {block_m, block_n, tile, num_warps, num_stages}, or
    {"window_fwd": ..., "window_bwd": ...}): fixed configs; ``autotune`` (default False: use the tuning db,
    else a heuristic; True: tune a new key on first use and store it); ``allow_tf32`` (fp32 inputs use
    tf32 dots: faster, ~5e-3 error). Other hints are for other backends and ignored.
    """
    spec = AttentionSpec.coerce(spec)
    if spec.linear is not None:
        raise ValueError(f"compile_window lowers softmax-only specs (linear=None); {spec.summary()} has a linear "
                         "branch")
    return WindowKernel(spec, **{k: v for k, v in hints.items() if k in _KNOWN_HINTS})
