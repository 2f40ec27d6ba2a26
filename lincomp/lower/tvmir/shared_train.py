"""Training a combine="shared" hybrid (LoLCATs) on the TVM kernels.

o_i = num_i / den_i with num_i = gamma * sum_{j in W(i)} exp(s_ij - m_i) v_j + sum_{j in C(i)} T_ij v_j (den
likewise with 1 for v), ``m_i`` the row's window max (not a free shift: the linear terms are not scaled by it)
and C(i) the allowed keys outside the window (docs/semantics.md section 3). The forward is the fused inference
kernel run with ``save``: the linear scan saves its chunk states, the window kernel writes the shared ``den``
(over the scan's) and ``lse2_i = m_i + log2(den_i / gamma)`` in base 2, so that ``P_ij = gamma exp(s_ij -
m_i) / den_i`` is the window backward's ``2^(s2_ij - lse2_i)``. With ``D_i = dO_i . o_i`` the backward is

- the window backward unchanged (window_bwd.py on the window-only spec, ``ds_ij = P_ij (dO_i . v_j - D_i)``)
  with ``row_stats``: ``r_i = sum_j ds_ij`` and the row's argmax key ``j*``;
- d gamma[h] = sum_i r_i / gamma[h]; the row max: ``d s_ij* -= r_i`` (added on the host: one key per row);
- the linear terms over C(i) as the full scan's backward (the linear family, its normaliser column fed
  ``[dO / den, -D / den]``) minus the in-window terms' backward (shared_bwd.py), combined before the feature
  maps' vjp, so d feature weights, d q, d k see both; the gate's share of the in-window terms is
  ``fq . dfq_in - fk . dfk_in``, reverse-cumsummed into d g.

``needs`` (the names whose gradient is wanted; None: all) prunes the work: without q / k / v the window pass
is its row sums alone (``window_bwd_rows``) and the row max's gradient is skipped; without v the in-window key
pass skips its value product; the feature maps' vjp runs for the wanted inputs only. Layer-local attention
transfer (frozen projections, trained feature maps and gain) takes that path.

Saved: [chunk states, den, lse2]. The fused forward's cancellation check still applies: past it the forward
raises Unsupported and the call (forward and gradient) runs on the reference, with a warning.
"""

from __future__ import annotations

import torch

from lincomp.lower.tvmir import shared_bwd as _sbwd
from lincomp.lower.tvmir import window_train as _wtrain
from lincomp.lower.tvmir.hybrid_train import branches
from lincomp.lower.tvmir.linear_train import group_sum
from lincomp.runtime.buffers import alloc_output
from lincomp.runtime.kernel import wants


def backward_saved(kernel, grad_o, o, saved, q, k, v, *, scale=None, linear_scale=None, needs=None,
                   **tensors) -> dict:
    """{name: gradient} of q, k, v, window_gamma, g, the feature weights and initial_state (``needs``: the
    names wanted, None: all; the others may be missing)."""
    call, sizes = kernel._train_call(q, k, v, scale, linear_scale, tensors)
    Sc, den, lse2, *phi = saved   # phi(q), phi(k) of hedgehog maps (linear_train.saved_shapes)
    win = branches(kernel)[0]
    qkv = wants(needs, "q", "k", "v")
    gw = win.backward_saved(grad_o, o, [lse2], q, k, v, scale=scale, row_stats=True, rows_only=not qkv)
    rsum, ridx = gw["rows"]
    if wants(needs, "q", "k"):
        _row_max_grad(gw["q"], gw["k"], rsum, ridx, call)
    gl = kernel._linear_backward(call, sizes, grad_o, o, [Sc, den, *phi], needs=needs,
                                 inwindow=lambda *a: _inwindow(kernel, call, sizes, *a, dv_wanted=wants(needs, "v")))
    kernel.config = {**kernel.config, **win.config}
    out = dict(gl)
    for n in ("q", "k", "v"):
        out[n] = gl[n] + gw[n] if wants(needs, n) else None
    out["window_gamma"] = rsum.double().sum((0, 2)) / call.window_gamma.double()
    return out


def _row_max_grad(dq, dk, rsum, ridx, call) -> None:
    """The row max m_i's gradient, in place: d s_{i j*} = -r_i, i.e. dq_i -= scale r_i k_j*, dk_j* -= scale r_i q_i."""
    B, H, L, D = dq.shape
    group = H // call.Hkv
    c = torch.where(ridx >= 0, -call.scale * rsum, torch.zeros_like(rsum))[..., None]    # [B, H, L, 1]
    at = ridx.clamp_min(0).long()[..., None].expand(B, H, L, D)
    kh = call.k if group == 1 else call.k.repeat_interleave(group, 1)
    dq += c * torch.gather(kh, 2, at)
    dkh = torch.zeros(B, H, L, D).scatter_add_(2, at, c * call.q)
    dk += group_sum(dkh, call.Hkv)


def _inwindow(kernel, call, sizes, feats, do, dfq, dfk, dv, grads, *, dv_wanted: bool = True) -> None:
    """Subtract the in-window linear terms' gradients (shared_bwd.py's kernels) from the full scan's, in place:
    ``dfq``, ``dfk``, ``dv`` (left alone unless ``dv_wanted``) per query head, and d g (``grads["g"]``)."""
    spec = kernel.spec
    B, H, L, Dv, F = call.B, call.H, call.L, call.Dv, sizes.F
    win = branches(kernel)[0]
    cfg = win.config["window_bwd"]["params"]   # the window backward's tiles (it ran just before)
    BM, BN = cfg["block_m"], cfg["block_n"]
    fwd_plan, bwd_plan, tokens = _wtrain._bwd_plan(kernel, L, cfg)
    dims = _sbwd.SharedBwdDims(H, call.Hkv, sizes.HF, F, Dv)
    mod = _wtrain._module(kernel, "shared_bwd" if dv_wanted else "shared_bwd_nodv", sizes, cfg,
                          lambda: _sbwd.backward_source(spec, dims, BM, BN, cfg.get("mr", 4), dv_wanted))
    du, dd = do[..., :Dv].contiguous(), do[..., Dv].contiguous()
    G = [call.g.double().cumsum(2).contiguous()] if spec.linear.gate is not None else []
    head = [feats.fq, feats.fk, call.v, du, dd, *G]
    dfq_in = alloc_output((B, H, L, F), torch.float32)
    dfk_in = alloc_output((B, H, L, F), torch.float32)
    dv_in = [alloc_output((B, H, L, Dv), torch.float32)] if dv_wanted else []
    mod.fn("shared_bwd_q")(*head, *fwd_plan, *tokens, dfq_in)
    mod.fn("shared_bwd_k")(*head, *bwd_plan, *tokens, dfk_in, *dv_in)
    dfq -= dfq_in
    dfk -= dfk_in
    if dv_wanted:
        dv -= dv_in[0]
    if G:
        fk = feats.fk if feats.fk.shape[1] == H else feats.fk.repeat_interleave(H // feats.fk.shape[1], 1)
        dG = feats.fq * dfq_in - fk * dfk_in
        if spec.linear.gate == "scalar":
            dG = dG.sum(-1)
        # G = cumsum(g): d g_s = sum_{t >= s} d G_t; the in-window terms are subtracted
        grads["g"] = grads["g"] - dG.double().flip(2).cumsum(2).flip(2).to(torch.float32)
