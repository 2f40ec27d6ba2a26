"""The block-sparse plan of a window: which (query tile, key tile) pairs a kernel visits.

Kernels never scan all L x L tiles and never build a dense mask. For 1D / terraced windows tiles are
contiguous token ranges. For 2D / 3D windows the tokens are re-ordered into grid rectangles (e.g. 8 x 16
tokens per tile; prefix tokens stay in front, in tiles of their own), so a tile's keys are a few
neighbouring rectangles instead of most of a row-major band (FlexAttention's waste on CLEAR).

The plan is computed from tile bounding boxes, vectorised over candidate pairs, in O(visited pairs):
- ``any``: some pair in the two tiles may be visible (exact for grids and 1D, conservative for
  terraced + causal); a tile pair is listed iff ``any``.
- ``full``: every pair is visible and neither tile has padding slots, so a kernel may skip the
  per-element mask for it (it must still bound-check nothing: full tiles have no padding).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional, Tuple

import numpy as np
import torch

from lincomp.spec import AttentionSpec, GridWindow, TerracedWindow, Window1D


def default_tile(grid: Tuple[int, ...], block: int) -> Tuple[int, ...]:
    """A tile shape with ``prod == block`` for a grid: near-square, the last axis widest (coalescing).

    2D: 128 -> (8, 16), 64 -> (8, 8), 32 -> (4, 8), 16 -> (4, 4). 3D: 128 -> (4, 4, 8).
    Axes shorter than their share give their share to the others.
    """
    if block & (block - 1):
        raise ValueError(f"block size must be a power of two for grid tiling, got {block}")
    n = len(grid)
    tile = [1] * n
    remaining = block
    # Deal factors of two round-robin from the last axis, skipping axes already covering the grid.
    axis = n - 1
    guard = 0
    while remaining > 1 and guard < 64:
        guard += 1
        if tile[axis] < grid[axis] or all(tile[a] >= grid[a] for a in range(n)):
            tile[axis] *= 2
            remaining //= 2
        axis = (axis - 1) % n
    return tuple(tile)


def window_tile(window: GridWindow, block: int) -> Tuple[int, ...]:
    """The grid tile shape of ``block`` tokens for ``window``: for sliding-tile windows one that fits inside
    a window tile on every axis when one exists (then no tile pair is partly visible), else
    :func:`default_tile`."""
    if window.shape == "tile":
        divisors = [[d for d in (1 << e for e in range(t.bit_length())) if t % d == 0] for t in window.tile]
        best = None
        for combo in itertools.product(*divisors):
            # prefer the widest last axis, then the next (coalesced rows), like default_tile
            if math.prod(combo) == block and (best is None or combo[::-1] > best[::-1]):
                best = combo
        if best is not None:
            return tuple(best)
    return default_tile(window.grid, block)


def aligned_block(window: GridWindow, lo: int = 16, hi: int = 128) -> Optional[int]:
    """The largest power-of-two block in [lo, hi] whose :func:`window_tile` fits inside the window's tiles
    (sliding-tile windows), else None."""
    if window.shape != "tile":
        return None
    b = hi
    while b >= lo:
        t = window_tile(window, b)
        if all(w % x == 0 for w, x in zip(window.tile, t)) and math.prod(t) == b:
            return b
        b //= 2
    return None


@dataclass
class BlockPlan:
    """Tiles and the visited (query tile, key tile) pairs, as CSR in both directions.

    Token layout: ``q_tokens [Tq, block_m]`` / ``k_tokens [Tk, block_n]`` give the original token index in
    each tile slot (-1 = padding); ``None`` means the identity order (tile t holds tokens
    ``t*block .. t*block+block-1``, the last tile truncated at L).
    """

    L: int
    block_m: int
    block_n: int
    tile: Optional[Tuple[int, ...]]          # grid tile shape when tokens are re-ordered
    q_tokens: Optional[torch.Tensor]         # [Tq, block_m] int32 or None
    k_tokens: Optional[torch.Tensor]         # [Tk, block_n] int32 or None
    kv_offsets: torch.Tensor                 # [Tq + 1] int32: key tiles of query tile t are
    kv_indices: torch.Tensor                 # kv_indices[kv_offsets[t]:kv_offsets[t+1]] (ascending)
    kv_full: torch.Tensor                    # [nnz] bool, aligned with kv_indices
    q_offsets: torch.Tensor                  # [Tk + 1] int32: the transpose (for dk / dv)
    q_indices: torch.Tensor                  # [nnz] int32
    q_full: torch.Tensor                     # [nnz] bool
    num_q_tiles: int
    num_k_tiles: int
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def nnz(self) -> int:
        return int(self.kv_indices.numel())

    @property
    def density(self) -> float:
        """Visited tile pairs / all tile pairs."""
        return self.nnz / max(1, self.num_q_tiles * self.num_k_tiles)

    @property
    def full_fraction(self) -> float:
        return float(self.kv_full.float().mean()) if self.nnz else 0.0

    @property
    def max_kv_per_q(self) -> int:
        return int((self.kv_offsets[1:] - self.kv_offsets[:-1]).max()) if self.num_q_tiles else 0

    @property
    def visited_pairs(self) -> int:
        """Token pairs a kernel computes scores for (tiles visited x tile area)."""
        return self.nnz * self.block_m * self.block_n

    def to(self, device) -> "BlockPlan":
        """The same plan with its tensors on ``device`` (cached per device)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        key = str(device)
        if key not in self._device_cache:
            moved = {name: (getattr(self, name).to(device) if getattr(self, name) is not None else None)
                     for name in ("q_tokens", "k_tokens", "kv_offsets", "kv_indices", "kv_full",
                                  "q_offsets", "q_indices", "q_full")}
            self._device_cache[key] = BlockPlan(self.L, self.block_m, self.block_n, self.tile, **moved,
                                                num_q_tiles=self.num_q_tiles, num_k_tiles=self.num_k_tiles)
        return self._device_cache[key]

    def dense_tile_mask(self) -> torch.Tensor:
        """[Tq, Tk] bool of visited tile pairs (for tests and explain output; small plans only)."""
        m = torch.zeros(self.num_q_tiles, self.num_k_tiles, dtype=torch.bool)
        rows = torch.repeat_interleave(torch.arange(self.num_q_tiles),
                                       (self.kv_offsets[1:] - self.kv_offsets[:-1]).long())
        m[rows, self.kv_indices.long()] = True
        return m


# ------------------------------------------------------------------------------------------ tiles
@dataclass
class _Tiles:
    """Per-tile facts as numpy arrays [T]: what the visibility test of a tile pair needs."""

    tokens: Optional[np.ndarray]   # [T, block] original index (-1 pad) or None (identity)
    lo: np.ndarray                 # [T] min original index
    hi: np.ndarray                 # [T] max original index
    padded: np.ndarray             # [T] bool: has padding slots
    prefix: np.ndarray             # [T] 0: body only, 1: prefix only, 2: both (identity order)
    box_lo: Optional[np.ndarray]   # [T, n] grid coordinate box (body tiles), grid windows only
    box_hi: Optional[np.ndarray]
    coord: Optional[np.ndarray]    # [T, n] tile coordinate in the tile grid (-1 for prefix tiles)


def _identity_tiles(L: int, block: int, n_prefix: int) -> _Tiles:
    T = -(-L // block)
    lo = np.arange(T) * block
    hi = np.minimum(lo + block, L) - 1
    padded = (hi - lo + 1) < block
    prefix = np.where(hi < n_prefix, 1, np.where(lo >= n_prefix, 0, 2))
    return _Tiles(None, lo, hi, padded, prefix, None, None, None)


def _grid_tiles(spec: AttentionSpec, block: int, tile: Tuple[int, ...]) -> _Tiles:
    w: GridWindow = spec.window
    n, grid = spec.prefix, w.grid
    # Prefix tiles first (their own tiles, never mixed with grid tokens).
    Tp = -(-n // block)
    ptok = np.full((Tp, block), -1, dtype=np.int64)
    flat = np.arange(n)
    ptok.reshape(-1)[:n] = flat
    # Grid tiles: rectangles of shape `tile`, in row-major order of the tile grid.
    tgrid = tuple(-(-g // t) for g, t in zip(grid, tile))
    Tg = math.prod(tgrid)
    tcoord = np.stack(np.unravel_index(np.arange(Tg), tgrid), 1)                    # [Tg, nd]
    inner = np.stack(np.unravel_index(np.arange(block), tile), 1)                   # [block, nd]
    coords = tcoord[:, None, :] * np.array(tile) + inner[None]                       # [Tg, block, nd]
    inside = _over_axes(np.logical_and, coords < np.array(grid))
    strides = np.array([math.prod(grid[a + 1:]) for a in range(len(grid))])
    gtok = np.where(inside, n + _over_axes(np.add, coords * strides), -1)
    tokens = np.concatenate([ptok, gtok], 0)
    valid = tokens >= 0
    big = np.iinfo(np.int64).max
    lo = np.where(valid, tokens, big).min(1)
    hi = np.where(valid, tokens, -1).max(1)
    padded = ~valid.all(1)
    prefix = np.concatenate([np.ones(Tp, dtype=np.int64), np.zeros(Tg, dtype=np.int64)])
    cl = np.where(inside[..., None], coords, big).min(1)
    ch = np.where(inside[..., None], coords, -1).max(1)
    nd = len(grid)
    box_lo = np.concatenate([np.zeros((Tp, nd), np.int64), cl], 0)
    box_hi = np.concatenate([np.zeros((Tp, nd), np.int64), ch], 0)
    coord = np.concatenate([np.full((Tp, nd), -1, np.int64), tcoord], 0)
    return _Tiles(tokens, lo, hi, padded, prefix, box_lo, box_hi, coord)


def _rowmajor_grid_boxes(spec: AttentionSpec, t: _Tiles) -> None:
    """Bounding boxes of contiguous row-major token ranges (FlexAttention's layout; conservative)."""
    w: GridWindow = spec.window
    n = spec.prefix
    a = np.clip(t.lo - n, 0, None)
    b = np.clip(t.hi - n, 0, None)
    ca = np.stack(np.unravel_index(a, w.grid), 1)
    cb = np.stack(np.unravel_index(b, w.grid), 1)
    lo, hi = ca.copy(), cb.copy()
    for axis in range(1, len(w.grid)):
        # If the range wraps an outer axis, this axis spans its whole extent.
        wraps = np.any(ca[:, :axis] != cb[:, :axis], 1)
        lo[:, axis] = np.where(wraps, 0, np.minimum(ca[:, axis], cb[:, axis]))
        hi[:, axis] = np.where(wraps, w.grid[axis] - 1, np.maximum(ca[:, axis], cb[:, axis]))
    t.box_lo, t.box_hi = lo, hi


# -------------------------------------------------------------------------------- pair predicates
def _pairs_any_full(spec: AttentionSpec, qt: _Tiles, kt: _Tiles, qi: np.ndarray, ki: np.ndarray):
    """Vectorised (any, full) for candidate tile pairs (qi[p], ki[p])."""
    n = spec.prefix
    qlo, qhi, klo, khi = qt.lo[qi], qt.hi[qi], kt.lo[ki], kt.hi[ki]
    q_pref, k_pref = qt.prefix[qi], kt.prefix[ki]
    w = spec.window
    # Body-body rule on positions after the prefix (clamped: mixed tiles handled by the prefix terms).
    qa, qb = np.maximum(qlo - n, 0), qhi - n
    ka, kb = np.maximum(klo - n, 0), khi - n
    if w is None:
        any_w = np.ones_like(qa, dtype=bool)
        all_w = np.ones_like(qa, dtype=bool)
    elif isinstance(w, Window1D):
        any_w = (ka <= qb + w.right) & (kb >= qa - w.left)
        all_w = (ka >= qb - w.left) & (kb <= qa + w.right)
    elif isinstance(w, TerracedWindow):
        bqa, bqb, bka, bkb = qa // w.block, qb // w.block, ka // w.block, kb // w.block
        any_w = (bka <= bqb) & (bkb >= bqa - 1) & (ka <= qb)
        all_w = (kb <= qa) & (bqb - bka <= 1) & (bqa >= bkb)
    else:
        # np.take, not box[qi]: numpy's fancy indexing of a 2-D array is ~10x slower for these row gathers
        ql, qh, kl, kh = (np.take(a, i, axis=0) for a, i in ((qt.box_lo, qi), (qt.box_hi, qi), (kt.box_lo, ki),
                                                              (kt.box_hi, ki)))
        dmin = np.maximum(0, np.maximum(kl - qh, ql - kh))
        dmax = np.maximum(qh - kl, kh - ql)
        if w.shape == "tile":
            any_w, all_w = _tile_pairs(w, ql, qh, kl, kh)
        elif w.shape == "circle":
            r2 = w.grid_radius ** 2
            any_w = _over_axes(np.add, dmin * dmin) < r2
            all_w = _over_axes(np.add, dmax * dmax) < r2
        else:
            any_w = _over_axes(np.maximum, dmin) <= w.grid_radius
            all_w = _over_axes(np.maximum, dmax) <= w.grid_radius
    # Prefix rows see every key; every row sees prefix keys.
    body_q, body_k = q_pref == 0, k_pref == 0
    pure_prefix = (q_pref == 1) | (k_pref == 1)
    any_ = pure_prefix | (q_pref == 2) | (k_pref == 2) | any_w
    full = pure_prefix | (body_q & body_k & all_w)
    if spec.causal:
        any_ &= klo <= qhi
        full &= khi <= qlo
    full &= ~qt.padded[qi] & ~kt.padded[ki]
    return any_, full


def _tile_pairs(w: GridWindow, ql, qh, kl, kh):
    """(any, all) of the sliding-tile rule for query / key coordinate boxes [..., nd] (exact per axis: the
    query's window centre clamp(y // tile, h, n - 1 - h) is monotone in y)."""
    t, k = np.array(w.tile), np.array(w.kernel)
    h, n = k // 2, np.array(w.grid) // t
    ca, cb = np.clip(ql // t, h, n - 1 - h), np.clip(qh // t, h, n - 1 - h)
    ka, kb = kl // t, kh // t
    dmin = np.maximum(0, np.maximum(ka - cb, ca - kb))
    dmax = np.maximum(cb - ka, kb - ca)
    return _over_axes(np.logical_and, dmin <= h), _over_axes(np.logical_and, dmax <= h)


def _over_axes(op, a: np.ndarray) -> np.ndarray:
    """``op`` folded over the last axis (the grid's 1-3 axes): numpy's reduce over a short last axis is
    several times slower than these elementwise ops on the plan's 10^4-10^5 tile pairs."""
    out = a[..., 0]
    for i in range(1, a.shape[-1]):
        out = op(out, a[..., i])
    return out


def _candidates(spec: AttentionSpec, L: int, qt: _Tiles, kt: _Tiles, block_n: int, tile):
    """Candidate (q tile, k tile) pairs: every pair that could be visible, without L x L work."""
    Tq, Tk = len(qt.lo), len(kt.lo)
    w = spec.window
    n = spec.prefix
    prefix_k = np.nonzero(kt.prefix > 0)[0]
    prefix_q = np.nonzero(qt.prefix > 0)[0]
    pairs = []
    # Every query tile x prefix key tiles; prefix query tiles x every key tile.
    pairs.append((np.repeat(np.arange(Tq), len(prefix_k)), np.tile(prefix_k, Tq)))
    pairs.append((np.repeat(prefix_q, Tk), np.tile(np.arange(Tk), len(prefix_q))))
    body_q = np.nonzero(qt.prefix != 1)[0]
    if w is None:
        pairs.append((np.repeat(body_q, Tk), np.tile(np.arange(Tk), len(body_q))))
    elif isinstance(w, GridWindow) and tile is not None:
        # Neighbouring tiles within the window's reach per axis (in tile units, rounded up).
        tile = np.array(tile)
        reach = -(-np.array(w.axis_reach()) // tile)
        tgrid = kt.coord.max(0) + 1
        ranges = [np.arange(-r, r + 1) for r in reach]
        offsets = np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, len(tile))
        bq = np.nonzero(qt.prefix == 0)[0]
        cand = qt.coord[bq][:, None, :] + offsets[None]                             # [nq, O, nd]
        ok = np.all((cand >= 0) & (cand < tgrid), -1)
        flat = np.ravel_multi_index(tuple(np.where(ok[..., None], cand, 0).transpose(2, 0, 1)), tuple(tgrid))
        n_pk = int((kt.prefix > 0).sum())
        qq = np.repeat(bq, offsets.shape[0]).reshape(len(bq), -1)
        pairs.append((qq[ok], (flat + n_pk)[ok]))
    else:
        # Contiguous key range reachable from the query tile's positions.
        if isinstance(w, Window1D):
            back, fwd = w.left, w.right
        elif isinstance(w, TerracedWindow):
            back, fwd = 2 * w.block - 1, 0
        else:  # a grid window in row-major order: reach in flat positions
            back = fwd = w.reach(False)
        qa = np.maximum(qt.lo[body_q] - n, 0)
        qb = qt.hi[body_q] - n
        lo_tok = np.clip(qa - back + n, 0, L - 1)
        hi_tok = np.clip(qb + fwd + n, 0, L - 1)
        if spec.causal:
            hi_tok = np.minimum(hi_tok, qt.hi[body_q])
        lo_t, hi_t = lo_tok // block_n, hi_tok // block_n
        counts = np.maximum(hi_t - lo_t + 1, 0)
        qq = np.repeat(body_q, counts)
        starts = np.repeat(lo_t, counts)
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        pairs.append((qq, starts + within))
    qi = np.concatenate([p[0] for p in pairs]).astype(np.int64)
    ki = np.concatenate([p[1] for p in pairs]).astype(np.int64)
    # sort + drop repeats: numpy 2.4's hash-based np.unique is ~15x slower than this at 1e5 keys
    key = np.sort(qi * Tk + ki)
    key = key[np.concatenate(([True], key[1:] != key[:-1]))] if len(key) else key
    return key // Tk, key % Tk


def _csr(rows: np.ndarray, cols: np.ndarray, full: np.ndarray, n_rows: int, n_cols: int):
    # (row, col) pairs are unique: one argsort of row * n_cols + col orders them as a lexsort would
    order = np.argsort(rows * n_cols + cols)
    rows, cols, full = rows[order], cols[order], full[order]
    offsets = np.zeros(n_rows + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.bincount(rows, minlength=n_rows))
    return (torch.from_numpy(offsets.astype(np.int32)), torch.from_numpy(cols.astype(np.int32)),
            torch.from_numpy(full.astype(bool)))


def block_plan(spec: AttentionSpec, L: int, block_m: int = 64, block_n: Optional[int] = None,
               tile: Optional[Tuple[int, ...]] = None, order: str = "tiled") -> BlockPlan:
    """The plan for ``spec`` at length ``L`` with query tiles of ``block_m`` and key tiles of ``block_n``.

    ``order="tiled"`` re-orders grid windows into ``tile`` rectangles (default: :func:`default_tile`);
    ``order="rowmajor"`` keeps row-major order (what FlexAttention does; for comparison).
    Cached: the same arguments return the same object.
    """
    spec = AttentionSpec.coerce(spec)
    block_n = block_m if block_n is None else block_n
    if order not in ("tiled", "rowmajor"):
        raise ValueError(f"order must be 'tiled' or 'rowmajor', got {order!r}")
    expected = spec.expected_length()
    if expected is not None and expected != L:
        raise ValueError(f"L={L} does not match the spec's grid: expected prefix + prod(grid) = {expected}")
    return _block_plan(spec, int(L), int(block_m), int(block_n), None if tile is None else tuple(tile), order)


@lru_cache(maxsize=256)
def _block_plan(spec, L, block_m, block_n, tile, order) -> BlockPlan:
    w = spec.window
    tiled = isinstance(w, GridWindow) and order == "tiled"
    if tiled:
        if block_m != block_n:
            raise ValueError(f"grid tiling needs equal query and key tiles, got block_m={block_m}, block_n={block_n}")
        tile = tile or window_tile(w, block_m)
        if math.prod(tile) != block_m or len(tile) != len(w.grid):
            raise ValueError(f"tile {tile} must have {len(w.grid)} axes and prod == block_m ({block_m})")
        qt = kt = _grid_tiles(spec, block_m, tile)
    else:
        tile = None
        qt = _identity_tiles(L, block_m, spec.prefix)
        kt = qt if block_n == block_m else _identity_tiles(L, block_n, spec.prefix)
        if isinstance(w, GridWindow):
            for t in {id(qt): qt, id(kt): kt}.values():
                _rowmajor_grid_boxes(spec, t)
    qi, ki = _candidates(spec, L, qt, kt, block_n, tile)
    any_, full = _pairs_any_full(spec, qt, kt, qi, ki)
    qi, ki, full = qi[any_], ki[any_], full[any_]
    Tq, Tk = len(qt.lo), len(kt.lo)
    kv_offsets, kv_indices, kv_full = _csr(qi, ki, full, Tq, Tk)
    q_offsets, q_indices, q_full = _csr(ki, qi, full, Tk, Tq)
    to_t = (lambda a: None if a is None else torch.from_numpy(a.astype(np.int32)))
    return BlockPlan(L, block_m, block_n, tile, to_t(qt.tokens), to_t(kt.tokens), kv_offsets, kv_indices,
                     kv_full, q_offsets, q_indices, q_full, Tq, Tk)
