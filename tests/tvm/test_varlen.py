"""Packed sequences (``cu_seqlens``) on the TVM kernels: random specs and random document boundaries
against the fp64 reference, per-document initial / final states, grid documents."""

import pytest
import torch

pytest.importorskip("tvm")

from hypothesis import given, strategies as st  # noqa: E402

import lincomp  # noqa: E402
from lincomp import presets  # noqa: E402
from lincomp.testing import check_varlen_decoder, examples, packed_inputs, rel_err, spec_strategy  # noqa: E402

# Documents of length 1, ending on a chunk border (4, 8, 16), one document, many.
lengths_strategy = st.lists(st.sampled_from([1, 2, 3, 4, 5, 8, 9, 16, 23]), min_size=1, max_size=6)


def check_packed(spec, lengths, *, seed=0, H=2, Hkv=None, D=8, state=False, tol=1e-4):
    """Run the TVM kernel on a packed row; assert rel err <= tol against the fp64 reference."""
    x = packed_inputs(spec, lengths, seed=seed, H=H, Hkv=Hkv, D=D, feature_dim=4, initial_state=state)
    with torch.no_grad():
        out = lincomp.compile(spec, target="tvm")(**x, return_state=state)
    x64 = {k: (tuple(t.double() for t in v) if isinstance(v, tuple) else
               v.double() if v.is_floating_point() else v) for k, v in x.items()}
    ref = lincomp.reference(spec, **x64, return_state=state)
    pairs = zip((out[0], *out[1]), (ref[0], *ref[1])) if state else [(out, ref)]
    errs = [rel_err(a, b) for a, b in pairs]
    assert max(errs) <= tol, f"{spec.summary()} lengths {lengths}: rel err {errs}"


@examples(12)
@given(spec=spec_strategy(windows=("1d", "terraced", None)), lengths=lengths_strategy, data=st.data())
def test_random_specs_on_packed_rows(spec, lengths, data):
    state = spec.linear is not None and spec.causal and spec.combine != "shared"
    H = data.draw(st.sampled_from([1, 2]), label="H")
    check_packed(spec, lengths, seed=data.draw(st.integers(0, 99), label="seed"), H=H,
                 state=state and data.draw(st.booleans(), label="state"))


@pytest.mark.parametrize("spec", [presets.sliding_window(4), presets.gla("vector", chunk_size=4),
                                  presets.gla("scalar", chunk_size=8),
                                  presets.lizard(window=4, sinks=2, feature_dim=4, chunk_size=4),
                                  presets.lolcats(block=4, feature_dim=4, chunk_size=4),
                                  presets.lolcats(block=4, feature_dim=4, terraced=False, chunk_size=4)],
                         ids=lambda s: s.name)
def test_families_with_states_and_gqa(spec):
    state = spec.linear is not None and spec.combine != "shared"
    check_packed(spec, [1, 4, 8, 7, 4, 16, 1], H=4, Hkv=2, state=state, seed=3)


@pytest.mark.parametrize("shape, prefix", [("circle", 0), ("square", 2)])
def test_grid_documents(shape, prefix):
    spec = lincomp.AttentionSpec(window=lincomp.GridWindow((3, 4), 2, shape), prefix=prefix)
    check_packed(spec, [0, 0, 0], seed=5)   # three images of prefix + 3*4 tokens each


def test_no_copy_warning_for_packed_views(recwarn):
    """Cutting the row into documents gives the kernel contiguous, aligned tensors: no copy warning."""
    spec = presets.gla("vector", chunk_size=4)
    x = packed_inputs(spec, [3, 5, 3], H=2)
    with torch.no_grad():
        lincomp.compile(spec, target="tvm")(**x)
    assert not [w for w in recwarn if "copying" in str(w.message)]


@pytest.mark.parametrize("spec", [presets.sliding_window(3, sinks=1), presets.gla("vector", 4),
                                  presets.lizard(window=3, sinks=2, feature_dim=4, chunk_size=4),
                                  presets.lolcats(block=3, feature_dim=4, chunk_size=4)], ids=lambda s: s.name)
def test_decoders_serve_sequences_of_different_lengths(spec):
    from lincomp.lower.tvm import TVMDecoder
    check_varlen_decoder(TVMDecoder, spec)


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_gated_linear_one_call_path_with_strong_gates(gate):
    """GLA without states: one call with the gate shut at document starts, also under strong gates."""
    spec = presets.gla(gate, chunk_size=8)
    for strength in (0.1, 8.0):
        x = packed_inputs(spec, [8, 1, 5, 16, 11, 7], H=2, D=8, seed=2, gate_strength=strength)
        with torch.no_grad():
            o = lincomp.compile(spec, target="tvm")(**x)
        ref = lincomp.reference(spec, **{k: (v.double() if v.is_floating_point() else v) for k, v in x.items()})
        assert rel_err(o, ref) <= 1e-4, strength
