"""Which keys each query sees (docs/semantics.md section 1), as an elementwise predicate on index tensors.

This is the ground truth the block-sparse planner and every kernel are tested against.
"""

from __future__ import annotations

import torch

from lincomp.spec import AttentionSpec, GridWindow, TerracedWindow, Window1D


def _grid_coords(p: torch.Tensor, grid: tuple) -> list:
    coords = []
    for axis in range(len(grid)):
        stride = 1
        for g in grid[axis + 1:]:
            stride *= g
        coords.append((p // stride) % grid[axis])
    return coords


def window_rule(window, ip: torch.Tensor, jp: torch.Tensor) -> torch.Tensor:
    """Visibility by the window alone, for positions counted after the prefix (ip, jp >= 0)."""
    if window is None:
        return torch.ones(torch.broadcast_shapes(ip.shape, jp.shape), dtype=torch.bool, device=ip.device)
    if isinstance(window, Window1D):
        return (jp >= ip - window.left) & (jp <= ip + window.right)
    if isinstance(window, TerracedWindow):
        bi, bj = ip // window.block, jp // window.block
        return (jp <= ip) & ((bj == bi) | (bj == bi - 1))
    if isinstance(window, GridWindow):
        ci, cj = _grid_coords(ip, window.grid), _grid_coords(jp, window.grid)
        if window.shape == "tile":
            vis = torch.ones(torch.broadcast_shapes(ip.shape, jp.shape), dtype=torch.bool, device=ip.device)
            for yi, yj, g, t, k in zip(ci, cj, window.grid, window.tile, window.kernel):
                h, n_tiles = k // 2, g // t
                centre = (yi // t).clamp(h, n_tiles - 1 - h)   # the window shifts inside at borders
                vis = vis & ((centre - yj // t).abs() <= h)
            return vis
        if window.shape == "circle":
            d2 = sum((a - b) ** 2 for a, b in zip(ci, cj))
            return d2 < window.grid_radius ** 2
        dmax = torch.stack([(a - b).abs() for a, b in zip(ci, cj)]).amax(0)
        return dmax <= window.grid_radius
    raise TypeError(f"unknown window {window!r}")


def visible(spec: AttentionSpec, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """W(i) membership for (broadcast) query positions i and key positions j."""
    n = spec.prefix
    ip, jp = i - n, j - n
    rule = window_rule(spec.window, ip.clamp(min=0), jp.clamp(min=0))
    vis = (i < n) | (j < n) | rule
    if spec.causal:
        vis = vis & (j <= i)
    return vis


def window_mask(spec: AttentionSpec, L: int, device=None) -> torch.Tensor:
    """[L, L] bool: mask[i, j] is True when query i sees key j (the whole window set W)."""
    idx = torch.arange(L, device=device)
    return visible(spec, idx[:, None], idx[None, :])


def allowed_mask(spec: AttentionSpec, L: int, device=None) -> torch.Tensor:
    """[L, L] bool: the keys causality allows (j <= i when causal, all otherwise)."""
    idx = torch.arange(L, device=device)
    if spec.causal:
        return idx[None, :] <= idx[:, None]
    return torch.ones(L, L, dtype=torch.bool, device=device)
