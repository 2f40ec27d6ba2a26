"""``lincomp.reference``: the plain-PyTorch oracle of docs/semantics.md, every variant, any dtype.

The window branch and the hybrids are computed in quadratic (masked) form; the linear branch in the
quadratic, chunked or recurrent form (``form=``), which must agree. Autograd flows through all of it:
this is the gradient oracle for the kernels.
"""

from __future__ import annotations

from typing import Optional

import torch

from lincomp.inputs import Call, bind
from lincomp.layout import call_in_layout
from lincomp.reference.features import feature_map
from lincomp.reference.linear import (initial_state_terms, log_gates, linear_chunked, linear_quadratic,
                                      linear_recurrent, linear_scores, safe_divide)
from lincomp.reference.masks import allowed_mask, window_mask
from lincomp.reference.pool import pooled_scores

FORMS = ("quadratic", "chunked", "recurrent")


def _expand_heads(t: torch.Tensor, H: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, H, L, D] (query head h reads key/value head h // (H // Hkv))."""
    return t if t.shape[1] == H else t.repeat_interleave(H // t.shape[1], dim=1)


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def reference(spec, q, k, v, *, scale: Optional[float] = None, linear_scale: Optional[float] = None,
              return_state: bool = False, form: str = "quadratic", compute_dtype: Optional[torch.dtype] = None,
              cu_seqlens: Optional[torch.Tensor] = None, layout: Optional[str] = None, **tensors):
    """o [B, H, L, Dv] in q's dtype (and ``(S_L, z_L)`` with ``return_state``).

    Accumulates in fp32, or fp64 when q is fp64 (or ``compute_dtype`` says so). ``cu_seqlens`` [N + 1]
    (B = 1): a packed row of N documents, each attended on its own; states then have a leading axis N.
    ``layout="blhd"``: q / k / v / g / o in ``[B, L, H, D]`` order instead (see ``lincomp.layout``).
    """
    if layout != "bhld":
        return call_in_layout(lambda q, k, v, **kw: reference(spec, q, k, v, **kw), layout, q, k, v,
                              dict(scale=scale, linear_scale=linear_scale, return_state=return_state, form=form,
                                   compute_dtype=compute_dtype, cu_seqlens=cu_seqlens, **tensors))
    if cu_seqlens is not None:
        from lincomp.reference.varlen import reference_packed
        return reference_packed(reference, spec, q, k, v, cu_seqlens, scale=scale, linear_scale=linear_scale,
                                return_state=return_state, form=form, compute_dtype=compute_dtype, **tensors)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    call = bind(spec, q, k, v, scale=scale, linear_scale=linear_scale, return_state=return_state, **tensors)
    cd = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    o, state = _forward(call, cd, form)
    o = o.to(q.dtype)
    return (o, state) if return_state else o


def window_scores(call: Call, dtype) -> tuple:
    """Scores s [B, H, L, L] and the window mask (with key padding) [B|1, 1, L, L]."""
    H = call.H
    q = call.q.to(dtype)
    k = _expand_heads(call.k, H).to(dtype)
    s = call.scale * (q @ k.transpose(-1, -2))
    mask = window_mask(call.spec, call.L, q.device)[None, None]
    if call.key_padding_mask is not None:
        mask = mask & call.key_padding_mask[:, None, None, :]
    return s, mask


def softmax_window(call: Call, dtype) -> torch.Tensor:
    """The window (softmax) branch with sinks: o_w [B, H, L, Dv]. Rows with no visible key give 0."""
    s, mask = window_scores(call, dtype)
    v = _expand_heads(call.v, call.H).to(dtype)
    if call.pool_weight is not None:   # CLEAR's pooled keys: P extra keys after the L tokens
        s_p, mask_p, v_p = pooled_scores(call.spec, call.q.to(dtype), _expand_heads(call.k, call.H).to(dtype), v,
                                         call.pool_weight, call.scale)
        s, v = torch.cat([s, s_p], -1), torch.cat([v, v_p], -2)
        mask = torch.cat([mask.expand(*mask.shape[:2], *s_p.shape[-2:-1], -1), mask_p[None, None]], -1)
    logits = s.masked_fill(~mask, float("-inf"))
    M = logits.amax(-1)
    sinks = None
    if call.sink_logits is not None:
        sinks = call.sink_logits.to(dtype)[None, :, None, :]          # [1, H, 1, m]
        M = torch.maximum(M, sinks.amax(-1))
    M = torch.where(torch.isfinite(M), M, torch.zeros_like(M)).detach()  # any shift cancels
    p = (logits - M[..., None]).exp()
    den = p.sum(-1)
    if sinks is not None:
        den = den + (sinks - M[..., None]).exp().sum(-1)
    return safe_divide(p @ v, den)


def _features(call: Call, dtype):
    lin, H = call.spec.linear, call.H
    fq = feature_map(lin.feature_map, call.q.to(dtype), _cast(call.feature_weight_q, dtype))
    fk = feature_map(lin.feature_map, _expand_heads(call.k, H).to(dtype), _cast(call.feature_weight_k, dtype))
    if call.key_padding_mask is not None:   # a padded key contributes to no sum
        fk = fk * call.key_padding_mask[:, None, :, None].to(dtype)
    return fq, fk


def linear_terms(call: Call, dtype, form: str, want_state: bool):
    """num, den, S, z of the linear branch over all j <= i (causal) or all j."""
    fq, fk = _features(call, dtype)
    v = _expand_heads(call.v, call.H).to(dtype)
    g, S0, z0 = _cast(call.g, dtype), _cast(call.S0, dtype), _cast(call.z0, dtype)
    if not call.spec.causal or form == "quadratic":
        return linear_quadratic(fq, fk, v, g, S0, z0, call.spec.causal, want_state)
    if form == "chunked":
        return linear_chunked(fq, fk, v, g, S0, z0, call.spec.linear.chunk_size, want_state)
    return linear_recurrent(fq, fk, v, g, S0, z0, want_state)


def _finish_linear(call: Call, num, den):
    if call.spec.linear.normalize:
        return safe_divide(num, den)
    return call.linear_scale * num


def _shared(call: Call, dtype, form: str) -> torch.Tensor:
    """LoLCATs: one normaliser over gamma * window softmax terms + linear terms outside the window."""
    s, mask = window_scores(call, dtype)
    v = _expand_heads(call.v, call.H).to(dtype)
    m = s.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True)
    # Not detached: m_i does not cancel here (the linear terms are not shifted by it).
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    # masked before exp: a hidden key scoring > 709 above the window's max would give inf * 0 = NaN
    p = (s.masked_fill(~mask, float("-inf")) - m).exp()
    gamma = call.window_gamma.to(dtype)[None, :, None]
    fq, fk = _features(call, dtype)
    logg = log_gates(_cast(call.g, dtype), fk)
    allowed = allowed_mask(call.spec, call.L, s.device)
    if form == "quadratic":   # the definition: sum over C(i) = allowed \ W(i) directly
        outside = allowed & ~window_mask(call.spec, call.L, s.device)
        A = linear_scores(fq, fk, logg, outside)
        num, den = A @ v, A.sum(-1)
        if call.S0 is not None:  # the state entering the sequence lies outside every window
            n0, d0 = initial_state_terms(fq, logg, _cast(call.S0, dtype), _cast(call.z0, dtype))
            num, den = num + n0, den + d0
    else:                     # every allowed key by the scan, minus those inside the window
        num, den, _, _ = linear_terms(call, dtype, form, False)
        A_in = linear_scores(fq, fk, logg, (mask & allowed).expand(s.shape))
        num, den = num - A_in @ v, den - A_in.sum(-1)
    num = gamma[..., None] * (p @ v) + num
    den = gamma * p.sum(-1) + den
    return safe_divide(num, den)


def _forward(call: Call, dtype, form: str):
    spec = call.spec
    if spec.linear is None:
        return softmax_window(call, dtype), None
    if spec.combine == "shared":
        return _shared(call, dtype, form), None
    num, den, S, z = linear_terms(call, dtype, form, call.return_state)
    o = _finish_linear(call, num, den)
    if spec.combine == "sum":
        o = o + call.alpha.to(dtype)[None, :, None, None] * softmax_window(call, dtype)
    return o, ((S, z) if call.return_state else None)
