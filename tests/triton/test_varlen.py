"""Packed sequences (``cu_seqlens``) on the Triton kernels (the interpreter on CPU, tiny shapes): outputs,
per-document states and gradients of every input against the fp64 reference's autograd."""

import pytest
import torch

pytest.importorskip("triton")

from hypothesis import given, strategies as st  # noqa: E402

import lincomp  # noqa: E402
from lincomp import presets  # noqa: E402
from lincomp.testing import check_varlen_decoder, examples, packed_inputs, rel_err, spec_strategy  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
lengths_strategy = st.lists(st.sampled_from([1, 2, 3, 4, 5, 8, 9, 16]), min_size=1, max_size=5)


def _leaves(x: dict, dtype, device) -> dict:
    def conv(t):
        if not torch.is_tensor(t):
            return tuple(conv(u) for u in t)
        t = t.to(device)
        return t.to(dtype).requires_grad_() if t.is_floating_point() else t
    return {k: conv(v) for k, v in x.items()}


def _flat(x: dict) -> list:
    return [(k, t) for k, v in x.items() for t in (v if isinstance(v, tuple) else (v,)) if t.is_floating_point()]


def check_packed_grads(spec, lengths, *, seed=0, state=False, tol=1e-4):
    """Triton kernel vs fp64 reference on a packed row: o, (S, z), and the gradient of every float input."""
    x = packed_inputs(spec, lengths, seed=seed, H=2, D=8, feature_dim=4, initial_state=state)
    ours, ref = _leaves(x, torch.float32, DEVICE), _leaves(x, torch.float64, "cpu")
    outs = [lincomp.compile(spec, target="triton")(**ours, return_state=state),
            lincomp.reference(spec, **ref, return_state=state)]
    flat = [(r[0], *r[1]) if state else (r,) for r in outs]
    for a, b in zip(*flat):
        assert rel_err(a, b) <= tol, f"{spec.summary()} {lengths}: forward rel err {rel_err(a, b)}"
    probes = [torch.randn(t.shape, dtype=torch.float64) for t in flat[1]]
    grads = []
    for f, leaves in zip(flat, (ours, ref)):
        loss = sum((t * p.to(t)).sum() for t, p in zip(f, probes))
        grads.append(torch.autograd.grad(loss, [t for _, t in _flat(leaves)], allow_unused=True))
    for (name, _), a, b in zip(_flat(ref), *grads):
        if b is None or b.norm() <= 1e-9:   # e.g. window_gamma when every key of a short document is in its window
            assert a is None or a.norm() <= 1e-4, name
        else:
            assert a is not None and rel_err(a, b) <= tol, f"{spec.summary()} {lengths}: d{name} rel err"


@examples(6)
@given(spec=spec_strategy(windows=("1d", "terraced", None), max_prefix=3), lengths=lengths_strategy,
       seed=st.integers(0, 99), state=st.booleans())
def test_random_specs_on_packed_rows_with_gradients(spec, lengths, seed, state):
    state = state and spec.linear is not None and spec.causal and spec.combine != "shared"
    check_packed_grads(spec, lengths, seed=seed, state=state)


@pytest.mark.parametrize("spec", [presets.sliding_window(4), presets.gla("vector", chunk_size=4),
                                  presets.lizard(window=4, sinks=2, feature_dim=4, chunk_size=4),
                                  presets.lolcats(block=4, feature_dim=4, chunk_size=4)],
                         ids=lambda s: s.name)
def test_families_on_chunk_borders(spec):
    """Documents of 1 token and ones ending exactly on a chunk border (4, 8), with per-document states."""
    state = spec.linear is not None and spec.combine != "shared"
    check_packed_grads(spec, [4, 1, 8, 3, 4, 13], seed=2, state=state)


def test_grid_documents():
    spec = lincomp.AttentionSpec(window=lincomp.GridWindow((2, 3), 1, "square"), prefix=1)
    check_packed_grads(spec, [0, 0], seed=4)   # two documents of prefix + 2*3 tokens each


@pytest.mark.parametrize("spec", [presets.sliding_window(3, sinks=1), presets.gla("vector", 4),
                                  presets.lizard(window=3, sinks=2, feature_dim=4, chunk_size=4)],
                         ids=lambda s: s.name)
def test_decoders_serve_sequences_of_different_lengths(spec):
    from lincomp.lower.triton.decode import TritonDecoder
    check_varlen_decoder(TritonDecoder, spec, device=DEVICE)


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_gated_linear_one_call_path(gate):
    """GLA without states runs as one call with the gate shut at document starts (chunks straddle borders)."""
    check_packed_grads(presets.gla(gate, chunk_size=4), [4, 1, 8, 3, 6, 13], seed=6)
