"""Window (softmax) branch -> generated Triton source: the codegen layer of the window family.

``render_source(spec)`` is the generated Triton module: ``templates/triton/window_common.py.tmpl``
(the window rule and the tile -> token map, generated per spec), ``window_fwd.py.tmpl`` (one forward
algorithm) and ``window_bwd.py.tmpl`` (one backward algorithm). Everything that varies (prefix, sinks,
causal, full-tile skipping, GQA, key padding, head dims, block and grid-tile shapes) is generated code
or a constexpr. ``load_kernels(spec)`` imports it (one module per interpreter / compiled mode).

The family is four one-way layers: this module (codegen) -> ``window_launch`` (configs, launchers,
config choice and tuning) -> ``window_op`` (the torch.library ops) -> ``window_kernel`` (the Kernel).

Token order: 1D / terraced / dense windows keep tokens in place (tile t = tokens t*B .. t*B+B-1).
2D / 3D windows visit tiles of grid rectangles (``lincomp.ir.blocks``); the kernels gather those rows
in place through ``tile_tokens`` (pure index arithmetic: no permuted copy of q, k, v, o, do, dq, dk,
dv, and no second indirection in the inner loop). Each gathered row is D contiguous elements and a
tile row is TILE_W consecutive tokens, so the loads stay coalesced.

This module imports triton only when a kernel is loaded (``render_source`` works anywhere).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

from lincomp.ir.lowered import lower
from lincomp.lower.triton.common import interpreter_env, interpreting, template, triton_imported_interpreted
from lincomp.runtime.cache import load_generated_module
from lincomp.runtime.kernel import Unsupported
from lincomp.spec import AttentionSpec, GridWindow


# ======================================================================================== codegen
def _mask_body(spec: AttentionSpec) -> tuple:
    """(lines of window_mask, one-line description) for ``spec``: the IR's rule printed for Triton, per-side
    terms on the query / key vectors, broadcast to the tile where they meet."""
    lowered = lower(spec)
    lines = lowered.triton_lines({"i": "qi", "j": "kj"},
                                 {"i": "_rows({}, TRANSPOSED)", "j": "_cols({}, TRANSPOSED)"})
    return lines, lowered.rule_doc


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
    common = template("window_common.py.tmpl").substitute(
        spec_repr=repr(spec), rule_doc=rule_doc, order_doc=order_doc,
        mask_body=indent(mask_lines), tokens_body=indent(tok_lines))
    return common + template("window_fwd.py.tmpl").substitute() + template("window_bwd.py.tmpl").substitute()


_MODULES: dict = {}


def load_kernels(spec: AttentionSpec, mode: Optional[str] = None):
    """The imported generated module for ``spec``: ``mode`` "interp" (TRITON_INTERPRET) or "jit" (compiled);
    default: whatever TRITON_INTERPRET says. One module per mode."""
    try:
        import triton  # noqa: F401  (only to say clearly when it is missing)
    except ImportError as e:
        raise Unsupported(f"triton is not installed ({e})") from None

    mode = mode or ("interp" if interpreting() else "jit")
    if mode not in ("interp", "jit"):
        raise ValueError(f"mode must be 'interp' or 'jit', got {mode!r}")
    if mode == "interp" and not triton_imported_interpreted():
        raise Unsupported("TRITON_INTERPRET=1 was set after triton was imported (triton's own library is "
                          "compiled-mode); set it before the first import of triton")
    key = (spec, mode)
    if key not in _MODULES:
        with interpreter_env(mode == "interp"):   # @triton.jit reads TRITON_INTERPRET at import
            _MODULES[key] = load_generated_module(render_source(spec), f"window_{mode}", folder="triton")
    return _MODULES[key]
