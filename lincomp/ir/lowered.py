"""``lincomp.ir.lower(spec) -> Lowered``: the one length-independent description every consumer reads.

A :class:`Lowered` holds, for one spec (cached by ``spec.key()``):

- ``rule``: the visibility predicate as an expression tree (:mod:`lincomp.ir.rule`) and its printers:
  ``mask(i, j)`` (torch), ``mask_mod()`` (FlexAttention), ``triton_lines(...)``, ``tvm_expr(...)``;
- ``axis_reach`` / ``reach_back`` / ``reach_forward``: how far a visible key lies from its query (grid
  coordinate units per axis; flat token distances), what the decoder's cache and the distributed halos use;
- ``tensors`` / ``optional``: the keyword tensors a call needs / may take;
- the linear branch's feature map and gate;
- ``algorithm`` and ``reason``: how the branches run ("window", "linear", or for hybrids "fused" /
  "separate"), chosen by :func:`choose_algorithm`; the Triton and TVM lowerings build what it says;
- ``kernels(target)``: the generated kernels a forward (and backward) call launches, in order.

The length-dependent block plan hangs off it: ``lowered.block_plan(L, block_m, ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Tuple

from lincomp.ir import rule as _rule
from lincomp.ir.blocks import BlockPlan, block_plan
from lincomp.ir.tensors import optional_tensors, required_tensors
from lincomp.spec import AttentionSpec, TerracedWindow, Window1D

HYBRID_ALGORITHMS = ("fused", "separate")
TARGETS = ("triton", "tvm")


@dataclass(frozen=True)
class Lowered:
    """What ``spec`` computes and how lincomp runs it, independent of the sequence length."""

    spec: AttentionSpec
    rule: _rule.Expr
    rule_doc: str
    axis_reach: Optional[Tuple[int, ...]]   # grid windows: per axis max |y_a(i) - y_a(j)| of a visible pair
    reach_back: Optional[int]               # max i - j over visible body pairs (None: unbounded)
    reach_forward: Optional[int]            # max j - i over visible body pairs (None: unbounded)
    tensors: Tuple[str, ...]
    optional: Tuple[str, ...]
    feature_map: Optional[str]
    gate: Optional[str]
    algorithm: str                          # "window" | "linear" | "fused" | "separate"
    reason: str

    # -- printers -----------------------------------------------------------------------------------
    def mask(self, i, j):
        """Bool tensor: query ``i`` sees key ``j`` (broadcast int tensors of token indices)."""
        return _rule.mask(self.spec, i, j)

    def mask_mod(self) -> Callable:
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``."""
        return _rule.mask_mod(self.spec)

    def triton_lines(self, env: Dict[str, str], broadcast: Optional[Dict[str, str]] = None,
                     out: str = "vis") -> List[str]:
        """Triton statements assigning the visibility of (env["i"], env["j"]) to ``out``."""
        return _rule.triton_lines(self.rule, env, broadcast, out)

    def tvm_expr(self, query: str, key: str) -> str:
        """TVMScript expression: the query at position ``query`` sees the key at ``key`` (scalars)."""
        return _rule.tvm_expr(self.rule, {"i": query, "j": key})

    # -- length-dependent ---------------------------------------------------------------------------
    def block_plan(self, L: int, block_m: int = 64, block_n: Optional[int] = None,
                   tile: Optional[Tuple[int, ...]] = None, order: str = "tiled") -> BlockPlan:
        """The block-sparse plan at length ``L`` (:func:`lincomp.ir.blocks.block_plan`)."""
        return block_plan(self.spec, L, block_m, block_n, tile, order)

    # -- what runs ------------------------------------------------------------------------------------
    def kernels(self, target: str) -> Dict[str, Tuple[str, ...]]:
        """{"forward": (...), "backward": (...)}: the generated kernels a call launches on ``target``, in
        order (backward: empty where the target is inference-only)."""
        spec, lin = self.spec, self.spec.linear
        if target == "triton":
            if lin is None:
                return {"forward": ("window_fwd",),
                        "backward": ("window_bwd_delta", "window_bwd_dq", "window_bwd_dkdv")}
            pre = () if spec.causal else ("linear_reduce",)   # the whole-sequence state first
            return {"forward": pre + ("linear_fwd",), "backward": pre + ("linear_bwd_dq", "linear_bwd_dkv")}
        if target == "tvm":
            fwd = []
            if lin is not None:
                if lin.feature_map in ("hedgehog", "hedgehog_exp") or spec.combine == "shared":
                    fwd += ["features_q", "features_k"]
                fwd.append("linear_fwd")
                if spec.combine == "shared" and isinstance(spec.window, Window1D) and not spec.causal:
                    fwd.append("linear_rev")   # the lagged scans' second side, where their cost wins (shared_lag.py)
            if spec.has_softmax:
                fwd.append("window_fwd")
            # what the training calls launch: the window pass (dkdv adds dq in place, or a separate dq kernel
            # with config split_dq; pooled keys add their pair), the linear scan's reverse walk (a non-causal
            # branch's gradients are dense host products), and for combine="shared" the in-window terms'
            bwd = []
            if spec.has_softmax:
                bwd += ["window_bwd_dkdv"] + (["pooled_bwd_dkdv"] if spec.pool is not None else [])
            if lin is not None and spec.causal:
                bwd.append("linear_bwd")
            if spec.combine == "shared":
                bwd += ["shared_bwd_q", "shared_bwd_k"]
            return {"forward": tuple(fwd), "backward": tuple(bwd)}
        raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")

    def summary(self) -> str:
        """A few lines: rule, reach, tensors, algorithm (what ``lincomp explain`` prints first)."""
        lines = [f"rule: {self.rule_doc}"]
        if self.reach_back is not None:
            reach = f"reach: {self.reach_back} tokens back, {self.reach_forward} forward"
            if self.axis_reach is not None:
                reach += f" (per grid axis {list(self.axis_reach)})"
            lines.append(reach)
        lines.append("tensors: q, k, v" + "".join(f", {t}" for t in self.tensors)
                     + (f" (optional: {', '.join(self.optional)})" if self.optional else ""))
        if self.feature_map is not None:
            lines.append(f"linear: phi = {self.feature_map}, gate = {self.gate}")
        lines.append(f"algorithm: {self.algorithm} ({self.reason})")
        return "\n".join(lines)


def _reach(spec: AttentionSpec) -> Tuple[Optional[Tuple[int, ...]], Optional[int], Optional[int]]:
    w = spec.window
    if w is None:
        return None, None, (0 if spec.causal else None)
    if isinstance(w, Window1D):
        back, fwd = w.left, w.right
        return None, back, 0 if spec.causal else fwd
    if isinstance(w, TerracedWindow):
        return None, w.reach(True), 0
    flat = w.reach(False)   # grid windows are symmetric in flat distance
    return w.axis_reach(), flat, 0 if spec.causal else flat


def choose_algorithm(spec: AttentionSpec) -> Tuple[str, str]:
    """(algorithm, reason): how the branches of ``spec`` run, for both backends.

    Softmax only -> "window" (block-sparse flash over the plan); linear only -> "linear" (chunked scan, or
    state sums when non-causal). A hybrid is "fused": the Triton linear kernel computes the window tiles
    of each chunk of queries next to the state, and the TVM window kernel combines the linear branch in its
    epilogue, so no window output is written and read back. Both lowerings implement only this choice and
    raise if a spec ever lowers to another.
    """
    if spec.linear is None:
        return "window", "softmax only: block-sparse flash attention over the window's tile plan"
    if spec.window is None:
        return "linear", ("non-causal: S = phi(K)^T V once, then phi(Q) S" if not spec.causal else
                          "causal: chunked scan, quadratic inside a chunk, state carried across chunks")
    how = "one normaliser shared by both branches" if spec.combine == "shared" else "alpha-weighted sum"
    lagged = ("; on a 1D window TVM inference may form the keys outside the window by lagged scans instead of the "
              "full scan minus the in-window terms, where that costs less"
              if spec.combine == "shared" and isinstance(spec.window, Window1D) else "")
    return "fused", (f"combine={spec.combine!r} ({how}): Triton computes the window inside the linear kernel per "
                     "query chunk; TVM combines the linear output in the window kernel's epilogue" + lagged)


@lru_cache(maxsize=512)
def _lower(key: str, spec: AttentionSpec) -> Lowered:
    axis_reach, back, fwd = _reach(spec)
    algorithm, reason = choose_algorithm(spec)
    lin = spec.linear
    return Lowered(spec=spec, rule=_rule.visibility(spec), rule_doc=_rule.describe(spec), axis_reach=axis_reach,
                   reach_back=back, reach_forward=fwd, tensors=required_tensors(spec),
                   optional=optional_tensors(spec), feature_map=None if lin is None else lin.feature_map,
                   gate=None if lin is None else lin.gate, algorithm=algorithm, reason=reason)


def lower(spec) -> Lowered:
    """The :class:`Lowered` of ``spec`` (an AttentionSpec, dict or JSON path); cached by ``spec.key()``."""
    spec = AttentionSpec.coerce(spec)
    return _lower(spec.key(), spec)


def require(lowered: Lowered, algorithm: str, backend: str) -> None:
    """Raise unless the IR chose ``algorithm`` (a lowering that builds only that one calls this)."""
    if lowered.algorithm != algorithm:
        raise ValueError(f"{backend} builds the {algorithm!r} algorithm, but the IR chose "
                          f"{lowered.algorithm!r} for {lowered.spec.summary()} ({lowered.reason})")
