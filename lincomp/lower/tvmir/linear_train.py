"""Training the linear branch on the TVM kernels: the saving forward and the backward's host side.

``forward_and_save`` runs linear.py's kernel with ``save_states`` (the state entering each chunk; the
normalised branch in "numden" mode, so its denominators are saved too); ``backward_saved`` turns the
output gradient into the scan's (d num, and d den as one more column), runs linear_bwd.py's kernel and
finishes on the host what is elementwise or tiny:

- feature maps: the kernels work on phi(q), phi(k); their backward (and d feature_weight_q / _k for
  hedgehog maps) is torch autograd through ``lincomp.reference.features`` (a projection and a softmax);
- gates: dG_t = phi(q_t) . dphi(q_t) - phi(k_t) . dphi(k_t) (every pair decays by e^(G_i - G_j)), and
  d g_s = sum_{t >= s} dG_t, in float64; a gate under the kernels' floor (-40) gets 0, as the kernels
  never saw it;
- GQA: per-query-head gradients of k, v summed over each group.

Non-causal specs (no gate, no state) need no scan: their gradients are four dense products, done by torch.
"""

from __future__ import annotations

from typing import Optional

import torch

from lincomp.lower.tvmir.linear import GATE_FLOOR
from lincomp.reference.features import feature_map

# Saved states are laid out for the smallest backward chunk, so their shape never depends on the chosen
# config (fake tensors only know L): a larger chunk uses the first ceil(L / chunk) entries.
MIN_CHUNK = 16


def n_saved_chunks(L) -> int:
    return (L + MIN_CHUNK - 1) // MIN_CHUNK


def saved_shapes(spec, B, H, L, F, Dv) -> list:
    """Shapes of the saved list: Sc [B, H, ceil(L / 16), F, Dv (+1)], den [B, H, L] (normalised, else [0])."""
    if not spec.causal:
        return [(0,), (B, H, L) if spec.linear.normalize else (0,)]
    aug = int(spec.linear.normalize)
    return [(B, H, n_saved_chunks(L), F, Dv + aug), (B, H, L) if aug else (0,)]


def scan_grad(spec, grad_o: torch.Tensor, o: torch.Tensor, den: Optional[torch.Tensor], linear_scale: float,
              aug: bool) -> torch.Tensor:
    """d num [B, H, L, Dv] (and d den as column Dv with the normaliser) from d o (o = num / den, 0 at den 0)."""
    grad_o = grad_o.float()
    if not aug:
        return (grad_o * linear_scale).contiguous()
    rden = torch.where(den == 0, torch.zeros_like(den), 1.0 / torch.where(den == 0, torch.ones_like(den), den))
    B, H, L, Dv = grad_o.shape
    out = torch.empty(B, H, L, Dv + 1, dtype=torch.float32)
    torch.mul(grad_o, rden[..., None], out=out[..., :Dv])
    out[..., Dv] = -(out[..., :Dv] * o.float()).sum(-1)
    return out


class Features:
    """phi(q), phi(k) of a call, built under autograd when a gradient must flow through the map."""

    def __init__(self, call, leaves: dict):
        lin, H = call.spec.linear, call.H
        self.leaves = leaves                         # name -> leaf tensor (requires_grad) or None
        q, k = leaves.get("q", call.q), leaves.get("k", call.k)
        wq, wk = leaves.get("feature_weight_q", call.feature_weight_q), leaves.get("feature_weight_k",
                                                                                    call.feature_weight_k)
        if lin.has_weights:   # per-query-head weights: phi(k) per query head
            k = k if k.shape[1] == H else k.repeat_interleave(H // k.shape[1], dim=1)
        with torch.enable_grad():
            self.fq = feature_map(lin.feature_map, q, wq).float().contiguous()
            self.fk = feature_map(lin.feature_map, k, wk).float().contiguous()

    def backward(self, dfq: torch.Tensor, dfk: torch.Tensor) -> dict:
        """{name: gradient} of the leaves, from d phi(q), d phi(k) (phi(k) of its own heads)."""
        names = [n for n, t in self.leaves.items() if t is not None and t.requires_grad]
        if not names:
            return {}
        outs, grads = [], []
        for f, d in ((self.fq, dfq), (self.fk, dfk)):
            if f.requires_grad:
                outs.append(f)
                grads.append(d)
        got = torch.autograd.grad(outs, [self.leaves[n] for n in names], grads, allow_unused=True) if outs else \
            [None] * len(names)
        return dict(zip(names, got))


def leaves_of(call, need: dict) -> dict:
    """Detached leaves (requires_grad) of q, k and the feature weights that need a gradient."""
    out = {}
    for name in ("q", "k", "feature_weight_q", "feature_weight_k"):
        t = getattr(call, name)
        if t is not None and need.get(name, False):
            out[name] = t.detach().requires_grad_(True)
    return out


def group_sum(x: torch.Tensor, Hkv: int) -> torch.Tensor:
    """[B, H, ...] per query head -> [B, Hkv, ...] (each group of H / Hkv query heads summed)."""
    B, H = x.shape[:2]
    return x if H == Hkv else x.view(B, Hkv, H // Hkv, *x.shape[2:]).sum(2)


def gate_grad(g: torch.Tensor, fq, dfq, fk, dfk) -> torch.Tensor:
    """d g [B, H, L(, F)] from the features and their gradients (fk, dfk per query head)."""
    dG = fq.double() * dfq.double() - fk.double() * dfk.double()
    if g.dim() == 3:
        dG = dG.sum(-1)
    dg = dG.flip(2).cumsum(2).flip(2)
    return torch.where(g < GATE_FLOOR, torch.zeros_like(dg), dg).float()


def noncausal_grads(spec, feats: Features, v, do: torch.Tensor, Hkv: int) -> tuple:
    """(dfq, dfk per query head, dv per query head) of o = phi(q) S (/ phi(q) . z), S = phi(k)^T v."""
    fq, fk = feats.fq.detach(), feats.fk.detach()
    H = fq.shape[1]
    fkh = fk if fk.shape[1] == H else fk.repeat_interleave(H // fk.shape[1], dim=1)
    vh = v if v.shape[1] == H else v.repeat_interleave(H // v.shape[1], dim=1)
    vh = vh.float()
    if do.shape[-1] > vh.shape[-1]:   # the normaliser's column of ones
        vh = torch.cat([vh, torch.ones_like(vh[..., :1])], -1)
    S = fkh.transpose(-1, -2) @ vh                  # [B, H, F, Dsv]
    dS = fq.transpose(-1, -2) @ do                  # [B, H, F, Dsv]
    dfq = do @ S.transpose(-1, -2)
    dfk = vh @ dS.transpose(-1, -2)
    dv = (fkh @ dS)[..., :v.shape[-1]]
    return dfq, dfk, dv
