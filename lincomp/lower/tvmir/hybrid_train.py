"""Training a combine="sum" hybrid (Lizard) on the TVM kernels: the window and linear backward families composed.

o = o_lin + alpha[h] * o_win (docs/semantics.md section 3): o_win is the window softmax with its sinks, o_lin
the linear branch over every allowed key. Training runs the two branches as two saving forwards, each through
its own family (window_train.py with ``save_lse``, linear_train.py with the chunk states), because each
backward needs its branch's own output and statistics, which the fused inference kernel never materialises;
inference keeps the fused kernel. The backward is then

- d alpha[h] = sum over (b, l, d) of dO * o_win;
- the window backward with dO_win = alpha[h] * dO and o_win (dq, dk, dv, d sink_logits);
- the linear backward with dO and o_lin (dq, dk, dv, dg, d feature weights, d initial_state);

and the shared inputs' gradients summed. Saved: the linear branch's list, then lse2 [B, H, L], o_lin and
o_win [B, H, L, Dv] (all fp32: both outputs are kept because o (possibly fp16 / bf16) minus one scaled branch
would lose the other's precision).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lincomp.runtime.kernel import wants

WINDOW_NAMES = ("scale", "sink_logits")
LINEAR_NAMES = ("linear_scale", "g", "feature_weight_q", "feature_weight_k", "initial_state")


def branch_specs(spec) -> tuple:
    """(window-only spec with the sinks and prefix, linear-only spec over the same causality)."""
    name = spec.name or "hybrid"
    win = replace(spec, linear=None, combine=None, name=f"{name}-window")
    lin = replace(spec, window=None, prefix=0, sinks=0, combine=None, name=f"{name}-linear")
    return win, lin


def branches(kernel) -> tuple:
    """(window kernel, linear kernel) for the hybrid ``kernel``: built once, sharing its tuning database and
    the fixed configs of their parts."""
    got = kernel.__dict__.get("_branch_kernels")
    if got is None:
        make = type(kernel)   # TVMKernel (not imported: kernel.py imports this module)
        fixed = kernel._fixed
        win_spec, lin_spec = branch_specs(kernel.spec)
        win = make(win_spec, config={p: fixed[p] for p in ("window", "window_bwd") if p in fixed},
                        db=kernel._db, **kernel.hints)
        lin = make(lin_spec, config={p: fixed[p] for p in ("linear", "linear_bwd") if p in fixed},
                        db=kernel._db, **kernel.hints)
        got = kernel.__dict__["_branch_kernels"] = (win, lin)
    return got


def _split(kwargs: dict) -> tuple:
    """(window keywords, linear keywords, alpha) of a hybrid call's keywords."""
    # key_padding_mask reaches saved_like only (a padded call saves nothing: its slots stay unused)
    extra = set(kwargs) - set(WINDOW_NAMES) - set(LINEAR_NAMES) - {"alpha", "return_state", "key_padding_mask"}
    if extra:
        from lincomp.runtime.kernel import Unsupported
        raise Unsupported(f"{sorted(extra)} have no composed TVM hybrid backward")
    win = {n: kwargs[n] for n in WINDOW_NAMES if kwargs.get(n) is not None}
    lin = {n: kwargs[n] for n in LINEAR_NAMES if kwargs.get(n) is not None}
    return win, lin, kwargs.get("alpha")


def _alpha(alpha, H: int) -> torch.Tensor:
    """alpha [H] as [1, H, 1, 1] fp32."""
    if alpha is None:
        raise ValueError("alpha: a combine='sum' spec needs alpha [H] (the window branch's weight per head)")
    return alpha.to(torch.float32).reshape(1, H, 1, 1)


def forward_and_save(kernel, q, k, v, **kwargs) -> tuple:
    """(o [B, H, L, Dv], saved) from the two saving forwards; (o, None) for a key-padded call (its forward
    runs on the fused kernel, its gradient, if one is asked, on the reference)."""
    if kwargs.get("key_padding_mask") is not None or kwargs.get("return_state"):
        with torch.no_grad():
            return kernel.forward(q, k, v, **kwargs), None
    wkw, lkw, alpha = _split(kwargs)
    kernel._bind_checked(q, k, v, **kwargs)    # the hybrid's own checks (shapes, alpha, values)
    win, lin = branches(kernel)
    o_win, (lse2,) = win.forward_and_save(q, k, v, **wkw)
    o_lin, lin_saved = lin.forward_and_save(q, k, v, **lkw)
    o_win, o_lin = o_win.to(torch.float32), o_lin.to(torch.float32)
    o = o_lin + _alpha(alpha, q.shape[1]) * o_win
    kernel.config = {**kernel.config, **win.config, **lin.config}
    return o.to(q.dtype), [*lin_saved, lse2, o_lin, o_win]


def saved_like(kernel, q, k, v, **kwargs) -> list:
    """Shapes of :func:`forward_and_save`'s saved list (shape arithmetic only)."""
    _, lkw, _ = _split(kwargs)
    _, lin = branches(kernel)
    B, H, L, Dv = q.shape[0], q.shape[1], q.shape[2], v.shape[3]
    f32 = (lambda *s: q.new_empty(s, dtype=torch.float32))
    return [*lin._linear_saved_like(q, k, v, **lkw), f32(B, H, L), f32(B, H, L, Dv), f32(B, H, L, Dv)]


def backward_saved(kernel, grad_o, o, saved, q, k, v, needs=None, **kwargs) -> dict:
    """{name: gradient} of q, k, v, alpha, sink_logits, g, the feature weights and initial_state (``needs``: the
    names wanted, None: all; a branch none of whose inputs is wanted does not run its backward)."""
    wkw, lkw, alpha = _split(kwargs)
    win, lin = branches(kernel)
    *lin_saved, lse2, o_lin, o_win = saved
    do = grad_o.to(torch.float32)
    gw = gl = {}
    if wants(needs, "q", "k", "v", "sink_logits"):
        gw = win.backward_saved(do * _alpha(alpha, q.shape[1]), o_win, [lse2], q, k, v, needs=needs, **wkw)
    if wants(needs, "q", "k", "v", "g", "feature_weight_q", "feature_weight_k", "initial_state"):
        gl = lin.backward_saved(do, o_lin, lin_saved, q, k, v, needs=needs, **lkw)
    out = dict(gl)
    for n in ("q", "k", "v"):
        parts = [d for d in (gl.get(n), gw.get(n)) if d is not None]
        out[n] = sum(parts[1:], parts[0]) if parts and wants(needs, n) else None
    out["sink_logits"] = gw.get("sink_logits")
    # d alpha_h = sum of do * o_win over the head's rows: each row's Dv products summed in float32, the rows in
    # float64 (a float64 copy of the [B, H, L, Dv] operands cost more than the rest of the sum)
    out["alpha"] = (do * o_win).sum(-1).double().sum((0, 2)) if wants(needs, "alpha") else None
    kernel.config = {**kernel.config, **win.config, **lin.config}
    return out
