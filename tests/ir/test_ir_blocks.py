"""Block plans against the dense ground truth (window_mask) on random specs, lengths and tile sizes."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lincomp import AttentionSpec, presets
from lincomp.ir.blocks import block_plan, default_tile
from lincomp.ir.cost import count_visible_pairs, pair_efficiency
from lincomp.reference import window_mask
from lincomp.spec import GridWindow
from lincomp.testing import length_for, spec_strategy


def _tokens(tokens, T, b, L):
    """[T, b] original token per tile slot (-1 = padding), also for the identity order."""
    if tokens is None:
        t = torch.arange(T * b).view(T, b)
        return torch.where(t < L, t, torch.full_like(t, -1))
    return tokens.long()


def _tile_truth(plan, spec, L):
    """(any, all-and-unpadded) [Tq, Tk] from the dense mask, and the token layout."""
    M = window_mask(spec, L)
    qt = _tokens(plan.q_tokens, plan.num_q_tiles, plan.block_m, L)
    kt = _tokens(plan.k_tokens, plan.num_k_tiles, plan.block_n, L)
    qv, kv = qt >= 0, kt >= 0
    sub = M[qt.clamp(min=0)[:, :, None, None], kt.clamp(min=0)[None, None, :, :]]        # [Tq, bm, Tk, bn]
    valid = qv[:, :, None, None] & kv[None, None, :, :]
    any_ = (sub & valid).any(3).any(1)
    all_ = (sub | ~valid).all(3).all(1) & qv.all(1)[:, None] & kv.all(1)[None, :]
    return any_, all_, qt, kt


def _csr_sets(plan):
    kv = set()
    for t in range(plan.num_q_tiles):
        for e in range(int(plan.kv_offsets[t]), int(plan.kv_offsets[t + 1])):
            kv.add((t, int(plan.kv_indices[e]), bool(plan.kv_full[e])))
    qs = set()
    for t in range(plan.num_k_tiles):
        for e in range(int(plan.q_offsets[t]), int(plan.q_offsets[t + 1])):
            qs.add((int(plan.q_indices[e]), t, bool(plan.q_full[e])))
    return kv, qs


def check_plan(spec, L, bm, bn=None, order="tiled", exact=False):
    plan = block_plan(spec, L, bm, bn, order=order)
    any_, all_, qt, kt = _tile_truth(plan, spec, L)
    # Every token exactly once in the tile order (queries and keys).
    for t in (qt, kt):
        v = t[t >= 0]
        assert v.numel() == L and torch.equal(v.sort().values, torch.arange(L))
    listed = plan.dense_tile_mask()
    full = torch.zeros_like(listed)
    rows = torch.repeat_interleave(torch.arange(plan.num_q_tiles), (plan.kv_offsets[1:] - plan.kv_offsets[:-1]).long())
    full[rows, plan.kv_indices.long()] = plan.kv_full
    assert not (any_ & ~listed).any(), "a tile pair with a visible token pair is not listed"
    assert not (full & ~all_).any(), "a tile pair marked full has an invisible pair or padding"
    if exact:
        assert torch.equal(listed, any_), "listed tile pairs must be exactly those with a visible pair"
    # Key tiles ascending per query tile; the transpose CSR holds the same (q, k, full) triples.
    for t in range(plan.num_q_tiles):
        seg = plan.kv_indices[plan.kv_offsets[t]:plan.kv_offsets[t + 1]]
        assert torch.all(seg[1:] > seg[:-1])
    kv, qs = _csr_sets(plan)
    assert kv == qs and len(kv) == plan.nnz
    assert plan.visited_pairs >= count_visible_pairs(spec, L)
    return plan


@st.composite
def _plan_case(draw):
    spec = draw(spec_strategy(linear=False, hybrids=False, sinks=False, max_prefix=9, max_grid=7))
    L = length_for(spec, draw(st.integers(1, 45)))
    if isinstance(spec.window, GridWindow):
        order = draw(st.sampled_from(["tiled", "rowmajor"]))
        bm = draw(st.sampled_from([1, 2, 4, 8, 16]))
        bn = bm if order == "tiled" else draw(st.sampled_from([1, 2, 4, 8, 16]))
    else:
        order = "tiled"
        bm, bn = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    return spec, L, bm, bn, order


@given(_plan_case())
def test_block_plan_matches_mask(case):
    spec, L, bm, bn, order = case
    check_plan(spec, L, bm, bn, order)


@given(spec_strategy(windows=("1d", "2d", "3d"), linear=False, hybrids=False, sinks=False, max_prefix=0),
       st.integers(1, 40), st.sampled_from([2, 4, 8]))
def test_block_plan_exact_without_prefix_or_causality(spec, L, bm):
    # Documented exactness: 1D windows and tiled grids list a tile pair iff some pair in it is visible.
    spec = AttentionSpec(window=spec.window)
    check_plan(spec, length_for(spec, L), bm, exact=True)


@pytest.mark.parametrize("spec,L", [
    (AttentionSpec(window={"kind": "1d", "left": 7, "right": 0}, causal=True, prefix=3), 37),
    (AttentionSpec(window={"kind": "terraced", "block": 3}, causal=True, prefix=2), 37),
    (AttentionSpec(causal=True, prefix=5), 37),
    (AttentionSpec(window={"kind": "3d", "grid": [3, 4, 5], "radius": 2, "shape": "circle"}, prefix=2), 62),
    (AttentionSpec(window={"kind": "2d", "grid": [9, 6], "radius": 3, "shape": "square"}, causal=True), 54),
])
@pytest.mark.parametrize("order", ["tiled", "rowmajor"])
def test_block_plan_fixed_cases(spec, L, order):
    for bm in (4, 8):
        check_plan(spec, L, bm, order=order)


def test_tiled_beats_rowmajor_on_clear():
    # Small grids first: both orders must be correct there.
    small = presets.clear(4, (16, 16), 8)
    for order in ("tiled", "rowmajor"):
        check_plan(small, small.expected_length(), 16, order=order)
    # Rows much longer than a block: a row-major block is a thin strip whose neighbourhood spans 2r rows
    # of blocks, while an 8x8 tile needs its 3x3 tile neighbourhood only (no dense mask at this size).
    spec = presets.clear(8, (128, 128), 0)
    L = spec.expected_length()
    tiled, flex = block_plan(spec, L, 64), block_plan(spec, L, 64, order="rowmajor")
    assert tiled.tile == (8, 8) and flex.tile is None
    eff_t, eff_r = pair_efficiency(spec, L, tiled), pair_efficiency(spec, L, flex)
    assert 0 < eff_r < 1 and eff_t > 3 * eff_r
    assert tiled.visited_pairs < flex.visited_pairs


def test_default_tile_and_errors():
    assert default_tile((64, 64), 128) == (8, 16)
    assert default_tile((64, 64), 64) == (8, 8)
    assert default_tile((16, 32, 32), 128) == (4, 4, 8)   # near-cubic: least halo
    assert default_tile((1, 64), 16) == (1, 16)      # a short axis gives its share away
    with pytest.raises(ValueError, match="power of two"):
        default_tile((8, 8), 48)
    with pytest.raises(ValueError, match="grid"):
        block_plan(presets.clear(8, (8, 8), 4), 70, 16)
    with pytest.raises(ValueError, match="order"):
        block_plan(presets.sliding_window(8), 64, 16, order="zigzag")
