"""Triton lowering of the linear branch and the window + linear hybrids (SEMANTICS.md sections 2-3).

``compile_linear(spec, **hints)`` turns a spec with ``spec.linear`` set (pure gated / non-causal
linear attention, ``combine="shared"`` (LoLCATs) and ``combine="sum"`` (Lizard)) into a
:class:`LinearKernel`. The generated module is one file per spec: ``linear_common.py.tmpl`` (shared
helpers; the feature map, the window rule and the chunk ranges are generated expressions; gate kind,
normalisation and combine are module-level constexpr flags) followed by one template per algorithm:

- ``linear_fwd``      chunked forward (causal) or whole-state forward (non-causal), window fused in
- ``linear_bwd_dq``   backward, query side (walks the chunks forward, rebuilding the state)
- ``linear_bwd_dkv``  backward, key / value side (walks the chunks backward, carrying dS)
- ``linear_reduce``   whole-sequence sums for the non-causal branch (state and its gradient)

The kernels return gradients with respect to the feature maps phi(q), phi(k) with the gates held
fixed; the host finishes the chain rule (feature-map Jacobian, and for gates the identity
dG_t = phi(q_t) * dphi(q_t) - phi(k_t) * dphi(k_t) summed from the end: see ``run_backward``).

Tensors: q [B, H, L, D], k / v [B, Hkv, L, D | Dv], g [B, H, L] or [B, H, L, F] (log gates <= 0),
feature weights [H, D, E], states S [B, H, F, Dv], z [B, H, F] (returned in fp32).
"""

from __future__ import annotations

import math
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lincomp.inputs import bind
from lincomp.runtime.kernel import Kernel, Unsupported
from lincomp.spec import AttentionSpec, GridWindow, TerracedWindow, Window1D

TEMPLATES = Path(__file__).resolve().parents[2] / "templates" / "triton"
ALGORITHMS = ("linear_fwd", "linear_bwd_dq", "linear_bwd_dkv", "linear_reduce")
MAX_HEAD_DIM = 256  # one program keeps a [F, BV] state and [BT, D] tiles in registers
_GATE_CODE = {None: 0, "scalar": 1, "vector": 2}
_COMBINE_CODE = {None: 0, "sum": 1, "shared": 2}

# Autotuning spaces (GPU). The chunk is BT tokens; vector gates walk the chunk column by column, so
# they keep it short. BV splits the value dimension over programs (more parallelism, less state per
# program, at the price of recomputing the scores per value block).
FWD_SPACE = [{"BT": 64, "BV": bv, "num_warps": w, "num_stages": 2} for bv in (64, 128) for w in (4, 8)]
FWD_SPACE_VECTOR = [{"BT": bt, "BV": bv, "num_warps": 4, "num_stages": 2} for bt in (16, 32) for bv in (64, 128)]
BWD_SPACE = [{"BT": bt, "BV": 64, "num_warps": w, "num_stages": 2} for bt in (32, 64) for w in (4, 8)]
BWD_SPACE_VECTOR = [{"BT": bt, "BV": 64, "num_warps": w, "num_stages": 2} for bt in (16, 32) for w in (4, 8)]


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def interpreting() -> bool:
    """True when Triton runs as the numpy interpreter (TRITON_INTERPRET=1): kernels take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def poisoning() -> bool:
    """LINCOMP_POISON_OUTPUTS=1 fills every output buffer with NaN before a kernel writes it (tests)."""
    return os.environ.get("LINCOMP_POISON_OUTPUTS", "0") == "1"


def alloc(shape, dtype, device) -> torch.Tensor:
    """An output buffer: uninitialised, or NaN-poisoned under LINCOMP_POISON_OUTPUTS=1."""
    if poisoning():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class LinearPlan:
    """What the generated code depends on, read off the spec once."""

    spec: AttentionSpec
    gate: int            # 0 none, 1 scalar, 2 vector
    normalize: bool
    causal: bool
    combine: int         # 0 linear only, 1 "sum", 2 "shared"
    sinks: int
    prefix: int
    feature_map: str
    chunk_size: int

    @classmethod
    def from_spec(cls, spec, allow_softmax_only: bool = False) -> "LinearPlan":
        spec = AttentionSpec.coerce(spec)
        lin = spec.linear
        if lin is None:
            if not allow_softmax_only:
                raise ValueError("compile_linear needs a spec with a linear branch (spec.linear); softmax-only "
                                 "specs go to lincomp.lower.triton.window")
            # the decoder also serves window-only specs: a plan without linear terms
            return cls(spec, 0, False, spec.causal, 0, spec.sinks, spec.prefix, "identity", 64)
        return cls(spec, _GATE_CODE[lin.gate], lin.normalize, spec.causal, _COMBINE_CODE[spec.combine],
                   spec.sinks, spec.prefix, lin.feature_map, lin.chunk_size)

    @property
    def has_linear(self) -> bool:
        return self.spec.linear is not None

    @property
    def hedgehog(self) -> bool:
        return self.feature_map in ("hedgehog", "hedgehog_exp")

    @property
    def window(self):
        return self.spec.window

    # -- generated pieces ------------------------------------------------------------------------
    def constants(self) -> str:
        return "\n".join([
            f"GATE = tl.constexpr({self.gate})  # 0: none, 1: scalar [B, H, L], 2: vector [B, H, L, F]",
            f"NORMALIZE = tl.constexpr({self.normalize})",
            f"CAUSAL = tl.constexpr({self.causal})",
            f"COMBINE = tl.constexpr({self.combine})  # 0: linear only, 1: \"sum\" (Lizard), 2: \"shared\" (LoLCATs)",
            f"SINKS = tl.constexpr({self.sinks})",
            f"PREFIX = tl.constexpr({self.prefix})",
            f"HEDGEHOG = tl.constexpr({self.hedgehog})",
            f"HAS_LINEAR = tl.constexpr({self.has_linear})",
            f"HAS_SOFTMAX = tl.constexpr({self.spec.has_softmax})",
            f"LAGGED = tl.constexpr({self.combine == 2 and self.causal})  # \"shared\", causal: the state lags the window",
        ])

    def feat_index_body(self) -> str:
        if self.hedgehog:
            return ("    # Lanes interleave the two halves of the map (tl.join): lane 2e holds feature e of\n"
                    "    # the first half, lane 2e+1 feature E + e of the second.\n"
                    "    e = offs_f // 2\n"
                    "    return (offs_f % 2) * E + e, e < E")
        return "    return offs_f, offs_f < F"

    def phi_body(self, row: bool = False) -> str:
        fm = self.feature_map
        m = "dmask" if row else "dmask[None, :]"
        if fm == "identity":
            return "    return x"
        if fm == "elu1":
            return f"    return tl.where({m}, tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0))), 0.0)"
        if fm == "relu":
            return "    return tl.maximum(x, 0.0)"
        if row:
            lines = ["    proj = tl.sum(x[:, None] * w, 0)",
                     "    emask = tl.arange(0, BE) < E"]
            red, bc, shape = "0", "", "[2 * BE]"
        else:
            lines = ["    proj = _dot(x, w, DT)",
                     "    emask = (tl.arange(0, BE) < E)[None, :]"]
            red, bc, shape = "1", "[:, None]", "[x.shape[0], 2 * BE]"
        if fm == "hedgehog":  # [softmax(xW), softmax(-xW)], each over its E entries
            for name, sign in (("a", ""), ("c", "-")):
                lines += [f"    {name} = tl.where(emask, {sign}proj, float(\"-inf\"))",
                          f"    {name} = tl.exp({name} - tl.max({name}, {red}){bc})",
                          f"    {name} = {name} / tl.sum({name}, {red}){bc}"]
        else:  # hedgehog_exp: [exp(xW), exp(-xW)]
            lines += ["    a = tl.where(emask, tl.exp(proj), 0.0)",
                      "    c = tl.where(emask, tl.exp(-proj), 0.0)"]
        lines.append(f"    return tl.reshape(tl.join(a, c), {shape})")
        return "\n".join(lines)

    def _rule(self) -> list:
        """Lines computing `rule` from ip, jp (positions after the prefix)."""
        w = self.window
        if w is None:
            return ["    rule = (ip >= 0) | (ip < 0)"]
        if isinstance(w, Window1D):
            return [f"    rule = (jp >= ip - {w.left}) & (jp <= ip + {w.right})"]
        if isinstance(w, TerracedWindow):
            return [f"    bi = ip // {w.block}",
                    f"    bj = jp // {w.block}",
                    "    rule = (jp <= ip) & ((bj == bi) | (bj == bi - 1))"]
        if isinstance(w, GridWindow):
            grid = w.grid
            strides = [math.prod(grid[a + 1:]) for a in range(len(grid))]
            lines, terms = [], []
            for a, (size, stride) in enumerate(zip(grid, strides)):
                lines.append(f"    d{a} = ((ip // {stride}) % {size}) - ((jp // {stride}) % {size})")
                terms.append(f"d{a}")
            if w.shape == "circle":
                lines.append(f"    rule = ({' + '.join(t + ' * ' + t for t in terms)}) < {w.grid_radius ** 2}")
            else:
                mx = f"tl.abs({terms[0]})"
                for t in terms[1:]:
                    mx = f"tl.maximum({mx}, tl.abs({t}))"
                lines.append(f"    rule = {mx} <= {w.grid_radius}")
            return lines
        raise Unsupported(f"window {w!r}")

    def visible_body(self) -> str:
        lines = ["    ip = i - PREFIX", "    jp = j - PREFIX"] + self._rule()
        if self.prefix:
            lines.append("    vis = (i < PREFIX) | (j < PREFIX) | rule")
        else:
            lines.append("    vis = rule")
        if self.causal:
            lines.append("    vis = vis & (j <= i)")
        lines.append("    return vis")
        return "\n".join(lines)

    def _reach_fwd(self) -> int:
        """Largest forward distance j - i of a visible pair after the prefix (non-causal windows)."""
        w = self.window
        if isinstance(w, Window1D):
            return w.right
        if isinstance(w, TerracedWindow):
            return 0
        return w.reach(False)

    def key_chunks_body(self) -> str:
        """Key positions [lo_pos, hi_pos] visible to rows i0..i1 -> chunk indices."""
        w = self.window
        lines = ["    i0 = n * BT", "    i1 = tl.minimum(i0 + BT, L) - 1", "    npre = (PREFIX + BT - 1) // BT"]
        if w is None:
            lines += ["    lo_pos = i0", "    hi_pos = i1"]
        elif isinstance(w, Window1D):
            lines += [f"    lo_pos = i0 - {w.left}", f"    hi_pos = i1 + {w.right}"]
        elif isinstance(w, TerracedWindow):
            lines += [f"    lo_pos = PREFIX + ((i0 - PREFIX) // {w.block} - 1) * {w.block}", "    hi_pos = i1"]
        else:
            lines += [f"    lo_pos = i0 - {w.reach(self.causal)}", f"    hi_pos = i1 + {self._reach_fwd()}"]
        lines.append("    lo_pos = tl.maximum(lo_pos, PREFIX)")
        last = "i1" if self.causal else "L - 1"
        if self.prefix:  # a chunk with prefix rows: those rows see every (allowed) key
            lines += ["    pre_rows = i0 < PREFIX",
                      "    lo_pos = tl.where(pre_rows, 0, lo_pos)",
                      f"    hi_pos = tl.where(pre_rows, {last}, hi_pos)",
                      "    npre = tl.where(pre_rows, 0, npre)"]
        lines += [f"    hi_pos = tl.minimum(hi_pos, {last})",
                  "    lo = tl.maximum(lo_pos // BT, npre)",
                  "    hi = hi_pos // BT"]
        return "\n".join(lines)

    def query_chunks_body(self) -> str:
        """Query positions [lo_pos, hi_pos] that see keys j0..j1 -> chunk indices."""
        w = self.window
        lines = ["    j0 = m * BT", "    j1 = tl.minimum(j0 + BT, L) - 1"]
        # Prefix rows see every key: only without causality can they see keys after the prefix.
        lines.append("    npre = 0" if self.causal else "    npre = (PREFIX + BT - 1) // BT")
        back = 0 if self.causal else None
        if w is None:
            lines += ["    lo_pos = j0", "    hi_pos = j1"]
        elif isinstance(w, Window1D):
            lines += [f"    lo_pos = j0 - {w.right if back is None else 0}", f"    hi_pos = j1 + {w.left}"]
        elif isinstance(w, TerracedWindow):
            lines += ["    lo_pos = j0", f"    hi_pos = PREFIX + ((j1 - PREFIX) // {w.block} + 2) * {w.block} - 1"]
        else:
            lines += [f"    lo_pos = j0 - {self._reach_fwd() if back is None else 0}",
                      f"    hi_pos = j1 + {w.reach(self.causal)}"]
        lines.append("    lo_pos = tl.maximum(lo_pos, PREFIX)")
        if self.prefix:  # a chunk with prefix keys: every (allowed) row sees them
            lines += ["    pre_keys = j0 < PREFIX",
                      f"    lo_pos = tl.where(pre_keys, {'j0' if self.causal else '0'}, lo_pos)",
                      "    hi_pos = tl.where(pre_keys, L - 1, hi_pos)",
                      "    npre = tl.where(pre_keys, 0, npre)"]
        lines += ["    hi_pos = tl.minimum(hi_pos, L - 1)",
                  "    lo = tl.maximum(lo_pos // BT, npre)",
                  "    hi = hi_pos // BT"]
        return "\n".join(lines)

    def docs(self) -> dict:
        phi = {"identity": "phi(x) = x", "elu1": "phi(x) = elu(x) + 1", "relu": "phi(x) = relu(x)",
               "hedgehog": "phi(x) = [softmax(x W), softmax(-x W)] (F = 2E)",
               "hedgehog_exp": "phi(x) = [exp(x W), exp(-x W)] (F = 2E)"}[self.feature_map]
        if not self.has_linear:
            phi = "none (no linear branch)"
        gate = {0: "none (a_t = 1)", 1: "scalar, a_t = exp(g_t), g [B, H, L]",
                2: "vector, a_t = exp(g_t), g [B, H, L, F]"}[self.gate]
        rule = "none (linear only)" if self.window is None else f"{self.window!r}, prefix={self.prefix}, " \
               f"causal={self.causal}"
        return {"phi_doc": phi, "gate_doc": gate, "rule_doc": rule}


def _template(name: str) -> string.Template:
    return string.Template((TEMPLATES / f"{name}.py.tmpl").read_text())


def render_common(plan: LinearPlan, algorithm: str) -> str:
    """The shared helpers of every linear / hybrid / decode kernel for ``plan``."""
    return _template("linear_common").substitute(
        algorithm=algorithm, spec_repr=repr(plan.spec), constants=plan.constants(),
        feat_index_body=plan.feat_index_body(), phi_body=plan.phi_body(False),
        phi_row_body=plan.phi_body(True), visible_body=plan.visible_body(),
        key_chunks_body=plan.key_chunks_body(), query_chunks_body=plan.query_chunks_body(), **plan.docs())


def render_source(plan: LinearPlan) -> str:
    """The whole generated module: common helpers + forward, backward and reduction kernels."""
    parts = [render_common(plan, ", ".join(f"{a}.py.tmpl" for a in ALGORITHMS))]
    parts += [_template(a).substitute() for a in ALGORITHMS]
    return "".join(parts)


_MODULES: dict = {}


def load_module(plan: LinearPlan, source: Optional[str] = None, stem: str = "linear"):
    """Import the generated module (one per spec, per interpreter / compiled mode: triton.jit decides
    which at import)."""
    mode = "interp" if interpreting() else "jit"
    source = render_source(plan) if source is None else source
    key = (source, mode)
    mod = _MODULES.get(key)
    if mod is None:
        from lincomp.runtime.cache import load_generated_module
        name = re.sub(r"[^0-9A-Za-z_]+", "_", f"{stem}_{mode}_{plan.spec.summary()}")[:80]
        mod = load_generated_module(source, name)
        _MODULES[key] = mod
    return mod


# ----------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Dims:
    B: int
    H: int
    HKV: int
    L: int
    D: int
    DV: int
    F: int
    E: int

    @classmethod
    def of(cls, plan: LinearPlan, q, k, v, wq=None) -> "Dims":
        B, H, L, D = q.shape
        E = wq.shape[-1] if plan.hedgehog else 1
        return cls(B, H, k.shape[1], L, D, v.shape[-1], 2 * E if plan.hedgehog else D, E)

    def bucket(self) -> dict:
        return {"H": self.H, "L": self.L, "D": self.D, "Dv": self.DV, "F": self.F}


def default_config(plan: LinearPlan, dims: Dims, device_type: str, chunk_size: Optional[int] = None) -> dict:
    """The fixed config used without tuning: the spec's chunk size (a power of two in [16, 128]; vector
    gates at most 32), one value block under the interpreter, 64-wide value blocks on a GPU."""
    bt = min(128, max(16, next_pow2(chunk_size or plan.chunk_size)))
    if plan.gate == 2:
        bt = min(bt, 32)
    full_v = max(16, next_pow2(dims.DV))
    if device_type == "cpu":
        return {"BT": bt, "BV": full_v, "num_warps": 4, "num_stages": 1}
    return {"BT": bt, "BV": min(64, full_v), "num_warps": 4, "num_stages": 2}


def _blocks(plan: LinearPlan, dims: Dims, config: dict) -> dict:
    """Tile sizes: powers of two >= 16 (tl.dot's minimum), padded lanes masked."""
    BD = max(16, next_pow2(dims.D))
    BE = max(16, next_pow2(dims.E)) if plan.hedgehog else 16
    return {"BT": max(16, next_pow2(int(config["BT"]))), "BD": BD, "BE": BE, "BF": 2 * BE if plan.hedgehog else BD,
            "BV": max(16, min(next_pow2(int(config["BV"])), next_pow2(dims.DV)))}


def _launch_opts(config: dict) -> dict:
    return {"num_warps": int(config.get("num_warps", 4)), "num_stages": int(config.get("num_stages", 2))}


def _unit_stride(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Kernels index the last dim with stride 1 (other strides are passed): copy only when needed."""
    if t is None:
        return None
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple:
    return t.stride(0), t.stride(1), t.stride(2)


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def _empty(device) -> torch.Tensor:
    return torch.empty(0, device=device)


_DUMMIES: dict = {}


def _dummy(device) -> torch.Tensor:
    """A valid pointer for arguments a variant never reads (one per device, never written)."""
    key = str(device)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(2, dtype=torch.float32, device=device)
    return _DUMMIES[key]


def _c(t: Optional[torch.Tensor], device):
    return _dummy(device) if t is None or t.numel() == 0 else t.contiguous()


# ------------------------------------------------------------------------------------- launchers
def run_reduce(mod, plan: LinearPlan, dims: Dims, config: dict, x, w, y, r=None, c=None):
    """Non-causal whole-sequence sums M [B, H, F, Dv], MZ [B, H, F] (fp32)."""
    blk = _blocks(plan, dims, config)
    dev = x.device
    M = alloc((dims.B, dims.H, dims.F, dims.DV), torch.float32, dev)
    MZ = alloc((dims.B, dims.H, dims.F), torch.float32, dev)
    grid = (triton_cdiv(dims.DV, blk["BV"]), dims.B * dims.H)
    mod.linear_reduce[grid](
        x, y, _c(w, dev), _c(r, dev), _c(c, dev), M, MZ,
        dims.L, dims.H, x.shape[1], y.shape[1], dims.D, dims.DV, dims.F, dims.E,
        *_strides(x), *_strides(y),
        DT=_tl_dtype(x.dtype), BT=blk["BT"], BD=blk["BD"], BV=blk["BV"], BE=blk["BE"], BF=blk["BF"],
        HAS_RC=r is not None, **_launch_opts(config))
    return M, MZ


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def run_forward(plan: LinearPlan, config: dict, q, k, v, g, wq, wk, sinks, coef, S0, z0, scale: float,
                lin_scale: float, want_state: bool, want_aux: bool) -> list:
    """Launch the forward. Returns [o, S_L, z_L, den, shift, o_window, argmax] (empty where absent).

    Non-causal with ``want_aux``: S_L, z_L hold the whole-sequence state (the backward reads it).
    """
    mod = load_module(plan)
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    dims = Dims.of(plan, q, k, v, wq)
    blk = _blocks(plan, dims, config)
    dev = q.device
    B, H, L, DV, F = dims.B, dims.H, dims.L, dims.DV, dims.F
    o = alloc((B, H, L, DV), q.dtype, dev)
    if plan.causal:
        state_in = (S0, z0) if S0 is not None else (None, None)
    else:  # the whole-sequence state
        state_in = run_reduce(mod, plan, dims, config, k, wk, v)
    has_s0 = state_in[0] is not None
    S_out = alloc((B, H, F, DV), torch.float32, dev) if (want_state and plan.causal) else None
    z_out = alloc((B, H, F), torch.float32, dev) if (want_state and plan.causal) else None
    den = shift = ow = argm = None
    if want_aux:
        if plan.normalize or plan.combine == 2:
            den = alloc((B, H, L), torch.float32, dev)
        if plan.combine:
            shift = alloc((B, H, L), torch.float32, dev)
        if plan.combine == 1:
            ow = alloc((B, H, L, DV), torch.float32, dev)
        if plan.combine == 2:  # where the window max m_i is attained (its gradient goes there)
            argm = torch.full((B, H, L), -1, dtype=torch.int32, device=dev)
    z0_t = state_in[1] if state_in[1] is not None else (torch.zeros(B, H, F, device=dev) if has_s0 else None)
    grid = (triton_cdiv(DV, blk["BV"]), B * H)
    mod.linear_fwd[grid](
        q, k, v, _c(g, dev), _c(wq, dev), _c(wk, dev), _c(sinks, dev), _c(coef, dev),
        _c(state_in[0], dev), _c(z0_t, dev), _c(S_out, dev), _c(z_out, dev), o,
        _c(den, dev), _c(shift, dev), _c(ow, dev), _c(argm, dev),
        float(scale), float(lin_scale), L, H, dims.HKV, dims.D, DV, F, dims.E,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        DT=_tl_dtype(q.dtype), BS=max(2, next_pow2(plan.sinks)), HAS_S0=has_s0,
        STORE_STATE=S_out is not None, STORE_AUX=want_aux, **blk, **_launch_opts(config))
    if not plan.causal and want_aux:
        S_out, z_out = state_in
    return [o] + [t if t is not None else _empty(dev) for t in (S_out, z_out, den, shift, ow, argm)]


def _phi_grad(name: str, x: torch.Tensor, w: Optional[torch.Tensor], dphi: torch.Tensor):
    """phi(x) and the chain rule through it, in fp32: (phi [B,H,L,F], dx [B,H,L,D], dW [H,D,E] | None)."""
    x = x.float()
    if name == "identity":
        return x, dphi, None
    if name == "elu1":
        return torch.nn.functional.elu(x) + 1, dphi * torch.where(x > 0, 1.0, torch.exp(x.clamp(max=0))), None
    if name == "relu":
        return torch.relu(x), dphi * (x > 0), None
    wf = w.float()
    E = wf.shape[-1]
    proj = torch.einsum("bhld,hde->bhle", x, wf)
    da, dc = dphi[..., :E], dphi[..., E:]
    if name == "hedgehog":
        a, c = torch.softmax(proj, -1), torch.softmax(-proj, -1)
        dproj = a * (da - (da * a).sum(-1, keepdim=True)) - c * (dc - (dc * c).sum(-1, keepdim=True))
    else:
        a, c = torch.exp(proj), torch.exp(-proj)
        dproj = da * a - dc * c
    dx = torch.einsum("bhle,hde->bhld", dproj, wf)
    dw = torch.einsum("bhld,bhle->hde", x, dproj)
    return torch.cat([a, c], -1), dx, dw


def run_backward(plan: LinearPlan, config: dict, do, dSL, dzL, q, k, v, g, wq, wk, sinks, coef, S0, z0,
                 o, SL, zL, den, shift, ow, argm, scale: float, lin_scale: float) -> list:
    """Launch the backward. Returns [dq, dk, dv, dg, dwq, dwk, dsinks, dcoef, dS0, dz0] (None where absent)."""
    mod = load_module(plan)
    q, k, v, do = _unit_stride(q), _unit_stride(k), _unit_stride(v), _unit_stride(do)
    dims = Dims.of(plan, q, k, v, wq)
    blk = _blocks(plan, dims, config)
    dev = q.device
    B, H, HKV, L, D, DV, F = dims.B, dims.H, dims.HKV, dims.L, dims.D, dims.DV, dims.F
    NV = triton_cdiv(DV, blk["BV"])
    f32 = torch.float32
    of, dof = o.float(), do.float()

    # The output gradient as per-row factors (see the dq template): dnum = u * do, dden; window
    # ds = coef * P * (wrow * do . v + erow).
    dcoef = None
    o_lin = of - coef.float()[None, :, None, None] * ow if plan.combine == 1 else of
    if plan.normalize or plan.combine == 2:
        inv = torch.where(den == 0, torch.zeros_like(den), 1.0 / torch.where(den == 0, torch.ones_like(den), den))
        u, dden = inv, -(dof * o_lin).sum(-1) * inv
    else:
        u, dden = torch.full((B, H, L), float(lin_scale), device=dev), torch.zeros(B, H, L, device=dev)
    wrow = erow = None
    if plan.combine == 1:
        wrow, erow = torch.ones(B, H, L, device=dev), -(dof * ow).sum(-1)
        dcoef = (dof * ow).sum((0, 2, 3))
    elif plan.combine == 2:
        wrow, erow = u, dden
        if not plan.causal and plan.prefix:  # prefix rows have no linear term (the forward zeroes it)
            keep = (torch.arange(L, device=dev) >= plan.prefix).to(f32)
            u, dden = u * keep, dden * keep
    u, dden = u.contiguous(), dden.contiguous()

    if plan.causal:
        s_in = (S0, z0 if z0 is not None else (torch.zeros(B, H, F, device=dev) if S0 is not None else None))
        ds_in = (dSL, dzL)
        if (dSL is None) != (dzL is None):
            ds_in = (dSL if dSL is not None else torch.zeros(B, H, F, DV, device=dev),
                     dzL if dzL is not None else torch.zeros(B, H, F, device=dev))
    else:
        s_in = (SL, zL)
        ds_in = run_reduce(mod, plan, dims, config, q, wq, do, u, dden)
    opts = dict(DT=_tl_dtype(q.dtype), **blk, **_launch_opts(config))
    grid = (NV, B * H)

    dqf = alloc((NV, B, H, L, F), f32, dev)
    dqr = alloc((NV, B, H, L, D), f32, dev) if plan.combine else None
    dsink = alloc((B, H, plan.sinks), f32, dev) if plan.sinks else None
    rrow = alloc((NV, B, H, L), f32, dev) if plan.combine else None
    mod.linear_bwd_dq[grid](
        q, k, v, _c(g, dev), _c(wq, dev), _c(wk, dev), _c(sinks, dev), _c(coef, dev),
        _c(s_in[0], dev), _c(s_in[1], dev), do, u, dden, _c(shift, dev), _c(wrow, dev), _c(erow, dev),
        dqf, _c(dqr, dev), _c(dsink, dev), _c(rrow, dev),
        float(scale), L, H, HKV, D, DV, F, dims.E,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        BS=max(2, next_pow2(plan.sinks)), HAS_S0=s_in[0] is not None, **opts)

    dkf = alloc((NV, B, H, L, F), f32, dev)
    dkr = alloc((NV, B, H, L, D), f32, dev) if plan.combine else None
    dvo = alloc((B, H, L, DV), f32, dev)
    want_ds0 = plan.causal and S0 is not None
    dS0 = alloc((B, H, F, DV), f32, dev) if want_ds0 else None
    dz0 = alloc((B, H, F), f32, dev) if want_ds0 else None
    mod.linear_bwd_dkv[grid](
        q, k, v, _c(g, dev), _c(wq, dev), _c(wk, dev), _c(coef, dev), _c(ds_in[0], dev), _c(ds_in[1], dev),
        do, u, dden, _c(shift, dev), _c(wrow, dev), _c(erow, dev),
        dkf, _c(dkr, dev), dvo, _c(dS0, dev), _c(dz0, dev),
        float(scale), L, H, HKV, D, DV, F, dims.E,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        HAS_DSL=ds_in[0] is not None, STORE_DS0=want_ds0, **opts)

    dqf, dkf = dqf.sum(0), dkf.sum(0)
    G = H // HKV
    k_h = k.repeat_interleave(G, 1) if G > 1 else k
    fq, dq, dwq = _phi_grad(plan.feature_map, q, wq, dqf)
    fk, dk, dwk = _phi_grad(plan.feature_map, k_h, wk, dkf)
    if plan.combine:
        dq = dq + dqr.sum(0)
        dk = dk + dkr.sum(0)
        if plan.combine == 2:
            # R_i = sum_j P_ij (dP_ij + e_i): gamma's gradient, and (times -gamma) the gradient of the
            # window max m_i, which flows to the score s_{i, argmax_i} (SEMANTICS.md: m_i is not detached).
            R = rrow.sum(0)
            dcoef = R.sum((0, 2))
            cR = (-float(scale) * coef.float()[None, :, None] * R)[..., None]
            idx = argm.long()[..., None]
            dq = dq + cR * torch.gather(k_h.float(), 2, idx.expand(B, H, L, D))
            dk = dk.scatter_add(2, idx.expand(B, H, L, D), cR * q.float())
    dg = None
    if plan.gate:
        # G_t = sum_{l <= t} g_l enters only as phi(q_t) e^{G_t} and phi(k_t) e^{-G_t} (and e^{G_L} in
        # the returned state), so dG_t = phi(q_t) dphi(q_t) - phi(k_t) dphi(k_t), dg_l = sum_{t >= l} dG_t.
        dG = fq * dqf - fk * dkf
        if plan.gate == 1:
            dG = dG.sum(-1)
        dg = dG.flip(2).cumsum(2).flip(2)
        if dSL is not None or dzL is not None:
            term = torch.zeros(B, H, F, device=dev)
            if dSL is not None:
                term = term + (dSL.float() * SL).sum(-1)
            if dzL is not None:
                term = term + dzL.float() * zL
            dg = dg + (term.sum(-1)[:, :, None] if plan.gate == 1 else term[:, :, None, :])
        dg = dg.to(g.dtype)
    if G > 1:
        dk = dk.view(B, HKV, G, L, D).sum(2)
        dvo = dvo.view(B, HKV, G, L, DV).sum(2)
    return [dq.to(q.dtype), dk.to(k.dtype), dvo.to(v.dtype), dg,
            None if dwq is None else dwq.to(wq.dtype), None if dwk is None else dwk.to(wk.dtype),
            None if dsink is None else dsink.sum(0).to(sinks.dtype),
            None if dcoef is None else dcoef.to(coef.dtype),
            None if dS0 is None else dS0.to(S0.dtype), None if dz0 is None else dz0.to(z0.dtype if z0 is not None else f32)]


# ----------------------------------------------------------------------------------------- kernel
class LinearKernel(Kernel):
    """Generated Triton kernels for one spec with a linear branch (pure, "sum" or "shared").

    ``kernel(q, k, v, **tensors)`` -> o; ``return_state=True`` -> (o, (S_L, z_L)). Differentiable in
    q, k, v, g, the feature weights, sink_logits, window_gamma, alpha and initial_state. Runs on CUDA
    tensors, and on CPU tensors under TRITON_INTERPRET=1. Hints: ``config`` (a dict with BT, BV,
    num_warps, num_stages; pins forward and backward), ``chunk_size`` (BT), ``autotune`` (default True:
    tune on a CUDA device when the tuning database has no entry), ``db`` (a TuningDB).
    """

    target = "triton"
    differentiable = True

    def __init__(self, spec, **hints):
        self.plan = LinearPlan.from_spec(spec)
        super().__init__(self.plan.spec, source=render_source(self.plan), config={})
        self.hints = hints
        self._configs: dict = {}
        self._spec_json = self.spec.canonical_json()  # computed once: json.dumps does not trace

    # -- configuration ---------------------------------------------------------------------------
    def _key(self, dims: Dims, dtype, device) -> tuple:
        from lincomp.tuning.db import shape_bucket
        return (str(device), str(dtype), shape_bucket(**dims.bucket()))

    def configs_for(self, dims: Dims, dtype, device, *, inputs: Optional[dict] = None) -> tuple:
        """(forward config, backward config) for this shape: pinned, tuned, or the fixed default."""
        pinned = self.hints.get("config")
        if pinned is not None:
            cfg = {**default_config(self.plan, dims, device.type, self.hints.get("chunk_size")), **pinned}
            return cfg, cfg
        if device.type != "cuda":
            cfg = default_config(self.plan, dims, device.type, self.hints.get("chunk_size"))
            return cfg, cfg
        key = self._key(dims, dtype, device)
        if key in self._configs:
            return self._configs[key]
        base = default_config(self.plan, dims, "cuda", self.hints.get("chunk_size"))
        result = (base, base)
        if not torch.compiler.is_compiling():
            found = self._lookup(dims, dtype, device)
            if found is None and inputs is not None and self.hints.get("autotune", True):
                found = self._tune(dims, dtype, device, inputs)
            if found is not None:
                result = found
        self._configs[key] = result
        return result

    def _db(self):
        from lincomp.tuning import TuningDB
        return self.hints.get("db") or TuningDB()

    def _lookup(self, dims, dtype, device):
        try:
            db = self._db()
            f = db.lookup("triton", "linear_fwd", self.spec, dtype, dims.bucket(), device=device)
            b = db.lookup("triton", "linear_bwd", self.spec, dtype, dims.bucket(), device=device)
        except Exception:  # a broken database never stops a model run
            return None
        if f is None:
            return None
        return f.config, (b.config if b is not None else f.config)

    def _tune(self, dims, dtype, device, inputs):
        """Tune at the first call of a new shape bucket; a failure warns and keeps the default config."""
        import warnings
        try:
            results = tune_linear(self, dims, dtype, device, inputs, db=self._db())
        except Exception as e:  # tuning must never break a model run
            warnings.warn(f"lincomp: tuning the linear kernels failed ({type(e).__name__}: {e}); using the "
                          "default config", RuntimeWarning, stacklevel=4)
            return None
        return results[0].config, results[1].config

    def tune(self, q, k, v, *, force: bool = False, progress=True, db=None, **tensors) -> list:
        """Autotune forward and backward for these inputs (CUDA only; a CPU run has nothing to tune).

        Returns one ``lincomp.tuning.TuneResult`` per kernel ("linear_fwd", "linear_bwd").
        """
        if q.device.type != "cuda":
            return []
        call = bind(self.spec, q, k, v, **tensors)
        self.check_supported(call)
        dims = Dims.of(self.plan, q, k, v, call.feature_weight_q)
        results = tune_linear(self, dims, q.dtype, q.device, _op_inputs(self, call),
                              db=db if db is not None else self._db(), force=force, progress=progress)
        self._configs[self._key(dims, q.dtype, q.device)] = (results[0].config, results[1].config)
        return results

    # -- call --------------------------------------------------------------------------------------
    def check_supported(self, call) -> None:
        """Raise Unsupported (-> reference fallback with a warning) for inputs these kernels do not take."""
        q = call.q
        if call.key_padding_mask is not None:
            raise Unsupported("key_padding_mask is not supported by the linear / hybrid Triton kernels")
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise Unsupported(f"dtype {q.dtype} (the Triton kernels take float32, float16, bfloat16)")
        if q.device.type == "cpu":
            if not interpreting():
                raise Unsupported("CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before "
                                  "importing triton), or use target='tvm' / 'reference'")
            if q.dtype == torch.bfloat16:
                raise Unsupported("the Triton interpreter has no bfloat16")
        elif q.device.type != "cuda":
            raise Unsupported(f"device {q.device} (Triton runs on CUDA)")
        F = call.F
        if max(call.D, call.Dv, F) > MAX_HEAD_DIM:
            raise Unsupported(f"head / feature dim above {MAX_HEAD_DIM} (D={call.D}, Dv={call.Dv}, F={F})")
        if self.plan.combine == 2 and self.plan.gate and self.plan.prefix:
            raise Unsupported("combine='shared' with gates and prefix tokens")

    def forward(self, q, k, v, *, scale=None, linear_scale=None, return_state: bool = False, **tensors):
        from lincomp.runtime import linear_ops
        compiling = torch.compiler.is_compiling()
        call = bind(self.spec, q, k, v, scale=scale, linear_scale=linear_scale, return_state=return_state,
                    check_values=not compiling, **tensors)
        self.check_supported(call)
        dims = Dims.of(self.plan, q, k, v, call.feature_weight_q)
        inputs = _op_inputs(self, call)
        fwd_cfg, bwd_cfg = self.configs_for(dims, q.dtype, q.device, inputs=inputs)
        if not compiling:
            self.config = {"forward": fwd_cfg, "backward": bwd_cfg}

        def launch(f, b):
            return linear_ops.linear_attention(
                *inputs["tensors"], spec=inputs["spec"], config=config_string(f, b), scale=call.scale,
                linear_scale=call.linear_scale, want_state=bool(return_state))

        if compiling or q.device.type != "cuda":
            outs = launch(fwd_cfg, bwd_cfg)
        else:
            try:
                outs = launch(fwd_cfg, bwd_cfg)
            except Exception as e:  # a GPU the configs do not fit: a smaller config, else the reference
                if not _triton_failure(e):
                    raise
                small = {**fwd_cfg, "BV": 32, "num_stages": 1}
                try:
                    outs = launch(small, {**bwd_cfg, "BV": 32, "num_stages": 1})
                except Exception as e2:
                    if not _triton_failure(e2):
                        raise
                    raise Unsupported(f"the generated kernel failed on this device: {type(e2).__name__}: "
                                      f"{str(e2)[:200]}") from e2
                self._configs[self._key(dims, q.dtype, q.device)] = (small, {**bwd_cfg, "BV": 32, "num_stages": 1})
        o = outs[0]
        if return_state:
            return o, (outs[1], outs[2])
        return o


def _triton_failure(e: BaseException) -> bool:
    """A compile / resource failure of Triton itself (not a bug in the inputs)."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"OutOfResources", "CompilationError", "PTXASError"}) or "out of resource" in str(e).lower()


def config_string(fwd: dict, bwd: dict) -> str:
    """The launch configs as the custom op's JSON string argument (plain formatting: torch.compile
    traces this without a graph break, unlike json.dumps)."""
    def one(c):
        return (f'{{"BT": {int(c["BT"])}, "BV": {int(c["BV"])}, "num_warps": {int(c.get("num_warps", 4))}, '
                f'"num_stages": {int(c.get("num_stages", 2))}}}')
    return f'{{"fwd": {one(fwd)}, "bwd": {one(bwd)}}}'


def _op_inputs(kernel: LinearKernel, call) -> dict:
    """The custom op's tensor arguments for a bound call (None where a spec does not use one)."""
    spec = kernel.spec
    coef = call.alpha if spec.combine == "sum" else call.window_gamma if spec.combine == "shared" else None
    tensors = (call.q, call.k, call.v, call.g, call.feature_weight_q, call.feature_weight_k,
               call.sink_logits, coef, call.S0, call.z0)
    return {"tensors": tensors, "spec": kernel._spec_json, "scale": call.scale,
            "linear_scale": call.linear_scale}


def tune_linear(kernel: LinearKernel, dims: Dims, dtype, device, inputs: dict, *, db=None, force=False,
                progress=None, bench=None) -> list:
    """Measured search of the forward space, then the backward space, stored in the tuning database."""
    from lincomp.tuning import tune
    plan = kernel.plan
    tensors = [None if t is None else t.detach() for t in inputs["tensors"]]
    scale, ls = inputs["scale"], inputs["linear_scale"]
    vector = plan.gate == 2
    fspace = FWD_SPACE_VECTOR if vector else FWD_SPACE
    bspace = BWD_SPACE_VECTOR if vector else BWD_SPACE
    full_v = max(16, next_pow2(dims.DV))
    fspace = [c for c in fspace if c["BV"] <= full_v] or [default_config(plan, dims, "cuda")]
    bspace = [c for c in bspace if c["BV"] <= full_v] or [default_config(plan, dims, "cuda")]

    def build_fwd(cfg):
        def run():
            return run_forward(plan, cfg, *tensors, scale, ls, False, False)
        run()  # compile, and reject a config that does not launch
        return run

    res_f = tune(fspace, build_fwd, bench, backend="triton", kernel="linear_fwd", spec=kernel.spec, dtype=dtype,
                 dims=dims.bucket(), db=db, device=device, force=force, progress=progress)
    fwd_out = []  # the forward's saved tensors, made on the first backward build only (a cached
                  # result builds nothing: zero work)

    def build_bwd(cfg):
        if not fwd_out:
            aux = run_forward(plan, res_f.config, *tensors, scale, ls, plan.causal, True)
            fwd_out.append((torch.randn_like(aux[0]), [None if t.numel() == 0 else t for t in aux]))
        do, saved = fwd_out[0]

        def run():
            return run_backward(plan, cfg, do, None, None, *tensors, *saved, scale, ls)
        run()
        return run

    res_b = tune(bspace, build_bwd, bench, backend="triton", kernel="linear_bwd", spec=kernel.spec, dtype=dtype,
                 dims=dims.bucket(), db=db, device=device, force=force, progress=progress)
    return [res_f, res_b]


def compile_linear(spec, **hints) -> LinearKernel:
    """A :class:`LinearKernel` for ``spec`` (needs ``spec.linear``). Generates and imports the module now
    (so ``kernel.source`` is real); compiles for the device on first call."""
    kernel = LinearKernel(spec, **hints)
    load_module(kernel.plan, kernel.source)
    return kernel


__all__ = ["compile_linear", "LinearKernel", "LinearPlan", "render_source", "render_common", "run_forward",
           "run_backward", "default_config", "FWD_SPACE", "BWD_SPACE"]
