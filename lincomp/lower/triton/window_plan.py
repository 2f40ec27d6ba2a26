"""The block-sparse plan as the window kernels read it: partial and full tile lists, heavy tiles first.

:func:`lincomp.ir.blocks.block_plan` gives one CSR per direction with a ``full`` flag per entry. The
kernels run two loops per tile (partial tiles with the per-element window mask, then full tiles
without it), so each CSR is split in two here, once per (plan, device), and cached. ``order`` lists
the tiles by decreasing work (longest-processing-time first: the launch grid visits them in this
order, so the dense prefix rows of a CLEAR spec start first and do not form a tail).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from lincomp.ir.blocks import BlockPlan


@dataclass(frozen=True)
class TileLists:
    """For each of T tiles: partners in ``part_idx[part_off[t]:part_off[t+1]]`` (need the mask) and
    ``full_idx[full_off[t]:full_off[t+1]]`` (every pair visible, no padding); ``order`` [T] int32."""

    order: torch.Tensor      # [T]
    part_off: torch.Tensor   # [T + 1]
    part_idx: torch.Tensor   # [n_part]
    full_off: torch.Tensor   # [T + 1]
    full_idx: torch.Tensor   # [n_full]

    @property
    def num_tiles(self) -> int:
        return int(self.order.numel())

    def tensors(self) -> tuple:
        return self.order, self.part_off, self.part_idx, self.full_off, self.full_idx


def split_csr(offsets: torch.Tensor, indices: torch.Tensor, full: torch.Tensor) -> TileLists:
    """Split one CSR (offsets [T+1], indices [nnz], full [nnz]) into partial / full lists + LPT order."""
    offsets = offsets.long().cpu()
    indices = indices.cpu().to(torch.int32)
    full = full.cpu().bool()
    T = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]
    rows = torch.repeat_interleave(torch.arange(T), counts)

    def csr(sel: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        per_row = torch.zeros(T, dtype=torch.long).index_add_(0, rows[sel], torch.ones_like(rows[sel]))
        off = torch.zeros(T + 1, dtype=torch.long)
        off[1:] = torch.cumsum(per_row, 0)
        return off.to(torch.int32), indices[sel].contiguous()  # CSR order kept: rows ascending

    part_off, part_idx = csr(~full)
    full_off, full_idx = csr(full)
    # Work estimate: a partial tile costs a little more than a full one (the mask).
    work = (part_off[1:] - part_off[:-1]).double() * 1.15 + (full_off[1:] - full_off[:-1]).double()
    order = torch.sort(work, descending=True, stable=True).indices.to(torch.int32)
    return TileLists(order, part_off, part_idx, full_off, full_idx)


_CACHE: Dict[tuple, Tuple[TileLists, TileLists]] = {}


def tile_lists(plan: BlockPlan, device) -> Tuple[TileLists, TileLists]:
    """(per query tile: key tiles; per key tile: query tiles) on ``device``, cached per plan object."""
    device = torch.device(device)
    key = (id(plan), str(device))
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is plan:
        return hit[1]
    fwd = split_csr(plan.kv_offsets, plan.kv_indices, plan.kv_full)
    bwd = split_csr(plan.q_offsets, plan.q_indices, plan.q_full)
    if device.type != "cpu":
        fwd = TileLists(*(t.to(device) for t in fwd.tensors()))
        bwd = TileLists(*(t.to(device) for t in bwd.tensors()))
    if len(_CACHE) > 512:
        _CACHE.clear()
    _CACHE[key] = (plan, (fwd, bwd))  # holding the plan keeps id(plan) from being reused
    return fwd, bwd
