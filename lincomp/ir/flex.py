"""The FlexAttention bridge, both ways: a spec's ``mask_mod`` / ``BlockMask``, and a spec from a ``mask_mod``.

- :func:`mask_mod` / :func:`block_mask`: the IR's visibility rule (:mod:`lincomp.ir.rule`) as FlexAttention
  takes it, for specs that are a softmax over a mask (no linear branch, sinks or pooled keys, which a mask
  cannot say). ``AttentionSpec.mask_mod()`` / ``.block_mask(L)`` call these. :func:`pooled_mask_mod`: a
  pooled spec's mask over the window's keys followed by the pooled ones (FlexAttention on concatenated keys).
- :func:`from_mask_mod`: evaluates a user's ``mask_mod(b, h, q_idx, kv_idx)`` on the full [L, L] index grid
  (FlexAttention's own ``create_mask``, so whatever FlexAttention accepts works here) and recognises the
  rules lincomp has: dense, causal, 1D bands / sliding windows, terraced blocks, 2D / 3D circles, squares
  and sliding tiles on a given grid, each with global prefix tokens. Every candidate is checked pair by
  pair against the evaluated mask; none matching raises a ValueError naming the closest rule and the
  (q, k) pairs where it disagrees.

``torch.nn.attention.flex_attention`` is imported on first use only.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from lincomp.ir import rule as _rule
from lincomp.spec import AttentionSpec, GridWindow, TerracedWindow, Window1D

# How many disagreeing (q, k) pairs an error lists.
_SHOW_PAIRS = 5


def _check_maskable(spec: AttentionSpec) -> None:
    """Raise unless a FlexAttention mask alone reproduces ``spec`` (a softmax over visible keys)."""
    why = None
    if spec.linear is not None:
        why = "it has a linear branch (spec.linear), which is not a mask"
    elif spec.sinks:
        why = f"it has sinks={spec.sinks} (extra logits in the softmax denominator), which a mask cannot add"
    elif spec.pool is not None:
        why = f"it has window.pool={list(spec.pool)} (pooled keys after the L tokens), which an [L, L] mask lacks"
    if why:
        raise ValueError(f"spec {spec.summary()!r} has no FlexAttention mask_mod: {why}. Run it with "
                         "lincomp.compile(spec) instead, or use lincomp.ir.lower(spec).mask_mod() for the "
                         "window's visibility alone")


def mask_mod(spec) -> Callable:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` for ``spec`` (token indices, prefix first)."""
    spec = AttentionSpec.coerce(spec)
    _check_maskable(spec)
    return _rule.mask_mod(spec)


def pooled_mask_mod(spec) -> Callable:
    """FlexAttention ``mask_mod`` of a pooled spec (CLEAR's ``window.pool``) as one attention over the keys
    ``cat([k, k_pooled], 2)`` ([B, H, L + P, D]; ``k_pooled`` / ``v_pooled`` from the spec's pooling,
    ``lincomp.runtime.pool.pooled_kv``): a key below L by the window's rule, a pooled key (index >= L) seen by
    every grid query and by no prefix token. What a FlexAttention port of CLEAR's pooled path computes."""
    spec = AttentionSpec.coerce(spec)
    if spec.pool is None:
        raise ValueError(f"pooled_mask_mod needs a spec with window.pool, {spec.summary()!r} has none; "
                         "use spec.mask_mod()")
    window = mask_mod(spec.without_pool())
    L, prefix = spec.expected_length(), spec.prefix

    def fn(b, h, q_idx, kv_idx):
        return ((kv_idx < L) & window(b, h, q_idx, kv_idx)) | ((kv_idx >= L) & (q_idx >= prefix))
    return fn


def block_mask(spec, L: Optional[int] = None, *, device="cpu", B: Optional[int] = None, H: Optional[int] = None,
               BLOCK_SIZE: int = 128):
    """FlexAttention ``BlockMask`` of ``spec`` at length ``L`` (grid specs: default prefix + prod(grid)).

    ``B`` / ``H`` None broadcast over batch and heads (the rule depends on neither).
    """
    spec = AttentionSpec.coerce(spec)
    fn = mask_mod(spec)
    expected = spec.expected_length()
    if L is None:
        if expected is None:
            raise ValueError(f"block_mask needs L (the sequence length) for {spec.summary()!r}; "
                             "e.g. spec.block_mask(4096)")
        L = expected
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise ValueError(f"L must be a positive int (the sequence length), got {L!r}")
    if expected is not None and L != expected:
        raise ValueError(f"L={L} but the spec's grid window fixes L = prefix {spec.prefix} + grid "
                         f"{list(spec.window.grid)} = {expected}; pass L={expected} or use spec.with_grid(...)")
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(fn, B, H, L, L, device=device, BLOCK_SIZE=BLOCK_SIZE)


# ============================================================================ mask_mod -> spec
def _evaluate(fn: Callable, L: int) -> torch.Tensor:
    """``fn`` on every (q, k) of an [L, L] grid for batch 0 / head 0 -> bool [L, L] (raises if it depends on
    the batch or head index: one spec is the same rule for all)."""
    if not callable(fn):
        raise TypeError(f"from_mask_mod needs a mask_mod function (b, h, q_idx, kv_idx) -> bool, got "
                        f"{type(fn).__name__}")
    from torch.nn.attention.flex_attention import create_mask
    try:
        m = create_mask(fn, 2, 2, L, L, device="cpu")
    except Exception as e:   # whatever the user's function raised, said with what we were doing
        raise ValueError(f"could not evaluate the mask_mod on a {L}x{L} index grid ({type(e).__name__}: {e}); "
                         "a mask_mod must accept int tensors (b, h, q_idx, kv_idx) and return a bool tensor, "
                         "as FlexAttention calls it") from e
    if m.dtype != torch.bool:
        raise TypeError(f"the mask_mod returned {m.dtype}, not torch.bool; return a comparison such as "
                        "q_idx >= kv_idx")
    for b in range(2):
        for h in range(2):
            if not torch.equal(m[b, h], m[0, 0]):
                raise ValueError(f"the mask_mod differs between batch/head (0, 0) and ({b}, {h}); a spec is one "
                                 "rule for every batch row and head, so only head- and batch-independent masks "
                                 "convert")
    return m[0, 0]


def _prefix_bound(m: torch.Tensor, causal: bool) -> int:
    """The largest n such that tokens < n see, and are seen by, every allowed token (a prefix of globals)."""
    L = m.shape[0]
    allowed = torch.ones(L, L, dtype=torch.bool).tril() if causal else torch.ones(L, L, dtype=torch.bool)
    free = m | ~allowed
    ok = free.all(0) & free.all(1)
    bad = (~ok).nonzero()
    return L if bad.numel() == 0 else int(bad[0, 0])


def _body_pairs(m: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(i, j) body positions (after the prefix) of the visible body pairs."""
    idx = m[n:, n:].nonzero()
    return idx[:, 0], idx[:, 1]


def _band(m: torch.Tensor, n: int, causal: bool) -> List[AttentionSpec]:
    i, j = _body_pairs(m, n)
    if i.numel() == 0:
        return []
    d = i - j
    left, right = max(int(d.max()), 0), max(int((-d).max()), 0)
    return [AttentionSpec(window=Window1D(left, right), causal=causal, prefix=n)]


def _terraced(m: torch.Tensor, n: int, causal: bool) -> List[AttentionSpec]:
    if not causal:
        return []
    body = m[n:, n:]
    first = body.float().argmax(1)   # first visible body key of each body row
    late = (first > 0).nonzero()
    if late.numel() == 0:
        return []
    i0 = int(late[0, 0])   # the first row of block 2: it no longer sees block 0
    return [AttentionSpec(window=TerracedWindow(i0 // 2), causal=True, prefix=n)] if i0 % 2 == 0 else []


def _coords(grid: Tuple[int, ...]) -> torch.Tensor:
    """[prod(grid), nd] row-major coordinates."""
    axes = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    return torch.stack([a.reshape(-1) for a in axes], 1)


def _tile_axis(rel: torch.Tensor, g: int, causal: bool) -> Optional[Tuple[int, int]]:
    """(tile, kernel) whose 1D sliding-tile rule on an axis of ``g`` tokens is ``rel`` [g, g], else None."""
    qc, kc = torch.arange(g)[:, None], torch.arange(g)[None, :]
    for t in (t for t in range(1, g + 1) if g % t == 0):
        n_tiles = g // t
        for k in range(1, n_tiles + 1, 2):
            h = k // 2
            centre = (qc // t).clamp(h, n_tiles - 1 - h) if h else qc // t
            ok = (centre - kc // t).abs() <= h
            if causal:
                ok = ok & (kc <= qc)
            if torch.equal(ok, rel):
                return t, k
    return None


def _grid(m: torch.Tensor, n: int, causal: bool, grid: Tuple[int, ...]) -> List[AttentionSpec]:
    i, j = _body_pairs(m, n)
    if i.numel() == 0:
        return []
    c = _coords(grid)
    diff = c[i] - c[j]
    out = [AttentionSpec(window=GridWindow(grid, math.isqrt(int((diff * diff).sum(1).max())) + 1, "circle"),
                         causal=causal, prefix=n),
           AttentionSpec(window=GridWindow(grid, int(diff.abs().max()), "square"), causal=causal, prefix=n)]
    # Sliding tiles are a product over axes: read each axis's rule off the tokens that differ only there.
    body, tiles, kernels = m[n:, n:], [], []
    for a, g in enumerate(grid):
        pos = torch.arange(g) * math.prod(grid[a + 1:])
        found = _tile_axis(body[pos][:, pos], g, causal)
        if found is None:
            return out
        tiles.append(found[0])
        kernels.append(found[1])
    out.append(AttentionSpec(window=GridWindow(grid, shape="tile", tile=tuple(tiles), kernel=tuple(kernels)),
                             causal=causal, prefix=n))
    return out


def _candidates(m: torch.Tensor, grid: Optional[Tuple[int, ...]], prefix: Optional[int]) -> List[AttentionSpec]:
    """Specs worth checking against ``m``, simplest first."""
    L = m.shape[0]
    causal = not bool(m.triu(1).any())
    out = [AttentionSpec(causal=causal)]
    if prefix is not None:
        prefixes = [prefix]
    else:   # a prefix is at most the longest run of global tokens; the window may hide a shorter one
        bound = _prefix_bound(m, causal)
        prefixes = sorted({0, min(bound, L - 1)})
    for n in prefixes:
        out += ([] if grid is None else _grid(m, n, causal, grid)) + _band(m, n, causal) + _terraced(m, n, causal)
    return out


def _grid_argument(grid) -> Tuple[int, ...]:
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or len(grid) not in (2, 3) or \
            any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
        raise ValueError(f"grid must be 2 or 3 positive ints (rows, cols) or (frames, rows, cols), got {grid!r}")
    return tuple(grid)


def from_mask_mod(fn: Callable, L: Optional[int] = None, *, grid: Optional[Sequence[int]] = None,
                  prefix: Optional[int] = None) -> AttentionSpec:
    """The AttentionSpec whose visibility equals FlexAttention ``mask_mod`` ``fn`` on every (q, k) pair.

    1D rules need ``L`` (the length to check on; pick one longer than the window, e.g. 4x). Grid rules
    (circle, square, sliding tiles) need ``grid`` (rows, cols) or (frames, rows, cols): the tokens are
    ``prefix`` global tokens then the grid in row-major order, so ``L = prefix + prod(grid)`` (give ``L``
    or ``prefix``; both must agree). Without ``prefix`` the number of global tokens is read off the mask.
    The spec is a softmax over the window (sinks 0, no linear branch): a mask says nothing more.
    Raises ValueError when no rule matches, naming the closest and where it disagrees.
    """
    if grid is not None:
        grid = _grid_argument(grid)
        if L is None:
            prefix = prefix or 0
            L = prefix + math.prod(grid)
        elif prefix is None:
            prefix = L - math.prod(grid)
        if prefix < 0 or L != prefix + math.prod(grid):
            raise ValueError(f"L={L} must be prefix + prod(grid) = {prefix} + {math.prod(grid)}; "
                             "give L or prefix, not both disagreeing")
    if L is None:
        raise ValueError("from_mask_mod needs L (the length to evaluate the mask on, e.g. 4x the window) or "
                         "grid=(rows, cols) for a 2D rule")
    if isinstance(L, bool) or not isinstance(L, int) or L < 2:
        raise ValueError(f"L must be an int >= 2 (the length to evaluate the mask on), got {L!r}")
    if prefix is not None and (isinstance(prefix, bool) or not isinstance(prefix, int) or not 0 <= prefix < L):
        raise ValueError(f"prefix must be an int in [0, L), got {prefix!r}")
    m = _evaluate(fn, L)
    if not m.diagonal().all():
        q = int((~m.diagonal()).nonzero()[0, 0])
        raise ValueError(f"the mask_mod hides token {q} from itself (q_idx = kv_idx = {q}); every lincomp rule "
                         "lets a query see its own key")
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    best = None
    for spec in _candidates(m, grid, prefix):
        wrong = _rule.mask(spec, i, j) != m
        count = int(wrong.sum())
        if count == 0:
            return spec
        if best is None or count < best[0]:
            best = (count, spec, wrong)
    tried = "dense, causal, 1D bands / sliding windows, terraced blocks, " + (
        f"circles, squares and sliding tiles on grid {list(grid)}" if grid is not None else "(pass grid= for 2D rules)")
    if best is None:
        raise ValueError(f"no lincomp rule matches the mask_mod at L={L} (tried {tried}, each with prefix tokens)")
    count, spec, wrong = best
    pairs = wrong.nonzero()[:_SHOW_PAIRS].tolist()
    shown = ", ".join(f"(q={q}, k={k}): mask_mod {bool(m[q, k])}, rule {not bool(m[q, k])}" for q, k in pairs)
    raise ValueError(f"no lincomp rule matches the mask_mod at L={L} (tried {tried}, each with prefix tokens). "
                     f"Closest: {_rule.describe(spec)} ({spec!r}), which disagrees on {count} of {L * L} pairs, "
                     f"e.g. {shown}")
