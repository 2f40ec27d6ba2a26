"""Exact work counts and cost estimates of a spec at a length, without any L x L mask.

- :func:`count_visible_pairs`: the number of (query, key) pairs of the window set W (docs/semantics.md
  section 1), exact: closed forms for 1D / terraced windows, a sum over window offsets for grids.
- :func:`attention_flops` / :func:`dense_flops`: useful FLOPs. Convention (FlashAttention's, and CLEAR's
  "attention FLOPs"): GEMM work only, a multiply-add is 2 FLOPs; exp, max, gates and divisions are
  not counted. The softmax branch costs ``2 * (D + Dv)`` per visible pair (``QK^T`` and ``PV``).
- :func:`bytes_moved`: the ideal traffic: every input read once, the output (and state) written once.
- :func:`pair_efficiency`: useful pairs / pairs a block plan computes (1.0 = no wasted tile slots).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from lincomp.spec import AttentionSpec, GridWindow, TerracedWindow, Window1D

LINEAR_ALGORITHMS = ("chunked", "quadratic", "recurrent", "noncausal")


# ------------------------------------------------------------------------------------------- pairs
def _tri(n: int) -> int:
    return n * (n + 1) // 2


def _band_pairs(N: int, left: int, right: int) -> int:
    """#{(i, j) in [0, N)^2 : -left <= j - i <= right}: offset d has N - |d| positions."""
    if N <= 0:
        return 0
    a, b = min(left, N - 1), min(right, N - 1)     # left, right >= 0: the band holds d = 0
    return N * (a + b + 1) - _tri(a) - _tri(b)


def _terraced_pairs(N: int, b: int) -> int:
    """Pairs j <= i with block(j) in {block(i) - 1, block(i)}: query i = k*b + t (k >= 1) sees b + t + 1 keys."""
    if N <= 0:
        return 0
    m0 = min(N, b)                       # block 0: query t sees t + 1 keys
    rest = N - m0
    full, part = divmod(rest, b)
    return _tri(m0) + full * (b * b + _tri(b)) + part * b + _tri(part)


def _isqrt_floor(x: np.ndarray) -> np.ndarray:
    """floor(sqrt(x)) for int64 x >= 0, exact (float sqrt corrected by one step each way)."""
    r = np.floor(np.sqrt(x.astype(np.float64))).astype(np.int64)
    r = np.where(r * r > x, r - 1, r)
    return np.where((r + 1) * (r + 1) <= x, r + 1, r)


def _grid_pairs(w: GridWindow) -> int:
    """Non-causal pairs on the grid: sum over window offsets d of prod_a (g_a - |d_a|).

    The outer axes' offsets are enumerated (<= (2r+1)^(n-1) of them); the last axis is summed in closed
    form: offsets |dx| <= X contribute sum (g - |dx|) = g (2X + 1) - X (X + 1).
    """
    grid, r = w.grid, w.grid_radius
    outer = [np.arange(-min(r, g - 1), min(r, g - 1) + 1, dtype=np.int64) for g in grid[:-1]]
    mesh = np.meshgrid(*outer, indexing="ij")
    d = np.stack([m.reshape(-1) for m in mesh], 1)                     # [O, n-1]
    weight = np.prod(np.array(grid[:-1], dtype=np.int64) - np.abs(d), 1)
    if w.shape == "circle":
        rem = r * r - 1 - (d * d).sum(1)                                # dx^2 <= r^2 - 1 - |d_outer|^2
        ok = rem >= 0
        X = np.where(ok, _isqrt_floor(np.maximum(rem, 0)), 0)
    else:
        ok = np.ones(len(d), dtype=bool)                                # outer offsets are already <= r
        X = np.full(len(d), r, dtype=np.int64)
    gx = grid[-1]
    X = np.minimum(X, gx - 1)
    last = gx * (2 * X + 1) - X * (X + 1)
    return int((weight * last * ok).sum())


def _tile_window_pairs(w: GridWindow, causal: bool) -> int:
    """Pairs of a sliding-tile window: every query sees prod(kernel * tile) keys; with causality, per query
    the keys of its window box that are <= it in row-major order (first differing axis smaller)."""
    if not causal:
        return w.tokens * math.prod(k * t for k, t in zip(w.kernel, w.tile))
    y = np.stack(np.unravel_index(np.arange(w.tokens), w.grid), 1)                  # [N, nd] query coords
    t, k, g = (np.array(v, dtype=np.int64) for v in (w.tile, w.kernel, w.grid))
    h = k // 2
    lo = (np.clip(y // t, h, g // t - 1 - h) - h) * t                                  # window box per axis
    size = k * t
    inner = np.concatenate([np.cumprod(size[::-1])[::-1][1:], [1]])                   # points per step of axis a
    below = np.clip(y - lo, 0, None) * inner                                          # first differing axis a
    return int(w.tokens + below.sum())   # + the query itself (always inside its own window)


def body_pairs(spec: AttentionSpec, N: int) -> int:
    """Visible pairs among the N tokens after the prefix (window rule, then causality)."""
    w, causal = spec.window, spec.causal
    if w is None:
        return _tri(N) if causal else N * N
    if isinstance(w, Window1D):
        return _band_pairs(N, w.left, 0 if causal else w.right)
    if isinstance(w, TerracedWindow):
        return _terraced_pairs(N, w.block)          # already j <= i
    if isinstance(w, GridWindow):
        if N != w.tokens:
            raise ValueError(f"the grid {list(w.grid)} has {w.tokens} tokens but {N} follow the prefix")
        if w.shape == "tile":
            return _tile_window_pairs(w, causal)
        total = _grid_pairs(w)
        # The window is symmetric in d -> -d and so is prod(g - |d|); for in-bound offsets the row-major
        # flat offset is < 0 iff the first nonzero d_a is < 0, so causality keeps half of the nonzero
        # offsets' pairs plus the N pairs of d = 0 (always visible).
        return (total + N) // 2 if causal else total
    raise TypeError(f"unknown window {w!r}")


def count_visible_pairs(spec, L: int) -> int:
    """|{(i, j) : j in W(i)}| for ``spec`` at length ``L``, exact, in O(1) (1D, terraced) or
    O(#window offsets) (grids). Equals ``window_mask(spec, L).sum()``."""
    spec = AttentionSpec.coerce(spec)
    n = min(spec.prefix, L)
    N = L - n
    # Prefix rows see every key (j <= i when causal); body rows see every prefix key.
    if spec.causal:
        return _tri(n) + N * n + body_pairs(spec, N)
    return n * L + N * n + body_pairs(spec, N)


def pooled_pairs(spec, L: int) -> int:
    """(grid query, pooled key) pairs of ``window.pool``: every grid query sees all P pooled keys."""
    spec = AttentionSpec.coerce(spec)
    return 0 if spec.pool is None else (L - min(spec.prefix, L)) * spec.window.pooled_tokens


def allowed_pairs(spec, L: int) -> int:
    """Pairs causality allows: L(L+1)/2 when causal, L^2 otherwise (what dense attention computes)."""
    spec = AttentionSpec.coerce(spec)
    return _tri(L) if spec.causal else L * L


def window_covers(spec, L: int) -> bool:
    """True when the window set at length L is every allowed pair (the window is dense at this L).

    Closed forms (tested against ``count_visible_pairs == allowed_pairs``): with N body tokens,
    1D: left >= N-1 and (causal or right >= N-1); terraced: N <= 2*block and (causal or N <= 1);
    grid: every offset of the grid inside the window (circle: sum (g-1)^2 < r^2; square: max(g-1) <= r).
    """
    spec = AttentionSpec.coerce(spec)
    w = spec.window
    N = L - min(spec.prefix, L)
    if w is None or N <= 1:
        return True
    if isinstance(w, Window1D):
        return w.left >= N - 1 and (spec.causal or w.right >= N - 1)
    if isinstance(w, TerracedWindow):
        return spec.causal and N <= 2 * w.block
    if isinstance(w, GridWindow):
        if w.shape == "tile":
            return all(k * t == g for g, t, k in zip(w.grid, w.tile, w.kernel))
        if w.shape == "circle":
            return sum((g - 1) ** 2 for g in w.grid) < w.radius ** 2
        return max(w.grid) - 1 <= w.radius
    raise TypeError(f"unknown window {w!r}")


# ----------------------------------------------------------------------------------------- flops
def default_linear_algorithm(causal: bool, L: int, chunk_size: int, decode: bool = False) -> str:
    """recurrent for decoding (L == 1), noncausal for encoders, quadratic for one chunk, else chunked."""
    if not causal:
        return "noncausal"
    if decode or L == 1:
        return "recurrent"
    return "quadratic" if L <= chunk_size else "chunked"


def feature_width(spec: AttentionSpec, D: int, E: Optional[int] = None) -> int:
    """F = D for elementwise maps, 2E for hedgehog maps (E: the spec's feature_dim, else ``E``, else D/2)."""
    lin = spec.linear
    if lin is None:
        return 0
    if lin.has_weights:
        return 2 * (lin.feature_dim or E or max(1, D // 2))
    return D


def linear_flops(L: int, F: int, Dv: int, algorithm: str, chunk_size: int, normalize: bool = False,
                 initial_state: bool = False) -> int:
    """GEMM FLOPs of the linear branch for one (batch, head).

    ``normalize`` adds a ones column to v (the denominator rides along: Dv + 1). Chunked, per chunk of c:
    intra scores ``2 c^2 F``, intra output ``2 c^2 Dv'``, state read ``2 c F Dv'`` (not for the first chunk
    without an initial state) and state update ``2 c F Dv'``.
    """
    if algorithm not in LINEAR_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {LINEAR_ALGORITHMS}, got {algorithm!r}")
    dv = Dv + (1 if normalize else 0)
    if algorithm == "noncausal":
        return 2 * L * F * dv * 2                         # S = phi(K)^T V, then phi(Q) S
    if algorithm == "recurrent":
        return L * (2 * F * dv + 2 * F * dv)              # per token: S update, then phi(q) S
    c = L if algorithm == "quadratic" else chunk_size
    full, last = divmod(L, c)
    sizes = [c] * full + ([last] if last else [])
    total = 0
    for n, ci in enumerate(sizes):
        total += 2 * ci * ci * F + 2 * ci * ci * dv
        if n > 0 or initial_state:
            total += 2 * ci * F * dv
        if n < len(sizes) - 1:
            total += 2 * ci * F * dv
    return total


@dataclass
class CostEstimate:
    """Work and traffic of one call (all batches and heads). FLOPs by the module's convention."""

    visible_pairs: int                  # per (batch, head)
    allowed_pairs: int                  # per (batch, head): L^2 or L(L+1)/2
    flops: int
    dense_flops: int
    bytes: int
    dense_bytes: int
    breakdown: dict = field(default_factory=dict)   # component -> FLOPs

    @property
    def flops_saved(self) -> float:
        """Fraction of dense attention FLOPs not needed (0.995 = 99.5% fewer)."""
        return 1.0 - self.flops / self.dense_flops if self.dense_flops else 0.0

    @property
    def pair_fraction(self) -> float:
        return self.visible_pairs / self.allowed_pairs if self.allowed_pairs else 0.0

    @property
    def intensity(self) -> float:
        """FLOPs per byte at ideal traffic."""
        return self.flops / self.bytes if self.bytes else 0.0


def estimate(spec, L: int, *, B: int = 1, H: int = 1, D: int = 64, Dv: Optional[int] = None,
             Hkv: Optional[int] = None, E: Optional[int] = None, dtype_bytes: int = 2,
             linear_algorithm: Optional[str] = None, initial_state: bool = False, return_state: bool = False,
             decode: bool = False) -> CostEstimate:
    """FLOPs and bytes of ``spec`` at length ``L`` against dense attention (same B, H, D, causality).

    ``linear_algorithm``: as :func:`default_linear_algorithm` when None.
    """
    spec = AttentionSpec.coerce(spec)
    Dv = D if Dv is None else Dv
    Hkv = H if Hkv is None else Hkv
    lin = spec.linear
    F = feature_width(spec, D, E)
    breakdown = {}
    pairs = count_visible_pairs(spec, L) + pooled_pairs(spec, L) if spec.has_softmax else 0
    if spec.has_softmax:
        breakdown["window"] = 2 * (D + Dv) * pairs
    if spec.pool is not None:   # k~, v~: one multiply-add per grid token and channel (per key/value head)
        breakdown["pooling"] = 2 * (D + Dv) * (L - spec.prefix) * Hkv // H
    if lin is not None:
        algo = linear_algorithm or default_linear_algorithm(spec.causal, L, lin.chunk_size, decode)
        # A shared hybrid's scan feeds one normaliser: its den always rides along.
        norm = lin.normalize or spec.combine == "shared"
        breakdown["linear"] = linear_flops(L, F, Dv, algo, lin.chunk_size, norm, initial_state)
        if lin.has_weights:
            breakdown["feature_maps"] = 2 * (2 * L * D * (F // 2))      # x @ W for q and k
    flops = B * H * sum(breakdown.values())
    breakdown = {k: B * H * v for k, v in breakdown.items()}
    allowed = allowed_pairs(spec, L)
    return CostEstimate(pairs, allowed, flops, dense_flops(spec, L, B=B, H=H, D=D, Dv=Dv),
                        bytes_moved(spec, L, B=B, H=H, D=D, Dv=Dv, Hkv=Hkv, E=E, dtype_bytes=dtype_bytes,
                                    initial_state=initial_state, return_state=return_state),
                        dense_bytes(L, B=B, H=H, D=D, Dv=Dv, Hkv=Hkv, dtype_bytes=dtype_bytes), breakdown)


def attention_flops(spec, L: int, B: int = 1, H: int = 1, D: int = 64, Dv: Optional[int] = None, **kw) -> int:
    """Useful FLOPs of ``spec`` at length ``L``: ``2 (D + Dv)`` per visible window pair, the linear
    branch by its algorithm (chunked for causal L > chunk_size), hedgehog projections. Keywords of
    :func:`estimate` (E, linear_algorithm, initial_state, ...) pass through."""
    return estimate(spec, L, B=B, H=H, D=D, Dv=Dv, **kw).flops


def dense_flops(spec, L: int, B: int = 1, H: int = 1, D: int = 64, Dv: Optional[int] = None) -> int:
    """FLOPs of plain softmax attention with the spec's causality: ``2 (D + Dv)`` per allowed pair."""
    Dv = D if Dv is None else Dv
    return B * H * 2 * (D + Dv) * allowed_pairs(spec, L)


def dense_bytes(L: int, B: int = 1, H: int = 1, D: int = 64, Dv: Optional[int] = None,
                Hkv: Optional[int] = None, dtype_bytes: int = 2) -> int:
    """Ideal traffic of dense attention: q, k, v read once, o written once."""
    Dv = D if Dv is None else Dv
    Hkv = H if Hkv is None else Hkv
    return dtype_bytes * (B * H * L * D + B * Hkv * L * (D + Dv) + B * H * L * Dv)


def bytes_moved(spec, L: int, B: int = 1, H: int = 1, D: int = 64, Dv: Optional[int] = None,
                Hkv: Optional[int] = None, E: Optional[int] = None, dtype_bytes: int = 2,
                initial_state: bool = False, return_state: bool = False) -> int:
    """Ideal traffic in bytes: each input read once, the output written once.

    Tensors of q's dtype count ``dtype_bytes`` per element; states (S, z) are fp32 (4 bytes).
    """
    spec = AttentionSpec.coerce(spec)
    Dv = D if Dv is None else Dv
    Hkv = H if Hkv is None else Hkv
    total = dense_bytes(L, B=B, H=H, D=D, Dv=Dv, Hkv=Hkv, dtype_bytes=dtype_bytes)
    lin = spec.linear
    F = feature_width(spec, D, E)
    extra = 0
    if lin is not None:
        if lin.gate is not None:
            extra += B * H * L * (1 if lin.gate == "scalar" else F)
        if lin.has_weights:
            extra += 2 * H * D * (F // 2)
    extra += H * spec.sinks + (H if spec.combine in ("shared", "sum") else 0)
    total += dtype_bytes * extra
    state = B * H * F * (Dv + 1) * 4
    return total + (state if initial_state else 0) + (state if return_state else 0)


# ------------------------------------------------------------------------------------ block plans
def dense_tile_pairs(L: int, block_m: int, block_n: int, causal: bool) -> int:
    """Tile pairs a dense flash kernel visits: all, or those with a key at or before the query tile's end."""
    Tq, Tk = -(-L // block_m), -(-L // block_n)
    if not causal:
        return Tq * Tk
    q_end = np.minimum((np.arange(Tq, dtype=np.int64) + 1) * block_m, L) - 1
    return int((q_end // block_n + 1).sum())


def pair_efficiency(spec, L: int, plan) -> float:
    """Useful pairs / pairs the block plan computes (visited tiles x tile area, padding included)."""
    visited = plan.visited_pairs
    return count_visible_pairs(spec, L) / visited if visited else 0.0


def dense_pair_efficiency(spec, L: int, block_m: int, block_n: int) -> float:
    """pair_efficiency for a dense (or dense causal) flash kernel with no block plan."""
    return count_visible_pairs(spec, L) / (dense_tile_pairs(L, block_m, block_n, AttentionSpec.coerce(spec).causal)
                                           * block_m * block_n)


__all__ = ["count_visible_pairs", "allowed_pairs", "window_covers", "attention_flops", "dense_flops",
           "bytes_moved", "dense_bytes", "estimate", "CostEstimate", "linear_flops", "default_linear_algorithm",
           "pair_efficiency", "dense_pair_efficiency", "dense_tile_pairs", "feature_width", "LINEAR_ALGORITHMS"]

