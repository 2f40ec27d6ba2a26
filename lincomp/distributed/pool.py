"""CLEAR's pooled keys/values (``window.pool``) under patch parallelism.

Each rank pools the cells of its own patch (its box must be made of whole pooled cells) and the ranks
share them: every rank writes its cells into a zero ``[B, Hkv, P, D + Dv]`` buffer at their global
(row-major pooled-grid) indices and one all-reduce sums the buffers, so every rank holds all ``P`` pooled
keys and values (``1 / prod(f)`` of the tokens; the all-reduce is differentiable: its backward sums the
gradients, which reach each rank's own tokens and ``pool_weight``). The local window tasks then see the
pooled keys as extra prefix keys (grid rows see every prefix key, in the same softmax); their rows are
dropped from the output, and the real prefix rows never see them.
"""

from __future__ import annotations

import itertools
import math

import torch

from lincomp.distributed.layout import Layout, box_shape
from lincomp.runtime.pool import pool_kv
from lincomp.spec import AttentionSpec


def cell_indices(spec: AttentionSpec, layout: Layout, rank: int) -> torch.Tensor:
    """Global pooled-cell index of each pooled cell of ``rank``'s box, box-local row-major order."""
    f, grid, box = spec.pool, spec.window.grid, layout.box(rank)
    for a, ((lo, hi), fa) in enumerate(zip(box, f)):
        if lo % fa or hi % fa:
            raise ValueError(f"rank {rank}'s patch spans [{lo}, {hi}) on grid axis {a}, which window.pool[{a}] = {fa} "
                             "does not divide: every rank must own whole pooled cells; cut the layout at multiples "
                             "of the pool factors (Layout cuts)")
    cells = [g // fa for g, fa in zip(grid, f)]
    strides = [math.prod(cells[a + 1:]) for a in range(len(cells))]
    local = itertools.product(*(range(lo // fa, hi // fa) for (lo, hi), fa in zip(box, f)))
    return torch.tensor([sum(c * s for c, s in zip(cell, strides)) for cell in local], dtype=torch.long)


def gather_pooled(comm, spec: AttentionSpec, layout: Layout, k_own: torch.Tensor, v_own: torch.Tensor,
                  pool_weight: torch.Tensor) -> tuple:
    """(k~, v~) [B, Hkv, P, D|Dv]: every rank's pooled cells, on every rank (one all-reduce)."""
    idx = cell_indices(spec, layout, comm.rank).to(k_own.device)
    box = box_shape(layout.box(comm.rank))
    mine = torch.cat([pool_kv(k_own, box, spec.pool, 0, pool_weight),
                      pool_kv(v_own, box, spec.pool, 0, pool_weight)], -1)
    B, Hkv, _, W = mine.shape
    buf = mine.new_zeros(B, Hkv, spec.window.pooled_tokens, W).index_copy(2, idx, mine)
    kv = comm.all_reduce(buf, "pool")
    return kv.split([k_own.shape[-1], v_own.shape[-1]], -1)
