"""combine="shared" hybrids (LoLCATs) trained on the TVM kernels (shared_train.py: the fused forward's saved
den / lse2, the window backward with its row statistics, the generated in-window linear backward) against
autograd through the fp64 reference: every learned tensor (q, k, v, g, feature weights, window_gamma,
initial_state), direct calls and the custom op, GQA, causal and non-causal, both dq modes of the window
backward; the forward's cancellation check still sends a call to the reference. Outputs are NaN-poisoned
(tests/tvm/conftest.py)."""

import pytest
import torch

pytest.importorskip("tvm")

from hypothesis import given, strategies as st  # noqa: E402

import lincomp  # noqa: E402
from lincomp import presets  # noqa: E402
from lincomp.backends import ops  # noqa: E402
from lincomp.reference import reference  # noqa: E402
from lincomp.runtime.kernel import LincompFallbackWarning  # noqa: E402
from lincomp.spec import AttentionSpec  # noqa: E402
from lincomp.testing import examples, random_inputs, rel_err, spec_strategy  # noqa: E402

from tests.tvm.test_hybrid_backward import check_saved_like  # noqa: E402
from tests.tvm.test_window_backward import check_grads, check_wanted_grads  # noqa: E402
from lincomp.lower.tvmir.hybrid_train import branches  # noqa: E402

MINILM = AttentionSpec(window={"kind": "1d", "left": 6, "right": 6}, causal=False, prefix=1, combine="shared",
                       linear={"feature_map": "hedgehog", "feature_dim": 8, "gate": None, "normalize": True,
                               "chunk_size": 16})   # make demo's spec, scaled down
SPECS = {
    "lolcats-terraced": presets.lolcats(block=8, feature_dim=8, chunk_size=16),
    "minilm-like": MINILM,
    "causal-scalar-prefix": AttentionSpec(window={"kind": "1d", "left": 6, "right": 0}, causal=True, prefix=2,
                                          combine="shared", linear={"feature_map": "hedgehog", "feature_dim": 8,
                                                                    "gate": "scalar", "chunk_size": 16}),
    "causal-vector-elu1": AttentionSpec(window={"kind": "1d", "left": 9, "right": 0}, causal=True, combine="shared",
                                        linear={"feature_map": "elu1", "gate": "vector", "chunk_size": 16}),
}


@st.composite
def shared_specs(draw):
    """Random window specs (every kind, prefix tokens, no sinks) with a bounded positive-feature linear branch.
    (hedgehog_exp is left out: its unbounded features let the forward's full-minus-in-window cancellation
    reach the 1e-4 budget, and d window_gamma, a difference of near-equal window and total shares, amplifies
    it past; see the README's limits.)"""
    base = draw(spec_strategy(linear=False, hybrids=False, sinks=False, max_grid=5,
                              windows=("1d", "terraced", "2d", "3d")))
    gate = draw(st.sampled_from([None, "scalar", "vector"])) if base.causal else None
    fmap = draw(st.sampled_from(["hedgehog", "elu1", "relu"]))
    return AttentionSpec(window=base.window, causal=base.causal, prefix=base.prefix, combine="shared",
                         linear={"feature_map": fmap, "feature_dim": 8 if fmap.startswith("hedgehog") else None,
                                 "gate": gate, "normalize": draw(st.booleans()), "chunk_size": 16})


@examples(8)
@given(spec=shared_specs(), data=st.data())
def test_random_shared_specs_grads_match_reference(spec, data):
    """Direct calls: every gradient of random shared specs, sizes, GQA, tiles and dq modes within 1e-4."""
    H = data.draw(st.sampled_from([1, 2, 4]), label="H")
    Hkv = data.draw(st.sampled_from([h for h in (1, 2, 4) if H % h == 0]), label="Hkv")
    L = data.draw(st.integers(1, 90), label="L")
    block = data.draw(st.sampled_from([16, 32]), label="block")
    split = data.draw(st.booleans(), label="split_dq")
    x = random_inputs(spec, B=data.draw(st.integers(1, 2), label="B"), H=H, Hkv=Hkv, L=L, D=8,
                      seed=data.draw(st.integers(0, 999), label="seed"))
    kern = lincomp.compile(spec, target="tvm", config={"window_bwd": {"block_m": block, "block_n": block,
                                                                      "split_dq": split}})
    check_grads(spec, x, kern)
    assert kern.config["window_bwd"]["params"]["split_dq"] is split


@pytest.mark.parametrize("name", list(SPECS))
def test_custom_op_trains_shared_on_tvm_kernels(name):
    """torch.ops.lincomp.attention(target="tvm"): no fallback warning, the window and linear backward kernels
    ran, every gradient (window_gamma, g, the feature weights) within 1e-4 of the fp64 reference."""
    spec = SPECS[name]
    x = random_inputs(spec, B=2, H=4, Hkv=2, L=53, D=16, seed=7)
    spec_json = ops.spec_to_json(spec)
    kern = ops.get_kernel(spec_json, "tvm", "warn")
    assert kern.has_backward() and kern.backward_unsupported() is None
    kern.config.pop("window_bwd", None)

    def run(q, k, v, **kw):
        return torch.ops.lincomp.attention(q, k, v, spec_json, target="tvm", **kw)

    errs = check_grads(spec, x, run)
    assert {"dwindow_gamma", "dq", "dk", "dv"} <= set(errs)
    assert "window_bwd" in kern.config and "shared_bwd" in kern.source


@examples(8)
@given(spec=shared_specs(), data=st.data())
def test_only_the_wanted_gradients_are_formed(spec, data):
    """Through the op with a random subset of the inputs requiring grad (attention transfer: the feature weights
    and the gain only): each wanted gradient within 1e-4 of the fp64 reference; without q, k, v the window
    backward is its row-sum pass alone."""
    H = data.draw(st.sampled_from([2, 4]), label="H")
    x = random_inputs(spec, B=data.draw(st.integers(1, 2), label="B"), H=H, Hkv=data.draw(st.sampled_from([1, 2])),
                      L=data.draw(st.integers(1, 70), label="L"), D=8, seed=data.draw(st.integers(0, 999)))
    floats = sorted(n for n, t in x.items() if t.is_floating_point())
    wanted = data.draw(st.lists(st.sampled_from(floats), min_size=1, unique=True), label="wanted")
    ops.clear_kernel_cache()   # a fresh kernel: its source lists only this call's backward modules
    kern = ops.get_kernel(ops.spec_to_json(spec), "tvm", "error")
    check_wanted_grads(spec, x, wanted, {"window_gamma": 1.0 / max(x["window_gamma"].abs().min().item(), 1e-3)})
    src = branches(kern)[0].source
    qkv = bool(set(wanted) & {"q", "k", "v"})
    assert ("def window_bwd_rows(" in src, "def window_bwd_dkdv(" in src) == (not qkv, qkv)


def test_initial_state_gradient():
    """A causal shared spec with an initial state: d S0, d z0 from the scan's backward."""
    spec = SPECS["causal-scalar-prefix"]
    x = random_inputs(spec, B=1, H=2, L=40, D=8, seed=3, initial_state=True)
    S0, z0 = x.pop("initial_state")
    kern = lincomp.compile(spec, target="tvm")

    def run(q, k, v, S0, z0, **kw):
        return kern(q, k, v, initial_state=(S0, z0), **kw)

    def ref(q, k, v, S0, z0, **kw):
        return reference(spec, q, k, v, initial_state=(S0, z0), **kw)

    leaves = {n: t.clone().requires_grad_(True) for n, t in dict(x, S0=S0, z0=z0).items()}
    o = run(**leaves)
    g = torch.randn(o.shape, generator=torch.Generator().manual_seed(0))
    got = torch.autograd.grad(o, list(leaves.values()), g)
    dleaves = {n: t.double().requires_grad_(True) for n, t in leaves.items()}
    want = torch.autograd.grad(ref(**dleaves), list(dleaves.values()), g.double())
    for n, a, b in zip(leaves, got, want):
        assert ((a.double() - b).norm() / b.norm()).item() <= 1e-4, n


@pytest.mark.parametrize("name,tol", [("lolcats-terraced", 0.0), ("causal-vector-elu1", 1e-5)])
def test_saved_like_matches_saved(name, tol):
    """The fake's saved shapes are the real forward's; the training forward equals the inference kernel (bit for
    bit where both run the full scan; a 1D window's inference runs the lagged scans, shared_lag.py)."""
    spec = SPECS[name]
    check_saved_like(spec, random_inputs(spec, B=2, H=2, L=40, D=8, seed=1), tol=tol)


def test_cancellation_falls_back_with_warning():
    """A tiny window_gamma makes the fused forward's (full scan - in-window) subtraction cancel: the training
    forward raises Unsupported like the inference one, so the call (and its gradient) is the reference's,
    with the fallback warning, through direct calls and the op. (d window_gamma is left out: at gamma = 1e-8
    the fp32 reference's own scan form cancels too.)"""
    spec = SPECS["lolcats-terraced"]
    x = random_inputs(spec, B=1, H=2, L=37, D=16, seed=2)
    x["window_gamma"] = torch.full_like(x["window_gamma"], 1e-8)
    rest = {n: t for n, t in x.items() if n not in "qkv"}
    g = torch.randn(1, 2, 37, 16, generator=torch.Generator().manual_seed(0))
    qkv64 = [x[n].double().requires_grad_(True) for n in "qkv"]
    want = torch.autograd.grad(reference(spec, *qkv64, **rest), qkv64, g.double())
    kern = lincomp.compile(spec, target="tvm")
    spec_json = ops.spec_to_json(spec)
    for run in (kern, lambda q, k, v, **kw: torch.ops.lincomp.attention(q, k, v, spec_json, target="tvm", **kw)):
        qkv = [x[n].clone().requires_grad_(True) for n in "qkv"]
        with pytest.warns(LincompFallbackWarning, match="cancels"):
            o = run(*qkv, **rest)
        got = torch.autograd.grad(o, qkv, g)
        assert all(rel_err(a, b) <= 1e-4 for a, b in zip(got, want))
