"""The linear branch in three independent forms: quadratic (masked scores), chunked, recurrent.

Each returns the un-normalised terms ``num [B, H, L, Dv]``, ``den [B, H, L]`` and the final state
``S [B, H, F, Dv]``, ``z [B, H, F]``. Gates are log-values ``g`` broadcast to ``[B, H, L, Fg]``
with ``Fg = 1`` (scalar gate, or none) or ``Fg = F`` (vector gate).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

Terms = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


def log_gates(g: Optional[torch.Tensor], fk: torch.Tensor) -> torch.Tensor:
    """Log-gates as [B, H, L, Fg]; zeros (a_t = 1) when there is no gate."""
    if g is None:
        return fk.new_zeros(fk.shape[:-1] + (1,))
    return g[..., None] if g.dim() == 3 else g


def linear_scores(fq, fk, logg, mask) -> torch.Tensor:
    """A[i, j] = sum_f fq[i, f] * d_ij,f * fk[j, f] on ``mask`` (zero elsewhere). -> [B, H, L, L].

    ``d_ij = exp(G_i - G_j)`` with G the cumulative log-gate; masked before exp so j > i never
    overflows. ``mask`` [L, L] or [B, H, L, L] bool must only allow j <= i when gates are present.
    """
    G = logg.cumsum(2)
    if logg.shape[-1] == 1:
        diff = (G[:, :, :, None, 0] - G[:, :, None, :, 0]).masked_fill(~mask, float("-inf"))
        return (fq @ fk.transpose(-1, -2)) * diff.exp()
    diff = (G[:, :, :, None, :] - G[:, :, None, :, :]).masked_fill(~mask[..., None], float("-inf"))
    return torch.einsum("bhif,bhjf,bhijf->bhij", fq, fk, diff.exp())


def initial_state_terms(fq, logg, S0, z0):
    """What the state entering the sequence adds to num [B, H, L, Dv] and den [B, H, L]."""
    fq_dec = fq * logg.cumsum(2).exp()                       # decay from the sequence start to i
    return fq_dec @ S0, (fq_dec * z0[:, :, None, :]).sum(-1)


def linear_quadratic(fq, fk, v, g, S0=None, z0=None, causal=True, want_state=False) -> Terms:
    """Quadratic form: the definition, every (i, j) pair at once."""
    B, H, L, F = fq.shape
    logg = log_gates(g, fk)
    idx = torch.arange(L, device=fq.device)
    mask = idx[None, :] <= idx[:, None] if causal else torch.ones(L, L, dtype=torch.bool, device=fq.device)
    A = linear_scores(fq, fk, logg, mask)
    num, den = A @ v, A.sum(-1)
    if not causal:
        return num, den, None, None
    G = logg.cumsum(2)                                       # [B, H, L, Fg]
    if S0 is not None:
        n0, d0 = initial_state_terms(fq, logg, S0, z0)
        num, den = num + n0, den + d0
    S = z = None
    if want_state:
        w = fk * (G[:, :, -1:, :] - G).exp()                 # decay from j to the end
        S = w.transpose(-1, -2) @ v
        z = w.sum(2)
        if S0 is not None:
            last = G[:, :, -1, :].exp()                      # [B, H, Fg]
            S = S + last[..., None] * S0
            z = z + last * z0
    return num, den, S, z


def linear_chunked(fq, fk, v, g, S0=None, z0=None, chunk: int = 64, want_state=False) -> Terms:
    """Chunked form: quadratic inside each chunk, the state (S, z) carried between chunks."""
    B, H, L, F = fq.shape
    Dv = v.shape[-1]
    S = S0 if S0 is not None else fq.new_zeros(B, H, F, Dv)
    z = z0 if z0 is not None else fq.new_zeros(B, H, F)
    nums, dens = [], []
    for s in range(0, L, chunk):
        e = min(s + chunk, L)
        gc = None if g is None else g[:, :, s:e]
        n, d, S, z = linear_quadratic(fq[:, :, s:e], fk[:, :, s:e], v[:, :, s:e], gc, S, z, True, True)
        nums.append(n)
        dens.append(d)
    return torch.cat(nums, 2), torch.cat(dens, 2), (S if want_state else None), (z if want_state else None)


def linear_recurrent(fq, fk, v, g, S0=None, z0=None, want_state=False) -> Terms:
    """Recurrent form: one token at a time, S_t = diag(a_t) S_{t-1} + phi(k_t)^T v_t."""
    B, H, L, F = fq.shape
    Dv = v.shape[-1]
    a = log_gates(g, fk).exp()                                   # [B, H, L, Fg]
    S = S0 if S0 is not None else fq.new_zeros(B, H, F, Dv)
    z = z0 if z0 is not None else fq.new_zeros(B, H, F)
    nums, dens = [], []
    for t in range(L):
        S = a[:, :, t, :, None] * S + fk[:, :, t, :, None] * v[:, :, t, None, :]
        z = a[:, :, t, :] * z + fk[:, :, t, :]
        nums.append(torch.einsum("bhf,bhfd->bhd", fq[:, :, t], S))
        dens.append((fq[:, :, t] * z).sum(-1))
    return torch.stack(nums, 2), torch.stack(dens, 2), (S if want_state else None), (z if want_state else None)


def safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den[..., None], 0 where den == 0 (docs/semantics.md: no eps, never NaN); grad-safe."""
    den = den[..., None]
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))
