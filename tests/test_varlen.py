"""Packed sequences (``cu_seqlens``): checks of the boundaries, the reference against independent forms of
docs/semantics.md section 6, and the grouped dispatch every Kernel uses against the reference's document loop."""

import pytest
import torch
from hypothesis import given, strategies as st

import lincomp
from lincomp import presets
from lincomp.documents import cu_seqlens_of
from lincomp.reference.masks import window_mask
from lincomp.runtime.varlen import length_groups
from lincomp.testing import check_varlen_decoder, examples, packed_inputs, random_inputs, rel_err, spec_strategy

# Boundaries that matter: documents of length 1, ones ending on a chunk / tile border (4, 8, 16), one, many.
lengths_strategy = st.lists(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 16, 17]), min_size=1, max_size=6)


def _double(x: dict) -> dict:
    return {k: (tuple(t.double() for t in v) if isinstance(v, tuple) else
                v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in x.items()}


# ---------------------------------------------------------------------------------------- checks
def _call(spec, x, **over):
    return lincomp.reference(spec, **{**x, **over})


@pytest.mark.parametrize("bad, err, words", [
    (torch.tensor([0.0, 3.0, 10.0]), TypeError, "int32 or int64"),
    ([0, 3, 10], TypeError, "torch.Tensor"),
    (torch.tensor([[0, 10]]), ValueError, "1-D"),
    (torch.tensor([1, 3, 10]), ValueError, "start at 0"),
    (torch.tensor([0, 3, 9]), ValueError, "end at the sequence length"),
    (torch.tensor([0, 3, 3, 10]), ValueError, "strictly increasing"),
    (torch.tensor([0, 6, 3, 10]), ValueError, "strictly increasing"),
])
def test_bad_boundaries_raise(bad, err, words):
    spec = presets.sliding_window(4)
    x = random_inputs(spec, L=10, D=8)
    with pytest.raises(err, match="cu_seqlens") as e:
        _call(spec, x, cu_seqlens=bad)
    assert words in str(e.value)
    with pytest.raises(err, match="cu_seqlens"):   # compiled kernels check the same way
        lincomp.compile(spec, "reference")(**x, cu_seqlens=bad)


def test_batch_grid_and_state_rows_are_checked():
    spec = presets.sliding_window(4)
    x = random_inputs(spec, B=2, L=10, D=8)
    with pytest.raises(ValueError, match="cu_seqlens.*batch size must be 1"):
        _call(spec, x, cu_seqlens=cu_seqlens_of([4, 6]))
    grid = lincomp.AttentionSpec(window=lincomp.GridWindow((2, 3), 1, "square"), prefix=1)
    y = random_inputs(grid, L=None, D=8)
    y = {k: torch.cat([t, t[:, :, :5]], 2) for k, t in y.items()}   # documents of 7 and 5 tokens
    with pytest.raises(ValueError, match="cu_seqlens has a document of 5 tokens.*prefix \\+ 2\\*3 = 7"):
        _call(grid, y, cu_seqlens=cu_seqlens_of([7, 5]))
    gla = presets.gla("scalar", chunk_size=4)
    z = packed_inputs(gla, [3, 5], initial_state=True)
    S0, z0 = z["initial_state"]
    with pytest.raises(ValueError, match="with cu_seqlens, initial_state S0 needs one row per document"):
        _call(gla, z, initial_state=(S0[:1], z0[:1]))


# ------------------------------------------------------------------------- the reference's own forms
def _block_diagonal_window(spec, lengths) -> torch.Tensor:
    """[L, L]: the window rule of each document on the diagonal, nothing across documents."""
    return torch.block_diag(*[window_mask(spec, n) for n in lengths])


@examples(15)
@given(spec=spec_strategy(windows=("1d", "terraced", None), linear=False, hybrids=False, sinks=False),
       lengths=lengths_strategy, seed=st.integers(0, 99))
def test_reference_window_is_a_block_diagonal_mask(spec, lengths, seed):
    x = _double(packed_inputs(spec, lengths, seed=seed))
    o = lincomp.reference(spec, **x)
    q, k, v = x["q"], x["k"], x["v"]
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    mask = _block_diagonal_window(spec, lengths)
    if spec.window is None and spec.causal:
        mask = mask & torch.ones_like(mask).tril()
    want = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v
    assert rel_err(o, want) <= 1e-12


@examples(15)
@given(gate=st.sampled_from(["scalar", "vector"]), fmap=st.sampled_from(["identity", "elu1", "hedgehog_exp"]),
       normalize=st.booleans(), lengths=lengths_strategy, seed=st.integers(0, 99))
def test_reference_gated_linear_restarts_like_a_closed_gate(gate, fmap, normalize, lengths, seed):
    """A gated linear state restarting per document == the whole row with the gate shut at each start."""
    spec = lincomp.AttentionSpec(causal=True, linear=lincomp.LinearBranch(
        fmap, 4 if fmap.startswith("hedgehog") else None, gate, normalize and fmap != "identity", 4))
    x = _double(packed_inputs(spec, lengths, seed=seed))
    o, (S, z) = lincomp.reference(spec, **x, return_state=True)
    cu = x.pop("cu_seqlens").tolist()
    shut = x["g"].clone()
    shut[:, :, cu[1:-1]] = -400.0        # exp(-400) = 0 in fp64: the state entering a document is gone
    o_row, (S_row, z_row) = lincomp.reference(spec, **{**x, "g": shut}, return_state=True)
    assert rel_err(o, o_row) <= 1e-10
    assert rel_err(S[-1:], S_row) <= 1e-10 and rel_err(z[-1:], z_row) <= 1e-10
    assert S.shape[0] == z.shape[0] == len(lengths)


@examples(10)
@given(spec=spec_strategy(windows=("1d", "terraced", None)), lengths=lengths_strategy, seed=st.integers(0, 99),
       form=st.sampled_from(["chunked", "recurrent"]))
def test_reference_forms_agree_on_packed_rows(spec, lengths, seed, form):
    state = spec.linear is not None and spec.causal and spec.combine != "shared"
    x = _double(packed_inputs(spec, lengths, seed=seed, feature_dim=4, initial_state=state))
    a = lincomp.reference(spec, **x, return_state=state)
    b = lincomp.reference(spec, **x, return_state=state, form=form)
    for u, w in zip(*( (r[0], *r[1]) if state else (r,) for r in (a, b))):
        assert rel_err(u, w) <= 1e-10


# ------------------------------------------------------------------- the grouped dispatch of kernels
def test_length_groups_keep_first_appearance_order():
    assert length_groups([0, 3, 4, 7, 8, 10]) == {3: [0, 2], 1: [1, 3], 2: [4]}


@examples(12)
@given(spec=spec_strategy(windows=("1d", "terraced", "2d", None)), lengths=lengths_strategy,
       seed=st.integers(0, 99))
def test_grouped_dispatch_matches_document_loop_with_gradients(spec, lengths, seed):
    """Kernel.__call__ (documents stacked by length) == the reference's one-by-one loop, values and grads."""
    state = spec.linear is not None and spec.causal and spec.combine != "shared"
    x = _double(packed_inputs(spec, lengths, seed=seed, feature_dim=4, initial_state=state))
    leaves = {k: v.requires_grad_() for k, v in x.items() if torch.is_tensor(v) and v.is_floating_point()}
    kern = lincomp.compile(spec, "reference")
    outs = [kern(**x, return_state=state), lincomp.reference(spec, **x, return_state=state)]
    flat = [(r[0], *r[1]) if state else (r,) for r in outs]
    for u, w in zip(*flat):
        assert rel_err(u, w) <= 1e-12
    probes = [torch.randn_like(t) for t in flat[0]]
    grads = [torch.autograd.grad(sum((t * p).sum() for t, p in zip(f, probes)), list(leaves.values()),
                                 allow_unused=True) for f in flat]
    for name, a, b in zip(leaves, *grads):
        if b is None:
            assert a is None or not a.abs().any(), name
        else:
            assert rel_err(a, b) <= 1e-12, name


def test_no_document_sees_another():
    """Changing one document's keys / values changes no other document's output (every family)."""
    for spec in (presets.sliding_window(4), presets.lolcats(block=4, feature_dim=4, chunk_size=4),
                 presets.lizard(window=4, sinks=2, feature_dim=4, chunk_size=4), presets.gla("vector", 4)):
        x = _double(packed_inputs(spec, [5, 8, 3], seed=1, feature_dim=4))
        base = lincomp.reference(spec, **x)
        for name in ("k", "v"):
            y = dict(x)
            y[name] = x[name].clone()
            y[name][:, :, 5:13] += 1.0
            moved = lincomp.reference(spec, **y)
            assert torch.equal(moved[:, :, :5], base[:, :, :5]) and torch.equal(moved[:, :, 13:], base[:, :, 13:])
            assert not torch.equal(moved[:, :, 5:13], base[:, :, 5:13])


def test_single_document_is_the_plain_call():
    spec = presets.lizard(window=4, sinks=2, feature_dim=4, chunk_size=4)
    x = _double(packed_inputs(spec, [11], initial_state=True))
    cu = x.pop("cu_seqlens")
    a = lincomp.reference(spec, **x, cu_seqlens=cu, return_state=True)
    b = lincomp.reference(spec, **x, return_state=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0])


@pytest.mark.parametrize("spec", [presets.sliding_window(3, sinks=1), presets.gla("vector", 4),
                                  presets.lizard(window=3, sinks=2, feature_dim=4, chunk_size=4),
                                  presets.lolcats(block=3, feature_dim=4, chunk_size=4)], ids=lambda s: s.name)
def test_reference_decoders_serve_sequences_of_different_lengths(spec):
    from lincomp.reference import ReferenceDecoder
    check_varlen_decoder(ReferenceDecoder, spec)


def test_one_call_path_only_where_it_is_exact():
    from lincomp.runtime.varlen import restarts_by_gate
    gla, g = presets.gla("vector", 4), torch.zeros(1, 2, 5, 8)
    assert restarts_by_gate(gla, {"g": g}, False)
    assert not restarts_by_gate(gla, {"g": g}, True)                                  # per-document states
    assert not restarts_by_gate(gla, {"g": g, "initial_state": torch.zeros(2, 2, 8, 8)}, False)
    assert not restarts_by_gate(presets.lizard(window=4, feature_dim=4), {"g": g}, False)   # a window too
    assert not restarts_by_gate(lincomp.AttentionSpec(causal=True, linear={"feature_map": "elu1"}), {}, False)
