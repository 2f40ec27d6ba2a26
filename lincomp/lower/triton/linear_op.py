"""Torch custom ops for the generated linear / hybrid Triton kernels (fake + autograd).

``lincomp::linear_fwd`` and ``lincomp::linear_bwd`` are ``torch.library.custom_op``s whose
implementations launch the generated kernels (``lincomp.lower.triton.linear_launch``): they work on CUDA
tensors and, under TRITON_INTERPRET=1, on CPU tensors (``wrap_triton`` / ``triton_op`` do not accept
interpreted kernels). Fake implementations give torch.compile the output shapes; the forward is
differentiable through ``register_autograd``.

The spec and the launch config travel as JSON strings (custom op arguments must be plain types).
"""

from __future__ import annotations

import json
from typing import List, Optional

import torch
from torch import Tensor

from lincomp.lower.triton.linear import LinearPlan
from lincomp.lower.triton.linear_launch import run_backward, run_forward
from lincomp.spec import AttentionSpec

_SPECS: dict = {}


def _plan(spec_json: str):
    plan = _SPECS.get(spec_json)
    if plan is None:
        plan = LinearPlan.from_spec(AttentionSpec.from_dict(json.loads(spec_json)))
        _SPECS[spec_json] = plan
    return plan


def _none(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None or t.numel() == 0 else t


def _feature_width(plan, q: Tensor, wq: Optional[Tensor]) -> int:
    return 2 * wq.shape[-1] if plan.hedgehog else q.shape[-1]


@torch.library.custom_op("lincomp::linear_fwd", mutates_args=())
def linear_fwd(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], wq: Optional[Tensor], wk: Optional[Tensor],
               sinks: Optional[Tensor], coef: Optional[Tensor], S0: Optional[Tensor], z0: Optional[Tensor],
               spec: str, config: str, scale: float, linear_scale: float, want_state: bool,
               want_aux: bool) -> List[Tensor]:
    """[o, S_L, z_L, den, shift, o_window, argmax] (empty tensors where absent); see run_forward."""
    cfg = json.loads(config)["fwd"]
    return run_forward(_plan(spec), cfg, q, k, v, g, wq, wk, sinks, coef, S0, z0, scale, linear_scale,
                       want_state, want_aux)


@linear_fwd.register_fake
def _linear_fwd_fake(q, k, v, g, wq, wk, sinks, coef, S0, z0, spec, config, scale, linear_scale, want_state,
                     want_aux):
    plan = _plan(spec)
    B, H, L, _ = q.shape
    DV, F = v.shape[-1], _feature_width(plan, q, wq)
    f32 = torch.float32
    e = (lambda: q.new_empty(0, dtype=f32))
    state = want_state and plan.causal
    keep_state = state or (want_aux and not plan.causal)
    return [q.new_empty(B, H, L, DV),
            q.new_empty(B, H, F, DV, dtype=f32) if keep_state else e(),
            q.new_empty(B, H, F, dtype=f32) if keep_state else e(),
            q.new_empty(B, H, L, dtype=f32) if want_aux and (plan.normalize or plan.combine == 2) else e(),
            q.new_empty(B, H, L, dtype=f32) if want_aux and plan.combine else e(),
            q.new_empty(B, H, L, DV, dtype=f32) if want_aux and plan.combine == 1 else e(),
            q.new_empty(B, H, L, dtype=torch.int32) if want_aux and plan.combine == 2 else e()]


@torch.library.custom_op("lincomp::linear_bwd", mutates_args=())
def linear_bwd(do: Tensor, dSL: Optional[Tensor], dzL: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
               g: Optional[Tensor], wq: Optional[Tensor], wk: Optional[Tensor], sinks: Optional[Tensor],
               coef: Optional[Tensor], S0: Optional[Tensor], z0: Optional[Tensor], o: Tensor,
               SL: Optional[Tensor], zL: Optional[Tensor], den: Optional[Tensor], shift: Optional[Tensor],
               ow: Optional[Tensor], argm: Optional[Tensor], spec: str, config: str, scale: float,
               linear_scale: float) -> List[Tensor]:
    """[dq, dk, dv, dg, dwq, dwk, dsinks, dcoef, dS0, dz0] (empty tensors where absent)."""
    cfg = json.loads(config)["bwd"]
    grads = run_backward(_plan(spec), cfg, do, dSL, dzL, q, k, v, g, wq, wk, sinks, coef, S0, z0, o, SL, zL,
                         den, shift, ow, argm, scale, linear_scale)
    return [q.new_empty(0) if t is None else t for t in grads]


@linear_bwd.register_fake
def _linear_bwd_fake(do, dSL, dzL, q, k, v, g, wq, wk, sinks, coef, S0, z0, o, SL, zL, den, shift, ow, argm,
                     spec, config, scale, linear_scale):
    plan = _plan(spec)
    e = (lambda: q.new_empty(0))
    like = (lambda t: e() if t is None else torch.empty_like(t))
    has_s0 = S0 is not None and plan.causal
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), like(g), like(wq), like(wk),
            like(sinks), like(coef), like(S0) if has_s0 else e(),
            (like(z0) if z0 is not None else q.new_empty(S0.shape[:-1], dtype=torch.float32)) if has_s0 else e()]


def _setup_context(ctx, inputs, output):
    (q, k, v, g, wq, wk, sinks, coef, S0, z0, spec, config, scale, linear_scale, want_state, want_aux) = inputs
    o, SL, zL, den, shift, ow, argm = output
    if not want_aux:
        ctx.failed = ("lincomp: this call did not keep what the backward needs (want_aux=False); "
                      "call the kernel with grad enabled")
    else:
        ctx.failed = None
    ctx.save_for_backward(q, k, v, g, wq, wk, sinks, coef, S0, z0, o, _none(SL), _none(zL), _none(den),
                          _none(shift), _none(ow), _none(argm))
    ctx.meta = (spec, config, scale, linear_scale)
    ctx.z0_given = z0 is not None


def _backward(ctx, grads):
    if ctx.failed:
        raise RuntimeError(ctx.failed)
    do, dSL, dzL = grads[0], grads[1], grads[2]
    (q, k, v, g, wq, wk, sinks, coef, S0, z0, o, SL, zL, den, shift, ow, argm) = ctx.saved_tensors
    spec, config, scale, linear_scale = ctx.meta
    if do is None:
        do = torch.zeros_like(o)
    dSL = _none(dSL) if SL is not None else None
    dzL = _none(dzL) if zL is not None else None
    out = torch.ops.lincomp.linear_bwd(do.contiguous(), dSL, dzL, q, k, v, g, wq, wk, sinks, coef, S0, z0, o,
                                       SL, zL, den, shift, ow, argm, spec, config, scale, linear_scale)
    dq, dk, dv, dg, dwq, dwk, dsinks, dcoef, dS0, dz0 = [_none(t) for t in out]
    return (dq, dk, dv, dg, dwq, dwk, dsinks, dcoef, dS0, dz0 if ctx.z0_given else None,
            None, None, None, None, None, None)


def _backward_wrapper(ctx, *grads):
    # grads arrive as one list (the op returns List[Tensor]) or as separate tensors, by torch version
    if len(grads) == 1 and isinstance(grads[0], (list, tuple)):
        grads = tuple(grads[0])
    return _backward(ctx, grads)


torch.library.register_autograd("lincomp::linear_fwd", _backward_wrapper, setup_context=_setup_context)


def linear_attention(q, k, v, g, wq, wk, sinks, coef, S0, z0, *, spec: str, config: str, scale: float,
                     linear_scale: float, want_state: bool = False, want_aux: Optional[bool] = None) -> List[Tensor]:
    """Call the forward op, keeping what the backward needs (``want_aux``; default: when a gradient can flow)."""
    tensors = (q, k, v, g, wq, wk, sinks, coef, S0, z0)
    if want_aux is None:
        want_aux = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return torch.ops.lincomp.linear_fwd(q, k, v, g, wq, wk, sinks, coef, S0, z0, spec, config, float(scale),
                                        float(linear_scale), bool(want_state), bool(want_aux))


__all__ = ["linear_fwd", "linear_bwd", "linear_attention"]
