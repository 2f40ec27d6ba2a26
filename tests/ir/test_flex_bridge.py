"""The FlexAttention bridge: ``spec.mask_mod()`` / ``spec.block_mask(L)`` drive ``flex_attention`` to the
reference's output, and ``lincomp.from_mask_mod`` recognises a mask_mod of every rule lincomp has (checked by
the reference's own dense mask, not the IR's), or says which (q, k) pairs disagree with the closest rule."""

import re
import subprocess
import sys

import pytest
import torch

import lincomp
from lincomp import AttentionSpec, GridWindow, TerracedWindow, Window1D, presets
from lincomp.reference.masks import window_mask
from lincomp.testing import rel_err

flex = pytest.importorskip("torch.nn.attention.flex_attention")

# (spec, from_mask_mod keywords): every rule kind, with and without prefix tokens, causal and not.
ROUND_TRIP = [
    (AttentionSpec(), {"L": 24}),
    (AttentionSpec(causal=True), {"L": 24}),
    (presets.sliding_window(5), {"L": 24}),
    (AttentionSpec(window=Window1D(3, 2)), {"L": 24}),
    (AttentionSpec(window=Window1D(3, 2), prefix=3), {"L": 24}),
    (AttentionSpec(window=Window1D(4, 0), causal=True, prefix=2), {"L": 24}),
    (AttentionSpec(window=TerracedWindow(4), causal=True), {"L": 24}),
    (AttentionSpec(window=TerracedWindow(3), causal=True, prefix=2), {"L": 24}),
    (presets.clear(3, (8, 8), 5), {"grid": (8, 8), "prefix": 5}),
    (presets.clear(3, (6, 8), 0, shape="square"), {"grid": (6, 8)}),
    (AttentionSpec(window=GridWindow((6, 6), 2, "circle"), causal=True), {"grid": (6, 6)}),
    (AttentionSpec(window=GridWindow((3, 4, 4), 1, "square")), {"grid": (3, 4, 4)}),
    (presets.sta((4, 8, 8), (2, 4, 4), (1, 1, 1)), {"grid": (4, 8, 8)}),
    (presets.sta((2, 8, 8), (1, 2, 2), (1, 3, 3), text_tokens=3), {"grid": (2, 8, 8), "L": 131}),
    (presets.natten((8, 8), 3), {"grid": (8, 8)}),
]


def _ids(cases):
    return [s.summary() for s, _ in cases]


@pytest.mark.parametrize("spec, kw", ROUND_TRIP, ids=_ids(ROUND_TRIP))
def test_round_trip_spec_mask_mod_spec(spec, kw):
    got = lincomp.from_mask_mod(spec.mask_mod(), **kw)
    L = kw.get("L") or spec.expected_length()
    assert isinstance(got, AttentionSpec) and got.linear is None and got.sinks == 0
    assert torch.equal(window_mask(got, L), window_mask(spec, L)), (spec, got)


def test_hand_written_mask_mods_are_recognised():
    """mask_mods as FlexAttention users write them (not lincomp's printer)."""
    def sliding(b, h, q, k):
        return (q >= k) & (q - k < 16)

    got = lincomp.from_mask_mod(sliding, 64)
    assert got.window == Window1D(15, 0) and got.causal
    assert torch.equal(window_mask(got, 64), window_mask(presets.sliding_window(16), 64))

    text, side = 4, 8   # text tokens global, then a circle of radius 3 on an 8x8 image

    def clear(b, h, q, k):
        qi, ki = q - text, k - text
        dy, dx = qi // side - ki // side, qi % side - ki % side
        return (q < text) | (k < text) | (dy * dy + dx * dx < 9)

    got = lincomp.from_mask_mod(clear, grid=(side, side), prefix=text)
    assert got.window == GridWindow((8, 8), 3, "circle") and got.prefix == text

    got = lincomp.from_mask_mod(lambda b, h, q, k: q >= k, 10)
    assert got == AttentionSpec(causal=True)


def test_prefix_is_read_off_the_mask():
    spec = AttentionSpec(window=Window1D(2, 1), prefix=4)
    got = lincomp.from_mask_mod(spec.mask_mod(), 32)
    assert got.prefix == 4 and got.window == Window1D(2, 1)


@pytest.mark.parametrize("fn, kw, words", [
    (lambda b, h, q, k: (q - k) % 3 == 0, {"L": 20}, ["no lincomp rule matches", "Closest", "disagrees on",
                                                       "(q=0, k=1): mask_mod False, rule True"]),
    (lambda b, h, q, k: (q - k).abs() <= 2, {"grid": (4, 4)}, None),   # a band: found with a grid too
    (lambda b, h, q, k: (q // 4 == k // 4), {"L": 16}, ["Closest", "pass grid= for 2D rules"]),
    (lambda b, h, q, k: q > k, {"L": 8}, ["hides token 0 from itself"]),
    (lambda b, h, q, k: (q - k).abs() <= h, {"L": 8}, ["differs between batch/head"]),
    (lambda b, h, q, k: q.float(), {"L": 8}, ["not torch.bool"]),
])
def test_unsupported_mask_mod_says_what_failed(fn, kw, words):
    if words is None:
        assert lincomp.from_mask_mod(fn, **kw).window == Window1D(2, 2)
        return
    with pytest.raises((ValueError, TypeError)) as e:
        lincomp.from_mask_mod(fn, **kw)
    for w in words:
        assert w in str(e.value), str(e.value)


@pytest.mark.parametrize("kw, words", [
    ({}, "needs L"), ({"L": 1}, "L must be an int >= 2"), ({"grid": (4,), "L": 4}, "grid must be 2 or 3"),
    ({"grid": (4, 4), "L": 20, "prefix": 3}, "must be prefix + prod(grid)"),
])
def test_bad_arguments(kw, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        lincomp.from_mask_mod(lambda b, h, q, k: q >= k, **kw)


def test_closest_rule_lists_the_disagreeing_pairs():
    """A sliding window with one extra hole: the error names the window and the hidden pair."""
    def holed(b, h, q, k):
        return (q >= k) & (q - k < 6) & ~((q == 10) & (k == 7))

    with pytest.raises(ValueError) as e:
        lincomp.from_mask_mod(holed, 32)
    msg = str(e.value)
    assert "Window1D(left=5, right=0)" in msg and "disagrees on 1 of 1024 pairs" in msg
    assert "(q=10, k=7): mask_mod False, rule True" in msg


@pytest.mark.parametrize("spec", [presets.lizard(8), presets.sliding_window(8, sinks=2), presets.clear_pool(2, 2, (4, 4), 0)],
                         ids=["linear", "sinks", "pool"])
def test_specs_a_mask_cannot_express_raise(spec):
    with pytest.raises(ValueError, match="has no FlexAttention mask_mod"):
        spec.mask_mod()
    with pytest.raises(ValueError, match="has no FlexAttention mask_mod"):
        spec.block_mask(16)


@pytest.mark.filterwarnings("ignore::UserWarning")   # flex_attention's "called without torch.compile"
@pytest.mark.parametrize("spec", [presets.clear_pool(2, 2, (4, 4), 3), presets.clear_pool(1, 4, (8, 4), 0)],
                         ids=["prefix", "no-prefix"])
def test_pooled_mask_mod_over_concatenated_keys_is_the_reference(spec):
    """FlexAttention with pooled_mask_mod over [k; pooled k] gives the reference's pooled output."""
    from lincomp.ir.flex import pooled_mask_mod
    from lincomp.runtime.pool import pooled_kv
    from lincomp.testing import random_inputs
    x = random_inputs(spec, B=2, H=2, D=16, seed=3)
    kp, vp = pooled_kv(spec, x["k"], x["v"], x["pool_weight"])
    L, P = spec.expected_length(), kp.shape[2]
    bm = flex.create_block_mask(pooled_mask_mod(spec), None, None, L, L + P, device="cpu", BLOCK_SIZE=16)
    out = flex.flex_attention(x["q"], torch.cat([x["k"], kp], 2), torch.cat([x["v"], vp], 2), block_mask=bm)
    ref = lincomp.reference(spec, **{n: t.double() for n, t in x.items()})
    assert rel_err(out, ref) <= 1e-4
    with pytest.raises(ValueError, match="needs a spec with window.pool"):
        pooled_mask_mod(presets.clear(2, (4, 4), 3))


def test_block_mask_length_checks():
    with pytest.raises(ValueError, match="needs L"):
        presets.sliding_window(4).block_mask()
    with pytest.raises(ValueError, match="fixes L"):
        presets.clear(2, (4, 4), 2).block_mask(20)


def _flex_vs_reference(spec, L, run):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, L, 16) for _ in range(3))
    out = run(q, k, v, block_mask=spec.block_mask(L, BLOCK_SIZE=16))
    ref = lincomp.reference(spec, q.double(), k.double(), v.double())
    assert rel_err(out, ref) <= 1e-4, spec


FLEX_SPECS = [presets.sliding_window(7), AttentionSpec(window=Window1D(3, 5), prefix=2),
              AttentionSpec(window=TerracedWindow(8), causal=True), presets.clear(2, (6, 6), 4),
              presets.sta((2, 8, 8), (1, 4, 4), (1, 1, 1))]


@pytest.mark.filterwarnings("ignore::UserWarning")   # flex_attention's "called without torch.compile"
@pytest.mark.parametrize("spec", FLEX_SPECS, ids=[s.summary() for s in FLEX_SPECS])
def test_spec_mask_mod_drives_flex_attention_to_the_reference(spec):
    _flex_vs_reference(spec, spec.expected_length() or 48, flex.flex_attention)


@pytest.mark.slow
def test_compiled_flex_attention_matches_the_reference():
    """The compiled path (what makes FlexAttention fast; about a minute to compile on the 2-core CPU)."""
    compiled = torch.compile(flex.flex_attention, dynamic=False)
    spec = presets.clear(2, (6, 6), 4)
    _flex_vs_reference(spec, spec.expected_length(), compiled)


def test_import_lincomp_does_not_load_flex_attention():
    code = ("import sys, lincomp; s = lincomp.presets.sliding_window(4); s.key(); "
            "assert 'torch.nn.attention.flex_attention' not in sys.modules; "
            "assert 'lincomp.ir.flex' not in sys.modules; fn = s.mask_mod(); "
            "assert 'lincomp.ir.flex' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
