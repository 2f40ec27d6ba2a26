"""combine="sum" hybrids (Lizard) trained on the TVM kernels (hybrid_train.py: the window and linear backward
families composed) against autograd through the fp64 reference: every learned tensor (q, k, v, g, feature
weights, sink_logits, alpha), direct calls and the custom op, GQA, causal and non-causal (combine="shared":
test_shared_backward.py). Outputs are NaN-poisoned (tests/tvm/conftest.py)."""

import pytest
import torch

pytest.importorskip("tvm")

from hypothesis import given, strategies as st  # noqa: E402

import lincomp  # noqa: E402
from lincomp import presets  # noqa: E402
from lincomp.backends import ops  # noqa: E402
from lincomp.spec import AttentionSpec  # noqa: E402
from lincomp.testing import examples, random_inputs  # noqa: E402

from tests.tvm.test_window_backward import check_grads  # noqa: E402

SPECS = {
    "lizard-scalar": presets.lizard(window=16, sinks=2, feature_dim=8, chunk_size=16, gate="scalar"),
    "lizard-vector": presets.lizard(window=24, sinks=4, feature_dim=8, chunk_size=16, gate="vector"),
    "identity-nogate-unnormalised": AttentionSpec(
        window={"kind": "1d", "left": 7, "right": 0}, causal=True, sinks=1, combine="sum",
        linear={"feature_map": "identity", "gate": "scalar", "normalize": False, "chunk_size": 16}),
    "noncausal-band-hedgehog": AttentionSpec(
        window={"kind": "1d", "left": 5, "right": 4}, causal=False, sinks=2, combine="sum",
        linear={"feature_map": "hedgehog", "feature_dim": 8, "gate": None, "normalize": True, "chunk_size": 16}),
}


def _inputs(spec, L=53, seed=7, H=4, Hkv=2):
    x = random_inputs(spec, B=2, H=H, Hkv=Hkv, L=L, D=16, seed=seed)
    assert {"alpha", "sink_logits"} <= set(x)
    return x


@pytest.mark.parametrize("name", list(SPECS))
def test_custom_op_trains_hybrid_on_tvm_kernels(name):
    """torch.ops.lincomp.attention(target="tvm"): no fallback warning, both backward families ran (their
    configs are recorded), every gradient (alpha and the sinks included) within 1e-4 of the fp64 reference."""
    spec = SPECS[name]
    x = _inputs(spec)
    spec_json = ops.spec_to_json(spec)
    kern = ops.get_kernel(spec_json, "tvm", "warn")
    assert kern.has_backward() and kern.backward_unsupported() is None
    kern.config.pop("window_bwd", None)
    kern.config.pop("linear_bwd", None)

    def run(q, k, v, **kw):
        return torch.ops.lincomp.attention(q, k, v, spec_json, target="tvm", **kw)

    errs = check_grads(spec, x, run)
    assert {"dalpha", "dsink_logits", "dq", "dk", "dv"} <= set(errs)
    assert "window_bwd" in kern.config, "the window backward did not run"
    if spec.causal:
        assert "linear_bwd" in kern.config, "the linear backward did not run"


@pytest.mark.parametrize("name", ["lizard-scalar", "noncausal-band-hedgehog"])
def test_direct_call_trains_hybrid_on_tvm_kernels(name):
    """kernel(q, k, v, ...) on leaves that require grad: the same kernels, no fallback, MHA and L = 128."""
    spec = SPECS[name]
    x = _inputs(spec, L=128, seed=3, H=2, Hkv=2)
    kern = lincomp.compile(spec, target="tvm", config={"window_bwd": {"block_m": 16, "block_n": 32}})
    check_grads(spec, x, kern, seed=1)
    assert kern.config["window_bwd"]["source"] == "fixed"


def test_saved_like_matches_saved():
    """The fake's saved shapes are the real forward's (the op's contract); the fused forward and the training
    forward agree."""
    check_saved_like(SPECS["lizard-vector"], _inputs(SPECS["lizard-vector"], L=40), tol=1e-5)


def check_saved_like(spec, x: dict, tol: float) -> None:
    """forward_and_save's saved tensors have saved_like's shapes and are fp32 (all but the chunk states finite:
    only their used rows are written), and its output is the fused inference kernel's within ``tol``."""
    kern = lincomp.compile(spec, target="tvm")
    with torch.no_grad():
        o, saved = kern.forward_and_save(**x)
        like = kern.saved_like(**x)
        fused = kern(**x)
    assert [t.shape for t in saved] == [t.shape for t in like]
    assert all(t.dtype == torch.float32 for t in saved) and all(torch.isfinite(t).all() for t in saved[1:])
    assert ((o - fused).norm() / fused.norm()).item() <= tol


def test_key_padded_training_keeps_the_forward_on_the_kernels():
    """A key-padded call through the op: the fused forward runs, saves nothing, and the gradient is the
    reference's (as for the window and linear families); values and gradients still match."""
    spec = SPECS["lizard-scalar"]
    x = _inputs(spec, L=40, seed=5)
    kpm = torch.ones(2, 40, dtype=torch.bool)
    kpm[1, :9] = False                                  # left padding on the second row
    spec_json = ops.spec_to_json(spec)

    def run(q, k, v, **kw):
        return torch.ops.lincomp.attention(q, k, v, spec_json, target="tvm", **kw)

    check_grads(spec, {**x, "key_padding_mask": kpm}, run)


NEEDS_SPECS = dict(SPECS, **{
    "window-sinks": AttentionSpec(window={"kind": "1d", "left": 9, "right": 0}, causal=True, sinks=3),
    "linear-vector-hedgehog": AttentionSpec(causal=True, linear={"feature_map": "hedgehog", "feature_dim": 4,
                                                                 "gate": "vector", "chunk_size": 16}),
    "linear-scalar-elu1": AttentionSpec(causal=True, linear={"feature_map": "elu1", "gate": "scalar",
                                                             "normalize": False, "chunk_size": 16}),
})


@examples(10)
@given(name=st.sampled_from(list(NEEDS_SPECS)), data=st.data())
def test_only_the_wanted_gradients_are_formed(name, data):
    """Through the op with a random subset of the inputs requiring grad (Lizard's attention transfer: frozen q, k,
    v projections, trained feature maps, gate, sinks and alpha): each wanted gradient within 1e-4 of the fp64
    reference (gates weak and strong: both vector-gate paths of the linear backward), and the window backward's
    pass over the pairs runs only when q, k or v is wanted."""
    from lincomp.lower.tvmir import window_train
    from tests.tvm.test_window_backward import check_wanted_grads
    spec = NEEDS_SPECS[name]
    x = random_inputs(spec, B=data.draw(st.integers(1, 2), label="B"), H=4, Hkv=data.draw(st.sampled_from([1, 2, 4])),
                      L=data.draw(st.integers(1, 60), label="L"), D=8, seed=data.draw(st.integers(0, 999)),
                      gate_strength=data.draw(st.sampled_from([0.5, 12.0]), label="gate_strength"))
    floats = sorted(n for n, t in x.items() if t.is_floating_point())
    wanted = data.draw(st.lists(st.sampled_from(floats), min_size=1, unique=True), label="wanted")
    passes = []
    real = window_train._module
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(window_train, "_module", lambda kernel, tag, *a, **kw: passes.append(tag) or real(kernel, tag, *a, **kw))
        check_wanted_grads(spec, x, wanted)
    assert ("window_bwd" in passes) == (spec.has_softmax and bool(set(wanted) & {"q", "k", "v"})), (wanted, passes)
