"""combine="shared" on 1D windows, inference: the out-of-window linear terms as lagged scans (shared_lag.py, the
``reverse`` scan of linear.py, window.py's ``lagged`` epilogue) against the fp64 reference, on random specs,
shapes and extreme-but-valid values; the cost choice between the lagged form and the full scan minus the
in-window terms, and the retry of a cancelling full-scan call on the lagged form (no reference fallback).
Outputs are NaN-poisoned (tests/tvm/conftest.py)."""

import warnings

import pytest
import torch

pytest.importorskip("tvm")

from hypothesis import given, strategies as st  # noqa: E402

import lincomp  # noqa: E402
from lincomp.lower.tvmir import shared_lag  # noqa: E402
from lincomp.reference import reference  # noqa: E402
from lincomp.runtime.kernel import LincompFallbackWarning  # noqa: E402
from lincomp.spec import AttentionSpec  # noqa: E402
from lincomp.testing import examples, random_inputs, rel_err  # noqa: E402

from tests.tvm.conftest import to_double  # noqa: E402

TOL = 1e-4   # docs/semantics.md: fp32 against the fp64 reference


def _spec(left, right, causal, prefix, fmap, gate=None, normalize=True):
    return AttentionSpec(window={"kind": "1d", "left": left, "right": right}, causal=causal, prefix=prefix,
                         combine="shared", linear={"feature_map": fmap, "feature_dim": 4 if fmap.startswith("hedgehog")
                                                   else None, "gate": gate, "normalize": normalize, "chunk_size": 16})


def _run(spec, x):
    """(o, error vs the fp64 reference, kernel); fails on any fallback warning."""
    kern = lincomp.compile(spec, target="tvm")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LincompFallbackWarning)
        with torch.no_grad():
            o = kern(**x)
    ref = reference(spec, **to_double({n: t for n, t in x.items() if n != "key_padding_mask"}),
                    **({"key_padding_mask": x["key_padding_mask"]} if "key_padding_mask" in x else {}))
    return o, rel_err(o, ref), kern


def _lagged_ran(kern) -> bool:
    """The last call's window kernel merged lagged num / den (it reads no features then)."""
    return "fqT" not in kern.source and "linear_fwd" in kern.source


@pytest.fixture
def always_lag(monkeypatch):
    monkeypatch.setattr(shared_lag, "cheaper", lambda *a: True)


@examples(12)
@given(data=st.data())
def test_random_1d_shared_specs_match_reference(data):
    """Random 1D shared specs (both directions, prefix, gates, every feature map, GQA, padding, states) on
    the lagged form, within 1e-4 of the fp64 reference."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shared_lag, "cheaper", lambda *a: True)
        causal = data.draw(st.booleans(), label="causal")
        fmap = data.draw(st.sampled_from(["hedgehog", "hedgehog_exp", "elu1", "relu"]), label="fmap")
        spec = _spec(data.draw(st.integers(0, 40), label="left"), data.draw(st.integers(0, 40), label="right"),
                     causal, data.draw(st.integers(0, 4), label="prefix"), fmap,
                     data.draw(st.sampled_from([None, "scalar", "vector"]), label="gate") if causal else None,
                     data.draw(st.booleans(), label="normalize"))
        H = data.draw(st.sampled_from([1, 2, 4]), label="H")
        Hkv = data.draw(st.sampled_from([h for h in (1, 2, 4) if H % h == 0]), label="Hkv")
        L = data.draw(st.integers(1, 130), label="L")
        B = data.draw(st.integers(1, 2), label="B")
        x = random_inputs(spec, B=B, H=H, Hkv=Hkv, L=L, D=8, seed=data.draw(st.integers(0, 999), label="seed"),
                          gate_strength=data.draw(st.sampled_from([0.1, 1.0, 8.0]), label="gate_strength"),
                          initial_state=causal and data.draw(st.booleans(), label="state"))
        if data.draw(st.booleans(), label="padding"):
            x["key_padding_mask"] = torch.rand(B, L, generator=torch.Generator().manual_seed(L)) > 0.3
        o, err, kern = _run(spec, x)
        assert err <= TOL, f"{spec.summary()}: {err}"
        assert _lagged_ran(kern)
        assert ("linear_rev" in kern.source) is (not causal)


@pytest.mark.parametrize("tweak", ["tiny_gamma", "steep_gates", "large_features"])
@pytest.mark.parametrize("causal", [True, False])
def test_extreme_values_need_no_fallback(always_lag, tweak, causal):
    """Where the full-scan form cancels (a window_gamma of 1e-8, gates of -30 per token, large exp features),
    the lagged form sums only the terms that count: accurate, no fallback."""
    spec = _spec(5, 0 if causal else 7, causal, 2, "hedgehog_exp", "scalar" if causal else None)
    x = random_inputs(spec, B=2, H=4, Hkv=2, L=97, D=16, seed=3)
    if tweak == "tiny_gamma":
        x["window_gamma"] = torch.full_like(x["window_gamma"], 1e-8)
    elif tweak == "steep_gates" and causal:
        x["g"] = x["g"] * 30
    else:
        x["q"], x["k"] = x["q"] * 4, x["k"] * 4
    o, err, kern = _run(spec, x)
    assert err <= TOL, err
    assert _lagged_ran(kern)


def test_cost_model_picks_the_cheaper_form():
    """Wide windows (the demo's MiniLM shape) take the lagged scans; a narrow non-causal window keeps the full scan
    (one state read per token against two scans); a causal window is never cheaper on the full scan."""
    minilm = _spec(96, 96, False, 1, "hedgehog")
    assert shared_lag.cheaper(minilm, 128, 32, 32, 1024)
    assert not shared_lag.cheaper(_spec(4, 4, False, 0, "hedgehog"), 128, 32, 32, 4096)
    assert all(shared_lag.cheaper(_spec(w, 0, True, 0, "elu1", "scalar"), 64, 64, 64, 4096) for w in (0, 1, 64))


def test_narrow_window_keeps_the_full_scan_and_retries_a_cancelling_call_lagged():
    """A narrow non-causal window runs the full scan minus the in-window terms; with window_gamma 1e-8 that
    cancels, and the call reruns on the lagged form instead of the reference (no warning, accurate)."""
    spec = _spec(2, 2, False, 1, "hedgehog")
    x = random_inputs(spec, B=1, H=2, L=150, D=16, seed=4)
    o, err, kern = _run(spec, x)
    assert err <= TOL and not _lagged_ran(kern)
    x["window_gamma"] = torch.full_like(x["window_gamma"], 1e-8)
    o, err, kern = _run(spec, x)
    assert err <= TOL, err
    assert _lagged_ran(kern)


def test_training_keeps_the_full_scan(always_lag):
    """Inputs that require grad run the saving forward (the full scan whose chunk states the backward reads),
    and its gradient still matches the reference."""
    spec = _spec(20, 20, False, 1, "hedgehog")
    x = random_inputs(spec, B=1, H=2, L=70, D=8, seed=5)
    q = x["q"].clone().requires_grad_(True)
    kern = lincomp.compile(spec, target="tvm")
    o = kern(**dict(x, q=q))
    assert "fqT" in kern.source   # the window kernel formed the in-window terms
    o.square().sum().backward()
    qd = x["q"].double().requires_grad_(True)
    reference(spec, **dict(to_double(x), q=qd)).square().sum().backward()
    assert rel_err(q.grad, qd.grad) <= TOL


@pytest.mark.parametrize("left,right,prefix", [(10 ** 9, 10 ** 9, 1), (3, 10 ** 9, 0), (10 ** 9, 2, 2), (0, 0, 60)])
def test_reaches_past_the_sequence_pair_no_key(always_lag, left, right, prefix):
    """The scans' key shift is the window's reach (clamped inside int32): a reach past the sequence's end, or a
    prefix longer than it, leaves that side's scan with no key, and every output still matches the reference."""
    spec = _spec(left, right, False, prefix, "hedgehog_exp")
    x = random_inputs(spec, B=1, H=2, L=50, D=8, seed=6)
    o, err, kern = _run(spec, x)
    assert err <= TOL, err
    assert _lagged_ran(kern)


def test_scans_read_no_shifted_copy(always_lag, monkeypatch):
    """The lag lives in the generated scan (scan row t pairs with key t - a / t + b, none outside the sequence):
    an ungated call asks for no buffer but phi(q), phi(k), num and den (no shifted copy, no second num / den),
    and the side after the window adds into num / den from the prefix's end on."""
    from contextlib import contextmanager

    from lincomp.lower.tvmir import kernel as tvm_kernel
    from lincomp.runtime.buffers import Scratch
    asked = set()

    class Recording(Scratch):
        @contextmanager
        def lease(self):
            with super().lease() as get:
                yield lambda name, *a, **kw: (asked.add(name), get(name, *a, **kw))[1]

    monkeypatch.setattr(tvm_kernel, "_SCRATCH", Recording())
    spec = _spec(9, 5, False, 2, "hedgehog")
    x = random_inputs(spec, B=1, H=2, L=90, D=8, seed=7)
    o, err, kern = _run(spec, x)
    assert err <= TOL, err
    assert asked == {"fq", "fk", "num", "den"}, asked
    rev = kern.source.split("def linear_rev")[1]
    assert "vc[r, d] = T.if_then_else" in rev and "L - 1 - (c0 + r) + 6" in rev and ">= 2:" in rev
