"""CLEAR's pooled keys/values in the reference (docs/semantics.md section 1, ``window.pool``), written plainly.

The pooling is an explicit matrix ``A [P, L]`` with ``A[c, n + t(c * f + o)] = pool_weight[o]``, so
``k~ = A @ k`` and ``v~ = A @ v``; the pooled keys are appended after the ``L`` tokens with the mask
"grid query" (prefix queries never see them). Independent of the kernels' reshape-sum pooling on purpose.
"""

from __future__ import annotations

import itertools
import math

import torch

from lincomp.spec import AttentionSpec


def pooling_matrix(spec: AttentionSpec, L: int, pool_weight: torch.Tensor) -> torch.Tensor:
    """A [P, L] in pool_weight's dtype: row c holds the weights of pooled cell c's grid tokens."""
    grid, f, n = spec.window.grid, spec.pool, spec.prefix
    cells = [g // fa for g, fa in zip(grid, f)]
    strides = [math.prod(grid[a + 1:]) for a in range(len(grid))]
    rows, cols, widx = [], [], []
    for c, cell in enumerate(itertools.product(*(range(x) for x in cells))):       # row-major pooled grid
        for o_flat, off in enumerate(itertools.product(*(range(fa) for fa in f))):  # row-major offsets
            t = sum((cc * fa + oo) * st for cc, fa, oo, st in zip(cell, f, off, strides))
            rows.append(c)
            cols.append(n + t)
            widx.append(o_flat)
    A = pool_weight.new_zeros(math.prod(cells), L)
    A = A.index_put((torch.tensor(rows), torch.tensor(cols)), pool_weight.reshape(-1)[torch.tensor(widx)])
    return A


def pooled_scores(spec: AttentionSpec, q, k, v, pool_weight, scale: float):
    """(s~ [B, H, L, P], mask [L, P], v~ [B, H, P, Dv]) for q [B, H, L, D] and k, v already [B, H, L, .]."""
    L = q.shape[2]
    A = pooling_matrix(spec, L, pool_weight.to(q.dtype).to(q.device))
    kp, vp = A @ k, A @ v
    s = scale * (q @ kp.transpose(-1, -2))
    mask = (torch.arange(L, device=q.device) >= spec.prefix)[:, None].expand(L, kp.shape[2])
    return s, mask, vp
