"""Triton lowering of the linear branch and the window + linear hybrids (docs/semantics.md sections 2-3).

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

The family is four one-way layers: this module (codegen: ``LinearPlan``, ``render_source``,
``load_module``) -> ``linear_launch`` (configs, launchers, tuning) -> ``linear_op`` (the torch.library
ops) -> ``linear_kernel`` (``LinearKernel``, ``compile_linear``).

Tensors: q [B, H, L, D], k / v [B, Hkv, L, D | Dv], g [B, H, L] or [B, H, L, F] (log gates <= 0),
feature weights [H, D, E], states S [B, H, F, Dv], z [B, H, F] (returned in fp32).
"""


from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from lincomp.lower.triton.common import interpreting, template
from lincomp.ir.lowered import lower
from lincomp.runtime.cache import load_generated_module

from lincomp.spec import AttentionSpec, TerracedWindow

ALGORITHMS = ("linear_fwd", "linear_bwd_dq", "linear_bwd_dkv", "linear_reduce")
_GATE_CODE = {None: 0, "scalar": 1, "vector": 2}
_COMBINE_CODE = {None: 0, "sum": 1, "shared": 2}


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

    def visible_body(self) -> str:
        """The IR's visibility rule on the broadcast token indices i, j (prefix and causality included)."""
        return "\n".join("    " + ln for ln in lower(self.spec).triton_lines({"i": "i", "j": "j"}) + ["return vis"])

    def key_chunks_body(self) -> str:
        """Key positions [lo_pos, hi_pos] visible to rows i0..i1 -> chunk indices."""
        w = self.window
        lines = ["    i0 = n * BT", "    i1 = tl.minimum(i0 + BT, L) - 1", "    npre = (PREFIX + BT - 1) // BT"]
        reach = lower(self.spec)
        if w is None:
            lines += ["    lo_pos = i0", "    hi_pos = i1"]
        elif isinstance(w, TerracedWindow):   # block-aligned: tighter than the reach
            lines += [f"    lo_pos = PREFIX + ((i0 - PREFIX) // {w.block} - 1) * {w.block}", "    hi_pos = i1"]
        else:
            lines += [f"    lo_pos = i0 - {reach.reach_back}", f"    hi_pos = i1 + {reach.reach_forward}"]
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
        reach = lower(self.spec)
        if w is None:
            lines += ["    lo_pos = j0", "    hi_pos = j1"]
        elif isinstance(w, TerracedWindow):   # block-aligned: tighter than the reach
            lines += ["    lo_pos = j0", f"    hi_pos = PREFIX + ((j1 - PREFIX) // {w.block} + 2) * {w.block} - 1"]
        else:
            lines += [f"    lo_pos = j0 - {reach.reach_forward}", f"    hi_pos = j1 + {reach.reach_back}"]
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


def render_common(plan: LinearPlan, algorithm: str) -> str:
    """The shared helpers of every linear / hybrid / decode kernel for ``plan``."""
    return template("linear_common.py.tmpl").substitute(
        algorithm=algorithm, spec_repr=repr(plan.spec), constants=plan.constants(),
        feat_index_body=plan.feat_index_body(), phi_body=plan.phi_body(False),
        phi_row_body=plan.phi_body(True), visible_body=plan.visible_body(),
        key_chunks_body=plan.key_chunks_body(), query_chunks_body=plan.query_chunks_body(), **plan.docs())


def render_source(plan: LinearPlan) -> str:
    """The whole generated module: common helpers + forward, backward and reduction kernels."""
    parts = [render_common(plan, ", ".join(f"{a}.py.tmpl" for a in ALGORITHMS))]
    parts += [template(f"{a}.py.tmpl").substitute() for a in ALGORITHMS]
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
        name = re.sub(r"[^0-9A-Za-z_]+", "_", f"{stem}_{mode}_{plan.spec.summary()}")[:80]
        mod = load_generated_module(source, name)
        _MODULES[key] = mod
    return mod
