"""CLEAR's pooled keys/values for the kernels (``window.pool``; math in the docs' semantics section).

The pooled keys are computed once per call, not per query tile: ``pool_kv`` is a reshape and one small
contraction with ``pool_weight`` (``[B, Hkv, P, D]`` from ``[B, Hkv, L, D]``). Backends then either fuse
the ``P`` pooled keys into their window kernel (TVM) or attend to them densely and merge the two softmax
parts by their log-sum-exp (``merge_pooled``; Triton, whose window op returns its rows' lse). Both are
plain differentiable torch, so autograd gives ``d pool_weight``.
"""

from __future__ import annotations

import math
import torch


def _cell_layout(grid: tuple, pool: tuple) -> tuple:
    """(split shape [c0, f0, c1, f1, ..], permutation to [c0, c1, .., f0, f1, ..]) of a grid's tokens."""
    n_ax = len(grid)
    split = [x for g, f in zip(grid, pool) for x in (g // f, f)]
    perm = [0, 1, *range(2, 2 + 2 * n_ax, 2), *range(3, 3 + 2 * n_ax, 2), 2 + 2 * n_ax]
    return split, perm


def _cells(x: torch.Tensor, grid: tuple, pool: tuple, prefix: int) -> torch.Tensor:
    """[B, Hk, C, O, D] view of x's grid tokens: C pooled cells (row-major) x O offsets in a cell (row-major)."""
    B, Hk, _, D = x.shape
    split, perm = _cell_layout(grid, pool)
    cells = x[:, :, prefix:].reshape(B, Hk, *split, D).permute(perm)
    return cells.reshape(B, Hk, math.prod(g // f for g, f in zip(grid, pool)), math.prod(pool), D)


def pool_kv(x: torch.Tensor, grid: tuple, pool: tuple, prefix: int, pool_weight: torch.Tensor) -> torch.Tensor:
    """x~ [B, Hk, P, D] from x [B, Hk, L, D]: ``x~[c] = sum_o pool_weight[o] x[prefix + t(c * f + o)]``.

    One contraction of the [B, Hk, c0, f0, c1, f1, .., D] view with pool_weight [f0, f1, ..] (no permuted
    copy of x first: measured 1.8x faster than contracting :func:`_cells`, CLEAR df=4 64x64)."""
    B, Hk, _, D = x.shape
    split, _ = _cell_layout(grid, pool)
    cell, off = "acegi"[:len(grid)], "fjkmn"[:len(grid)]
    view = "bh" + "".join(c + o for c, o in zip(cell, off)) + "d"
    out = torch.einsum(f"{view},{off}->bh{cell}d", x[:, :, prefix:].reshape(B, Hk, *split, D),
                       pool_weight.to(x.dtype))
    return out.reshape(B, Hk, math.prod(split[0::2]), D)


def pool_kv_vjp(dxp: torch.Tensor, x: torch.Tensor, grid: tuple, pool: tuple, prefix: int,
                pool_weight: torch.Tensor) -> tuple:
    """The vjp of :func:`pool_kv` for ``dxp`` [B, Hk, P, D]: (d x [B, Hk, L - prefix, D] of the grid tokens
    (prefix tokens are not pooled), d pool_weight [prod(pool)] in float64: each (cell, offset)'s dot over D
    in x's dtype, their sum over B Hk P (terms of either sign, which fp32 would lose to cancellation) in
    float64 (a float64 product of the whole [B, Hk, P, O, D] measured 7x slower)."""
    B, Hk, _, D = x.shape
    w = pool_weight.reshape(-1).to(dxp.dtype)
    dw = torch.einsum("bhcod,bhcd->bhco", _cells(x, grid, pool, prefix), dxp.to(x.dtype)).double().sum((0, 1, 2))
    split, perm = _cell_layout(grid, pool)
    dcells = (dxp[:, :, :, None, :] * w[:, None]).reshape(B, Hk, *split[0::2], *split[1::2], D)
    inverse = [perm.index(a) for a in range(len(perm))]
    return dcells.permute(inverse).reshape(B, Hk, x.shape[2] - prefix, D), dw


def pooled_kv(spec, k: torch.Tensor, v: torch.Tensor, pool_weight: torch.Tensor) -> tuple:
    """(k~, v~) of a pooled spec's call."""
    w = spec.window
    return (pool_kv(k, w.grid, w.pool, spec.prefix, pool_weight),
            pool_kv(v, w.grid, w.pool, spec.prefix, pool_weight))


def merge_pooled(o_w: torch.Tensor, lse_w: torch.Tensor, q: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor,
                 prefix: int, scale: float) -> torch.Tensor:
    """o [B, H, L, Dv]: the window output merged with the pooled keys' attention on the grid rows.

    o_w [B, H, L, Dv] and lse_w [B, H, L] (natural log, sinks included) from the window kernel; the grid
    rows' pooled part (q [B, H, L, D] against kp / vp [B, Hkv, P, D|Dv]) is a dense softmax whose
    normaliser joins the window's: o = (e^(lse_w - M) o_w + e^(lse_p - M) o_p) / (e^(lse_w - M) + e^(lse_p - M)).
    """
    H, Hkv = q.shape[1], kp.shape[1]
    if H != Hkv:
        kp, vp = kp.repeat_interleave(H // Hkv, 1), vp.repeat_interleave(H // Hkv, 1)
    qg = q[:, :, prefix:].float()
    s = scale * (qg @ kp.float().transpose(-1, -2))                       # [B, H, Lg, P]
    lse_p = torch.logsumexp(s, -1)
    o_p = torch.softmax(s, -1) @ vp.float()
    lw = lse_w[:, :, prefix:].float()
    M = torch.maximum(lw, lse_p).detach()     # any shift cancels; lse_p is finite (P >= 1 keys)
    a, b = (lw - M).exp(), (lse_p - M).exp()
    og = (a[..., None] * o_w[:, :, prefix:].float() + b[..., None] * o_p) / (a + b)[..., None]
    return torch.cat([o_w[:, :, :prefix], og.to(o_w.dtype)], 2)


def window_only(spec):
    """The spec without ``window.pool``: what a window kernel computes before the pooled keys join."""
    return spec.without_pool()
