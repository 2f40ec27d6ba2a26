"""Exact pair counts against the dense mask; FLOP / byte estimates; CLEAR's 99.5% at 8K."""

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lincomp import AttentionSpec, presets
from lincomp.ir import cost
from lincomp.ir.blocks import _block_plan
from lincomp.ir.passes import lower_to_plan
from lincomp.reference import window_mask
from lincomp.testing import length_for, spec_strategy


@given(spec_strategy(linear=False, hybrids=False, max_prefix=7, max_grid=7), st.integers(1, 40))
def test_count_visible_pairs_equals_mask(spec, L):
    L = length_for(spec, L)
    n = int(window_mask(spec, L).sum())
    assert cost.count_visible_pairs(spec, L) == n
    # window_covers (closed forms) is exactly "every allowed pair is visible".
    assert cost.window_covers(spec, L) == (n == cost.allowed_pairs(spec, L))


@pytest.mark.parametrize("spec,L", [
    (AttentionSpec(window={"kind": "3d", "grid": [3, 5, 6], "radius": 3, "shape": "circle"}, causal=True, prefix=2), 92),
    (AttentionSpec(window={"kind": "3d", "grid": [4, 3, 5], "radius": 1, "shape": "square"}, prefix=3), 63),
    (AttentionSpec(window={"kind": "2d", "grid": [7, 9], "radius": 20, "shape": "circle"}, causal=True), 63),
    (AttentionSpec(window={"kind": "1d", "left": 3, "right": 5}, prefix=80), 50),     # prefix longer than L
    (AttentionSpec(window={"kind": "terraced", "block": 5}, prefix=4), 61),
    (AttentionSpec(causal=True, prefix=3), 20),
    (presets.clear(8, (24, 20), 6), 486),
])
def test_count_visible_pairs_fixed(spec, L):
    assert cost.count_visible_pairs(spec, L) == int(window_mask(spec, L).sum())


def test_count_visible_pairs_is_fast_and_closed_form():
    # L = 2^20 sliding window and a 512x512 grid: no L x L work.
    t = time.perf_counter()
    swa = cost.count_visible_pairs(presets.sliding_window(128), 1 << 20)
    assert swa == 128 * (1 << 20) - 127 * 128 // 2
    grid = cost.count_visible_pairs(presets.clear(8, (512, 512), 0), 512 * 512)
    assert time.perf_counter() - t < 0.5
    # Away from the borders each token sees the 197 offsets with dy^2 + dx^2 < 64.
    assert grid < 197 * 512 * 512 and grid > 197 * 498 * 498


def test_flops_and_bytes_window():
    spec = presets.clear(8, (16, 16), 8)
    L = spec.expected_length()
    pairs = cost.count_visible_pairs(spec, L)
    assert cost.attention_flops(spec, L, B=2, H=3, D=32, Dv=16) == 2 * 3 * 2 * (32 + 16) * pairs
    assert cost.dense_flops(spec, L, B=2, H=3, D=32, Dv=16) == 2 * 3 * 2 * (32 + 16) * L * L
    causal = presets.sliding_window(16)
    assert cost.dense_flops(causal, 100, D=8) == 2 * 16 * 100 * 101 // 2
    # q, k, v read once and o written once, like dense attention; extras add their own bytes.
    assert cost.bytes_moved(spec, L, B=2, H=3, D=32) == cost.dense_bytes(L, B=2, H=3, D=32) == 2 * 4 * 2 * 3 * L * 32
    liz = presets.lizard(window=16, sinks=4, feature_dim=8)
    extra = 2 * (1 * 2 * 50 + 2 * 2 * 32 * 8 + 2 * 4 + 2)      # g, two weights, sinks, alpha (2 bytes each)
    assert cost.bytes_moved(liz, 50, H=2, D=32) == cost.dense_bytes(50, H=2, D=32) + extra
    assert cost.bytes_moved(liz, 50, H=2, D=32, return_state=True) > cost.bytes_moved(liz, 50, H=2, D=32)


def test_linear_flops_by_algorithm():
    F, Dv, C = 8, 4, 16
    # chunked, 3 chunks of 16 + 1 of 5: intra per chunk, state read from the second chunk, update until the last.
    sizes = [16, 16, 16, 5]
    want = sum(2 * c * c * (F + Dv) for c in sizes) + 2 * F * Dv * (sum(sizes[1:]) + sum(sizes[:-1]))
    assert cost.linear_flops(53, F, Dv, "chunked", C) == want
    assert cost.linear_flops(53, F, Dv, "noncausal", C) == 4 * 53 * F * Dv
    assert cost.linear_flops(1, F, Dv, "recurrent", C) == 4 * F * Dv
    assert cost.linear_flops(10, F, Dv, "quadratic", C) == 2 * 100 * (F + Dv)
    assert cost.linear_flops(10, F, Dv, "quadratic", C, normalize=True) == 2 * 100 * (F + Dv + 1)
    assert cost.default_linear_algorithm(True, 1, 64) == "recurrent"
    assert cost.default_linear_algorithm(True, 64, 64) == "quadratic"
    assert cost.default_linear_algorithm(True, 65, 64) == "chunked"
    assert cost.default_linear_algorithm(False, 4096, 64) == "noncausal"
    with pytest.raises(ValueError, match="algorithm"):
        cost.linear_flops(8, F, Dv, "scan", C)
    # Hybrids: the breakdown names every part; the total is their sum.
    est = cost.estimate(presets.lizard(), 4096, H=2, D=64)
    assert set(est.breakdown) == {"window", "linear", "feature_maps"}
    assert est.flops == sum(est.breakdown.values())


def test_pair_efficiency():
    spec = presets.sliding_window(64)
    plan = lower_to_plan(spec, 1000, block=32)
    eff = cost.pair_efficiency(spec, 1000, plan.block_plan)
    assert eff == pytest.approx(cost.count_visible_pairs(spec, 1000) / plan.block_plan.visited_pairs)
    assert 0.5 < eff <= 1
    dense = AttentionSpec(causal=True)
    assert cost.dense_tile_pairs(100, 32, 32, True) == 1 + 2 + 3 + 4
    assert cost.dense_pair_efficiency(dense, 128, 32, 32) == pytest.approx((128 * 129 / 2) / (10 * 32 * 32))


def test_clear_8k_saves_99_5_percent_quickly():
    # FLUX at 8192^2 px: a 512x512 latent grid + 512 text tokens; CLEAR r=8 claims 99.5% fewer FLOPs.
    spec = presets.clear(8, (512, 512), 512)
    L = spec.expected_length()
    assert L == 262656
    _block_plan.cache_clear()
    t = time.perf_counter()
    plan = lower_to_plan(spec, L, H=24, D=128)
    elapsed = time.perf_counter() - t
    saved = 100 * plan.cost.flops_saved
    assert 99.4 <= saved <= 99.6, saved
    assert round(saved, 2) == 99.54
    assert plan.window_algorithm == "block_sparse" and plan.block_plan.tile == (8, 8)
    assert elapsed < 1.0, f"planning CLEAR at 8K took {elapsed:.2f} s"
