"""Hypothesis: random valid specs (every window kind, prefix, sinks, linear maps, gates, both hybrids),
random sizes (GQA, odd lengths), the TVM kernel against the fp64 reference; and invariants."""

import pytest
import torch

pytest.importorskip("tvm")

from hypothesis import given, settings, strategies as st  # noqa: E402

import lincomp  # noqa: E402
from lincomp.testing import random_inputs, rel_err, spec_strategy  # noqa: E402


@given(spec=spec_strategy(), data=st.data())
def test_random_specs_match_reference(check, spec, data):
    H = data.draw(st.sampled_from([1, 2, 4]), label="H")
    Hkv = data.draw(st.sampled_from([h for h in (1, 2, 4) if H % h == 0]), label="Hkv")
    L = data.draw(st.integers(1, 70), label="L")
    D = data.draw(st.sampled_from([8, 16]), label="D")
    B = data.draw(st.integers(1, 2), label="B")
    lin = spec.linear
    state = lin is not None and spec.causal and spec.combine != "shared"
    check(spec, B=B, H=H, Hkv=Hkv, L=L, D=D, seed=data.draw(st.integers(0, 999), label="seed"),
            initial_state=state and data.draw(st.booleans(), label="S0"),
            return_state=state and data.draw(st.booleans(), label="return_state"),
            feature_dim=4 if (lin is not None and lin.has_weights) else None)


@settings(max_examples=5)
@given(spec=spec_strategy(windows=("1d", "terraced", None)), L=st.integers(2, 90), cut=st.integers(1, 89))
def test_batch_invariance_and_prefix_causality(spec, L, cut):
    """Each batch row is independent; a causal output at i does not change when later tokens change."""
    x = random_inputs(spec, B=2, H=2, L=L, D=8, seed=L, feature_dim=4)
    kern = lincomp.compile(spec, target="tvm")
    with torch.no_grad():
        both = kern(**x)
        one = kern(**{k: (v[:1] if k in ("q", "k", "v", "g") else v) for k, v in x.items()
                      if k != "initial_state"} | ({"initial_state": tuple(t[:1] for t in x["initial_state"])}
                                                   if "initial_state" in x else {}))
    assert rel_err(both[:1], one) <= 1e-6
    if spec.causal and cut < L:
        y = {k: v.clone() if torch.is_tensor(v) else v for k, v in x.items()}
        for name in ("q", "k", "v"):
            y[name][:, :, cut:] = torch.randn_like(y[name][:, :, cut:])
        with torch.no_grad():
            changed = kern(**y)
        assert rel_err(changed[:, :, :cut], both[:, :, :cut]) <= 1e-6
