"""The reference oracle against independent facts, and its three forms against each other.

Everything here runs in fp64 so that a disagreement is a bug, not rounding.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import lincomp
from lincomp import AttentionSpec, presets
from lincomp.reference import FORMS, ReferenceDecoder, window_mask
from lincomp.testing import random_inputs, rel_err, spec_strategy

f64 = torch.float64


def _inputs(spec, L=11, seed=0, **kw):
    kw.setdefault("H", 4)
    kw.setdefault("Hkv", 2)
    kw.setdefault("D", 6)
    kw.setdefault("B", 2)
    return random_inputs(spec, L=L, dtype=f64, seed=seed, **kw)


def _causal_linear_specs():
    return spec_strategy(windows=("1d", "terraced", None)).filter(
        lambda s: s.linear is not None and s.causal)


@given(_causal_linear_specs(), st.integers(1, 19), st.integers(0, 10 ** 6), st.booleans())
def test_forms_agree(spec, L, seed, with_state):
    """quadratic == chunked == recurrent for any chunk size, with and without an initial state."""
    inputs = _inputs(spec, L, seed, initial_state=with_state)
    ret = spec.combine != "shared"
    outs = {f: lincomp.reference(spec, form=f, return_state=ret, **inputs) for f in FORMS}
    base = outs["quadratic"]
    for form, out in outs.items():
        if ret:
            assert rel_err(out[0], base[0]) < 1e-10, form
            assert rel_err(out[1][0], base[1][0]) < 1e-10, form
            assert rel_err(out[1][1], base[1][1]) < 1e-10, form
        else:
            assert rel_err(out, base) < 1e-10, form


@given(st.integers(1, 20), st.booleans(), st.integers(0, 3), st.sampled_from(["1d", "terraced", "2d"]))
def test_covering_window_is_sdpa(L, causal, prefix, kind):
    """A window that covers the whole sequence is plain (causal) softmax attention, GQA included."""
    if kind == "1d":
        window = {"kind": "1d", "left": L, "right": L}
    elif kind == "terraced":
        causal, window = True, {"kind": "terraced", "block": L}
    else:
        L = prefix + 12
        window = {"kind": "2d", "grid": [3, 4], "radius": 10, "shape": "circle"}
    spec = AttentionSpec.from_dict({"window": window, "causal": causal, "prefix": prefix})
    x = _inputs(spec, L)
    rep = x["q"].shape[1] // x["k"].shape[1]
    want = F.scaled_dot_product_attention(x["q"], x["k"].repeat_interleave(rep, 1),
                                          x["v"].repeat_interleave(rep, 1), is_causal=causal)
    assert rel_err(lincomp.reference(spec, **x), want) < 1e-12


def test_window_rules_by_hand():
    m = window_mask(AttentionSpec(window={"kind": "1d", "left": 1, "right": 0}, causal=True), 4)
    assert m.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    m = window_mask(AttentionSpec(window={"kind": "terraced", "block": 2}), 6)
    assert m[5].tolist() == [0, 0, 1, 1, 1, 1] and m[4].tolist() == [0, 0, 1, 1, 1, 0]
    assert m[1].tolist() == [1, 1, 0, 0, 0, 0]
    # prefix 1 + 3x3 grid, circle r=2: the centre (1,1) sees |dy|,|dx| <= 1 with dy^2+dx^2 < 4 -> all 9
    spec = AttentionSpec(window={"kind": "2d", "grid": [3, 3], "radius": 2, "shape": "circle"}, prefix=1)
    m = window_mask(spec, 10)
    assert m[0].all() and m[:, 0].all() and m[1 + 4, 1:].all()
    # corner (0,0) sees (0,0),(0,1),(1,0),(1,1) (1+1 < 4) but not (0,2) (4 < 4 is false)
    assert m[1, 1:].tolist() == [1, 1, 0, 1, 1, 0, 0, 0, 0]
    sq = AttentionSpec(window={"kind": "2d", "grid": [3, 3], "radius": 1, "shape": "square"})
    assert window_mask(sq, 9)[0].tolist() == [1, 1, 0, 1, 1, 0, 0, 0, 0]
    cube = AttentionSpec(window={"kind": "3d", "grid": [2, 2, 2], "radius": 1, "shape": "circle"})
    assert window_mask(cube, 8).sum(1).tolist() == [1] * 8  # r=1 circle: only itself


@given(spec_strategy(linear=False, hybrids=False), st.integers(1, 16), st.integers(0, 10 ** 6))
def test_very_negative_sinks_change_nothing(spec, L, seed):
    spec = AttentionSpec.from_dict({**spec.to_dict(), "sinks": 3})
    x = _inputs(spec, L, seed)
    base = lincomp.reference(AttentionSpec.from_dict({**spec.to_dict(), "sinks": 0}),
                             **{k: v for k, v in x.items() if k != "sink_logits"})
    x["sink_logits"] = torch.full_like(x["sink_logits"], -1e4)
    assert rel_err(lincomp.reference(spec, **x), base) < 1e-12


def test_sinks_enter_the_denominator_only():
    """One visible key and one sink with logit t: o = v * e^s / (e^s + e^t)."""
    spec = AttentionSpec(window={"kind": "1d", "left": 0, "right": 0}, sinks=1)
    q = torch.randn(1, 1, 3, 4, dtype=f64)
    k, v = torch.randn_like(q), torch.randn_like(q)
    t = torch.tensor([[0.3]], dtype=f64)
    o = lincomp.reference(spec, q, k, v, sink_logits=t)
    s = (q * k).sum(-1) / 2
    want = v * (s.exp() / (s.exp() + math.exp(0.3)))[..., None]
    assert rel_err(o, want) < 1e-13


def _decodable():
    return spec_strategy(windows=("1d", "terraced", "2d", None), max_prefix=3).filter(lambda s: s.causal)


@given(_decodable(), st.integers(1, 14), st.integers(0, 10 ** 6))
def test_decode_equals_whole_sequence(spec, L, seed):
    x = _inputs(spec, L, seed, B=1, H=2, Hkv=1)
    L = x["q"].shape[2]
    full = lincomp.reference(spec, **x)
    weights = {k: v for k, v in x.items() if k not in ("q", "k", "v", "g")}
    dec = ReferenceDecoder(spec, compute_dtype=f64, **weights)
    outs = []
    for t in range(L):
        g = x.get("g")
        outs.append(dec.step(x["q"][:, :, t:t + 1], x["k"][:, :, t:t + 1], x["v"][:, :, t:t + 1],
                             None if g is None else g[:, :, t:t + 1]))
        if spec.window is not None:  # constant memory: prefix + reach + the current token
            assert dec.cache_len <= spec.prefix + spec.window.reach(True) + 1
    assert rel_err(torch.cat(outs, 2), full) < 1e-10


@given(_causal_linear_specs().filter(lambda s: s.combine != "shared"), st.integers(2, 16), st.integers(0, 10 ** 6))
def test_state_carried_across_two_calls(spec, L, seed):
    """The linear branch of two segments with the state carried == one call (pure linear specs)."""
    if spec.window is not None:
        spec = AttentionSpec(causal=True, linear=spec.linear)
    x = _inputs(spec, L, seed)
    o, (S, z) = lincomp.reference(spec, return_state=True, **x)
    cut = L // 2
    first = {k: (v[:, :, :cut] if k in ("q", "k", "v", "g") else v) for k, v in x.items()}
    second = {k: (v[:, :, cut:] if k in ("q", "k", "v", "g") else v) for k, v in x.items()}
    o1, st1 = lincomp.reference(spec, return_state=True, **first)
    o2, (S2, z2) = lincomp.reference(spec, return_state=True, initial_state=st1, **second)
    assert rel_err(torch.cat([o1, o2], 2), o) < 1e-10
    assert rel_err(S2, S) < 1e-10 and rel_err(z2, z) < 1e-10


@given(spec_strategy(), st.integers(1, 12), st.integers(0, 10 ** 6))
def test_batch_and_head_invariance(spec, L, seed):
    x = _inputs(spec, L, seed, H=2, Hkv=2)
    o = lincomp.reference(spec, **x)
    # batch: each element alone gives the same rows
    per_item = {k: (v[1:2] if k in ("q", "k", "v", "g") else v) for k, v in x.items()}
    assert rel_err(lincomp.reference(spec, **per_item), o[1:2]) < 1e-12
    # heads: swapping heads (and every per-head parameter) swaps the outputs
    perm = torch.tensor([1, 0])
    head_dim = {"q": 1, "k": 1, "v": 1, "g": 1, "feature_weight_q": 0, "feature_weight_k": 0,
                "sink_logits": 0, "window_gamma": 0, "alpha": 0}
    swapped = {k: (v.index_select(head_dim[k], perm) if k in head_dim else v) for k, v in x.items()}
    assert rel_err(lincomp.reference(spec, **swapped), o.index_select(1, perm)) < 1e-12


def test_noncausal_linear_by_hand():
    spec = AttentionSpec(linear={"feature_map": "relu", "normalize": True})
    q, k, v = (torch.randn(1, 1, 5, 3, dtype=f64) for _ in range(3))
    fq, fk = q.relu(), k.relu()
    A = fq @ fk.transpose(-1, -2)
    want = (A @ v) / A.sum(-1, keepdim=True)
    want = torch.where(A.sum(-1, keepdim=True) == 0, torch.zeros_like(want), want)
    assert rel_err(lincomp.reference(spec, q, k, v), want) < 1e-13
    ident = AttentionSpec(linear={"feature_map": "identity"})
    assert rel_err(lincomp.reference(ident, q, k, v), 3 ** -0.5 * (q @ k.transpose(-1, -2)) @ v) < 1e-13


def test_gated_recurrence_by_hand():
    """Scalar gate, identity map, two tokens: o_2 = scale * q_2 (a_2 k_1^T v_1 + k_2^T v_2)."""
    spec = presets.gla("scalar")
    q, k, v = (torch.randn(1, 1, 2, 4, dtype=f64) for _ in range(3))
    g = torch.tensor([[[-0.5, -0.25]]], dtype=f64)
    o = lincomp.reference(spec, q, k, v, g=g)
    S2 = math.exp(-0.25) * k[0, 0, 0, :, None] * v[0, 0, 0] + k[0, 0, 1, :, None] * v[0, 0, 1]
    assert rel_err(o[0, 0, 1], 0.5 * q[0, 0, 1] @ S2) < 1e-13


def test_shared_combine_by_hand():
    """LoLCATs with a 1-key window: keys outside the window enter linearly, one normaliser."""
    spec = AttentionSpec(window={"kind": "1d", "left": 0, "right": 0}, causal=True,
                         linear={"feature_map": "relu", "normalize": True}, combine="shared")
    q, k, v = (torch.randn(1, 1, 3, 2, dtype=f64) for _ in range(3))
    gamma = torch.tensor([0.4], dtype=f64)
    o = lincomp.reference(spec, q, k, v, window_gamma=gamma)
    i = 2
    a = [(q[0, 0, i].relu() @ k[0, 0, j].relu()) for j in range(2)]
    num = gamma * v[0, 0, i] + a[0] * v[0, 0, 0] + a[1] * v[0, 0, 1]  # exp(s_ii - m_i) = 1
    den = gamma + a[0] + a[1]
    assert rel_err(o[0, 0, i], num / den) < 1e-13


def test_empty_rows_give_zero_not_nan():
    spec = AttentionSpec(window={"kind": "1d", "left": 1, "right": 0}, causal=True)
    x = _inputs(spec, 6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :3] = False   # rows 0..2 of batch 0 see nothing (their visible keys are all padded)
    o = lincomp.reference(spec, key_padding_mask=mask, **x)
    assert torch.isfinite(o).all() and o[0, :, :2].abs().max() == 0


@pytest.mark.parametrize("spec", [presets.sliding_window(3, sinks=2), presets.lizard(4, 2, 3),
                                  presets.lolcats(3, 3), presets.gla("vector"),
                                  presets.clear(2, (3, 3), 2), AttentionSpec(linear={"feature_map": "elu1"})],
                         ids=lambda s: s.summary())
def test_gradients_gradcheck(spec):
    """Autograd through the oracle is correct (it is the gradient oracle for every kernel)."""
    x = _inputs(spec, 7, B=1, H=2, Hkv=1, D=3)
    names = [n for n, t in x.items() if isinstance(t, torch.Tensor) and n != "g"]
    # g near 0 keeps gradcheck's finite differences from pushing gates above 0
    tensors = [x[n].clone().requires_grad_(True) for n in names]

    def f(*ts):
        return lincomp.reference(spec, **{**x, **dict(zip(names, ts))})

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-6)


BAD_CALLS = [
    (lambda x: {**x, "q": x["q"][0]}, ValueError, "q must be [B, H, L, D]"),
    (lambda x: {**x, "k": x["k"].float()}, TypeError, "dtype"),
    (lambda x: {**x, "k": x["k"][:, :, :-1], "v": x["v"][:, :, :-1]}, ValueError, "L="),
    (lambda x: {**x, "k": x["k"][:, :1].repeat(1, 3, 1, 1), "v": x["v"][:, :1].repeat(1, 3, 1, 1)}, ValueError, "divide"),
    (lambda x: {**x, "g": x["g"].abs()}, ValueError, "g "),
    (lambda x: {**x, "g": x["g"] * float("nan")}, ValueError, "NaN"),
    (lambda x: {**x, "g": x["g"][..., :-1]}, ValueError, "g has shape"),
    (lambda x: {k: v for k, v in x.items() if k != "sink_logits"}, ValueError, "sink_logits is required"),
    (lambda x: {**x, "sink_logits": x["sink_logits"][:, :1]}, ValueError, "sink_logits"),
    (lambda x: {**x, "alpha": x["alpha"][:1]}, ValueError, "alpha"),
    (lambda x: {**x, "window_gamma": x["alpha"]}, ValueError, "window_gamma was given"),
    (lambda x: {**x, "feature_weight_q": x["feature_weight_q"][:, :-1]}, ValueError, "feature_weight_q"),
    (lambda x: {**x, "gg": x["g"]}, TypeError, "unexpected keyword 'gg'"),
    (lambda x: {**x, "initial_state": torch.zeros(1)}, ValueError, "initial_state"),
]


@pytest.mark.parametrize("mutate, exc, text", BAD_CALLS)
def test_bad_calls_name_the_field(mutate, exc, text):
    spec = presets.lizard(4, 2, 3)
    x = _inputs(spec, 8)
    with pytest.raises(exc) as info:
        lincomp.reference(spec, **mutate(x))
    assert text in str(info.value)


def test_grid_length_mismatch_names_the_fix():
    spec = presets.clear(2, (4, 4), 3)
    x = random_inputs(spec, dtype=f64)
    with pytest.raises(ValueError, match="does not match window.grid"):
        lincomp.reference(spec, x["q"][:, :, :-1], x["k"][:, :, :-1], x["v"][:, :, :-1])


def test_return_state_needs_a_linear_branch():
    spec = presets.sliding_window(4)
    x = _inputs(spec, 5)
    with pytest.raises(ValueError, match="return_state"):
        lincomp.reference(spec, return_state=True, **x)


def test_low_precision_inputs_accumulate_in_fp32():
    spec = presets.lizard(4, 2, 3)
    x = random_inputs(spec, L=9, dtype=torch.float16)
    o = lincomp.reference(spec, **x)
    assert o.dtype == torch.float16
    ref = lincomp.reference(spec, **{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in x.items()})
    assert rel_err(o, ref) < 1e-2
