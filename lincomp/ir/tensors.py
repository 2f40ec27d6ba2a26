"""The keyword tensors a spec's call takes (the one definition; ``lincomp.inputs`` and the IR read it)."""

from __future__ import annotations

from lincomp.spec import AttentionSpec


def required_tensors(spec: AttentionSpec) -> tuple:
    """Keyword tensors a call of ``spec`` must pass, in the order of the call signature."""
    lin = spec.linear
    out = []
    if lin is not None and lin.gate is not None:
        out.append("g")                                       # [B, H, L] or [B, H, L, F]
    if lin is not None and lin.has_weights:
        out += ["feature_weight_q", "feature_weight_k"]       # [H, D, E]
    if spec.sinks:
        out.append("sink_logits")                             # [H, m]
    if spec.combine == "shared":
        out.append("window_gamma")                            # [H]
    if spec.combine == "sum":
        out.append("alpha")                                   # [H]
    if spec.pool is not None:
        out.append("pool_weight")                             # the pool factors, e.g. [4, 4]
    return tuple(out)


def optional_tensors(spec: AttentionSpec) -> tuple:
    """Keyword tensors a call of ``spec`` may pass."""
    return ("key_padding_mask",) + (("initial_state",) if spec.linear is not None and spec.causal else ())
