"""TVM backward kernels of the linear branch (linear_bwd.py) against the fp64 reference's autograd.

Every learned tensor is checked (q, k, v, g, feature_weight_q / _k, initial_state S0 / z0) on random specs
(hypothesis), through a direct kernel call under autograd and through ``lincomp::attention`` (which must
run the kernels: no fallback warning, no reference call). Outputs start as NaN (tests/tvm/conftest.py), so a
gradient element a kernel forgets to write fails. SEMANTICS: rel err <= 1e-4 for fp32 inputs.
"""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("tvm")

import lincomp  # noqa: E402
from lincomp.backends import ops  # noqa: E402
from lincomp.reference import reference  # noqa: E402
from lincomp.runtime.kernel import LincompFallbackWarning  # noqa: E402
from lincomp.spec import AttentionSpec  # noqa: E402
from lincomp.testing import random_inputs, rel_err  # noqa: E402

MAPS = ["identity", "elu1", "relu", "hedgehog", "hedgehog_exp"]
TOL = 1e-4


def linear_spec(fmap, gate=None, normalize=False, causal=True):
    return AttentionSpec(causal=causal, linear={"feature_map": fmap, "gate": gate, "normalize": normalize,
                                               "feature_dim": 4 if fmap.startswith("hedgehog") else None})


def leaves(inputs: dict, dtype) -> dict:
    return {n: (tuple(t.to(dtype).detach().requires_grad_() for t in x) if isinstance(x, tuple)
                else x.to(dtype).detach().requires_grad_()) for n, x in inputs.items()}


def flat_grads(xs: dict) -> dict:
    """{name: grad} with initial_state split into S0 / z0 (a tensor with no gradient counts as zeros)."""
    out = {}
    for n, x in xs.items():
        for name, t in ((zip((f"{n}.S0", f"{n}.z0"), x)) if isinstance(x, tuple) else [(n, x)]):
            out[name] = t.grad if t.grad is not None else torch.zeros_like(t)
    return out


def reference_grads(spec, inputs, do, linear_scale=None, dtype=torch.float64) -> dict:
    ref = leaves(inputs, dtype)
    reference(spec, **ref, linear_scale=linear_scale).backward(do.to(dtype))
    return flat_grads(ref)


def kernel_grads(spec, inputs, do, config=None, linear_scale=None):
    kern = lincomp.compile(spec, target="tvm", config=config)
    ours = leaves(inputs, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LincompFallbackWarning)   # the kernels ran, not the reference
        o = kern(**ours, linear_scale=linear_scale)
    assert o.grad_fn is not None and "_Train" in type(o.grad_fn).__name__
    o.backward(do)
    return kern, flat_grads(ours)


def check(spec, *, L=37, H=2, Hkv=None, D=8, seed=0, initial_state=False, config=None, linear_scale=None,
          gate_strength=1.0, tol=TOL):
    x = random_inputs(spec, B=2, H=H, Hkv=Hkv, L=L, D=D, seed=seed, initial_state=initial_state,
                      gate_strength=gate_strength)
    do = torch.randn(2, H, L, D, generator=torch.Generator().manual_seed(seed + 1))
    kern, ours = kernel_grads(spec, x, do, config, linear_scale)
    ref = reference_grads(spec, x, do, linear_scale)
    errs = {n: rel_err(ours[n], ref[n]) for n in ref}
    assert all(e <= tol for e in errs.values()), f"{spec.summary()}: {errs} (config {kern.config})"
    return kern, errs


@settings(max_examples=12)
@given(fmap=st.sampled_from(MAPS), gate=st.sampled_from([None, "scalar", "vector"]), normalize=st.booleans(),
       state=st.booleans(), L=st.integers(1, 70), gqa=st.booleans(), chunk=st.sampled_from([16, 32]),
       scale=st.sampled_from([None, 0.37]), seed=st.integers(0, 10 ** 6))
def test_random_linear_specs(fmap, gate, normalize, state, L, gqa, chunk, scale, seed):
    """Gradients of every learned tensor on random specs, lengths (partial last chunks) and configs. The
    normaliser only with strictly positive maps (as models use it): with identity / relu features the
    denominator can sit near 0, where the gradient is ill-conditioned in any fp32 implementation."""
    normalize = normalize and fmap not in ("identity", "relu")
    check(linear_spec(fmap, gate, normalize), L=L, H=4 if gqa else 2, Hkv=2 if gqa else None, seed=seed,
          initial_state=state, config={"linear_bwd": {"chunk": chunk}}, linear_scale=None if normalize else scale)


@pytest.mark.parametrize("gate", [None, "scalar", "vector"])
@pytest.mark.parametrize("fmap", MAPS)
def test_maps_and_gates(fmap, gate):
    check(linear_spec(fmap, gate, fmap != "identity"), L=45, seed=1, initial_state=True)


@pytest.mark.parametrize("gate", [None, "scalar", "vector"])
@pytest.mark.parametrize("D", [31, 64])
def test_normaliser_column_at_wide_heads(gate, D):
    """With the normaliser, value rows are Dv + 1 wide (65 at D = 64): the state products run in power-of-two
    column blocks (codegen.pow2_parts); every gradient still matches."""
    check(linear_spec("hedgehog", gate, normalize=True), L=40, D=D, seed=2)


@pytest.mark.parametrize("gate", [None, "scalar", "vector"])
@pytest.mark.parametrize("D, chunk", [(24, 32), (64, 16)])
def test_register_transposes_at_wide_heads(gate, D, chunk):
    """Whole chunks transpose q, v, do (and the vector gate's decays) and the gradients' rows in registers
    (codegen.emit_transpose), 16 x 16 blocks on AVX-512, 8 x 8 on AVX2; D=24 leaves ragged rows and columns; the
    last chunk is partial (the guarded path)."""
    check(linear_spec("identity", gate, False), L=2 * chunk + 7, D=D, seed=3, initial_state=True,
          config={"linear_bwd": {"chunk": chunk}})


@pytest.mark.parametrize("lanes", [8, 4])
def test_narrower_vector_printers(monkeypatch, lanes):
    """The code an AVX2 (8 lanes) or SSE (4 lanes) host gets: 8 x 8 / 4 x 4 register transposes, its column
    blocks and row counts, built and run on this host (a narrower vector is legal on a wider one)."""
    from lincomp.lower.tvmir import build
    monkeypatch.setattr(build, "vector_lanes", lambda: lanes)
    for gate in ("scalar", "vector"):
        kern, _ = check(linear_spec("identity", gate, False), L=2 * 32 + 5, D=24, seed=4, initial_state=True,
                        config={"linear_bwd": {"chunk": 32}})
        assert f"lincomp_transpose{lanes}" in kern.preview_source(H=2, D=24, L=69)


@pytest.mark.parametrize("fmap", ["hedgehog", "hedgehog_exp"])
@pytest.mark.parametrize("D, gqa", [(32, True), (64, False)])
def test_feature_map_vjp_kernels(fmap, D, gqa):
    """Hedgehog maps train on generated kernels (features.py: phi again, then d x and d W per 256-token task,
    summed on the host), not on torch's vjp: 64 features per side, L=300 (two tasks, a partial 32-row tile),
    GQA (a key head's d k sums its query heads' terms)."""
    spec = AttentionSpec(causal=True, linear={"feature_map": fmap, "gate": "scalar", "normalize": fmap == "hedgehog",
                                              "feature_dim": 64})
    kern, errs = check(spec, L=300, H=4, Hkv=2 if gqa else None, D=D, seed=7)
    assert any(key[0] == "features_train" for key in kern._mods), "the feature maps' vjp did not run on the kernels"
    assert {"feature_weight_q", "feature_weight_k", "q", "k"} <= set(errs)


@pytest.mark.parametrize("fmap", ["identity", "elu1", "hedgehog"])
def test_non_causal(fmap):
    check(linear_spec(fmap, None, fmap != "identity", causal=False), L=50, H=4, Hkv=2, seed=2)


def _fp32_reference_error(spec, x, do) -> float:
    """How far the reference's own fp32 autograd is from fp64: the conditioning of this input."""
    r32, r64 = reference_grads(spec, x, do, dtype=torch.float32), reference_grads(spec, x, do)
    return max(rel_err(r32[n], r64[n]) for n in r64)


@pytest.mark.parametrize("gate", ["scalar", "vector"])
@pytest.mark.parametrize("strength", [1e-6, 5.0, 40.0, 300.0])
def test_extreme_gates(gate, strength):
    """Log-gates near 0 (no decay) and very negative (a chunk decays past e^-60: the exact per-feature path;
    gates under -40 are floored in the forward, so theirs is 0). Where strong decay leaves a gradient made
    of cancelling terms, fp32 cannot reach 1e-4 (the reference's own fp32 autograd does not): the bound is
    then twice the reference's fp32 error."""
    spec = linear_spec("elu1" if gate == "scalar" else "identity", gate, gate == "scalar")
    x = random_inputs(spec, B=2, H=2, L=80, D=8, seed=5, gate_strength=strength, initial_state=True)
    do = torch.randn(2, 2, 80, 8, generator=torch.Generator().manual_seed(6))
    _, ours = kernel_grads(spec, x, do, {"linear_bwd": {"chunk": 32}})
    ref = reference_grads(spec, x, do)
    tol = max(TOL, 2 * _fp32_reference_error(spec, x, do))
    errs = {n: rel_err(ours[n], ref[n]) for n in ref}
    assert all(e <= tol for e in errs.values()), f"{errs} > {tol}"


SPECS = {"gla-scalar": lincomp.presets.gla("scalar"), "gla-vector": lincomp.presets.gla("vector"),
         "lolcats-linear": linear_spec("hedgehog", None, True), "lizard-linear": linear_spec("hedgehog_exp", "scalar", True),
         "non-causal-elu": linear_spec("elu1", None, True, causal=False)}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_op_trains_on_the_kernels(monkeypatch, name):
    """lincomp::attention with grad: the TVM forward saves, the TVM backward runs; no reference, no warning."""
    spec = SPECS[name]
    calls = {"reference": 0, "backward_saved": 0}
    for mod, attr in ((ops, "reference"), (type(lincomp.compile(spec, target="tvm")), "backward_saved")):
        inner = getattr(mod, attr)

        def counted(*a, inner=inner, attr=attr, **kw):
            calls[attr] += 1
            return inner(*a, **kw)
        monkeypatch.setattr(mod, attr, counted)
    x = random_inputs(spec, B=1, H=2, L=40, D=8, seed=3)
    lv = leaves(x, torch.float32)
    w = {n: lv.get(n) for n in ops.WEIGHT_NAMES}
    with warnings.catch_warnings():
        warnings.simplefilter("error", LincompFallbackWarning)
        o = ops.attention(lv["q"], lv["k"], lv["v"], ops.spec_to_json(spec), None, w["g"], w["feature_weight_q"],
                          w["feature_weight_k"], target="tvm", fallback="error")
        do = torch.randn_like(o)
        o.backward(do)
    assert calls == {"reference": 0, "backward_saved": 1}
    ref = reference_grads(spec, x, do)
    errs = {n: rel_err(t.grad, ref[n]) for n, t in lv.items()}
    assert all(e <= TOL for e in errs.values()), errs


def test_poisoned_outputs_are_on():
    """The backward's outputs (and the saved states past the chunks a config uses) start as NaN here; a walk
    with chunk 32 writes the buffer's first B * H * ceil(L / 32) states contiguously (chunk_states)."""
    from lincomp.lower.tvmir.linear_train import chunk_states
    from lincomp.runtime.buffers import poisoning
    assert poisoning()
    spec = linear_spec("identity", "vector")
    x = random_inputs(spec, B=1, H=2, L=20, D=8, seed=4)
    kern = lincomp.compile(spec, target="tvm", config={"linear_bwd": {"chunk": 32}})
    _, saved = kern.forward_and_save(**x)
    used = chunk_states(saved[0], 20, 32)
    assert used.shape == (1, 2, 1, 8, 8) and used.data_ptr() == saved[0].data_ptr() and used.is_contiguous()
    flat = saved[0].view(-1)
    assert not torch.isnan(flat[:used.numel()]).any() and torch.isnan(flat[used.numel():]).all()


def test_backward_config_is_checked():
    spec = lincomp.presets.gla("scalar")
    x = random_inputs(spec, B=1, H=2, L=20, D=8, seed=0)
    kern = lincomp.compile(spec, target="tvm", config={"linear_bwd": {"chunk": 24}})
    with pytest.raises(ValueError, match="linear_bwd.chunk"):
        kern.forward_and_save(**x)
    kern = lincomp.compile(spec, target="tvm")
    kern.forward_and_save(**x)
    assert kern.config["linear_bwd"]["source"] in ("default", "db", "nearest")
    assert kern.config["linear_bwd"]["params"]["chunk"] >= 16


@pytest.mark.parametrize("spec", [lincomp.presets.gla("vector"), linear_spec("hedgehog_exp", "scalar", True)],
                         ids=["gla", "hedgehog-saves-phi"])
def test_compiled_training_step(spec):
    """torch.compile (dynamic lengths) keeps the op opaque: the saved states' fake shapes follow L alone (with a
    hedgehog map, the saved phi(q), phi(k) too), and two lengths train on the kernels through one compiled graph."""
    sj = ops.spec_to_json(spec)
    names = [n for n in ("g", "feature_weight_q", "feature_weight_k")
             if (n == "g" and spec.linear.gate) or (n != "g" and spec.linear.has_weights)]

    def step(q, k, v, *tensors):
        kw = dict(zip(names, tensors))
        return ops.attention(q, k, v, sj, None, target="tvm", fallback="error", **kw).square().sum()
    compiled = torch.compile(step, dynamic=True)
    for L, seed in ((40, 3), (53, 4)):
        x = random_inputs(spec, B=1, H=2, L=L, D=8, seed=seed)
        lv = leaves(x, torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("error", LincompFallbackWarning)
            compiled(lv["q"], lv["k"], lv["v"], *[lv[n] for n in names]).backward()
        ref = leaves(x, torch.float64)
        reference(spec, **ref).square().sum().backward()
        errs = {n: rel_err(lv[n].grad, ref[n].grad) for n in lv}
        assert all(e <= TOL for e in errs.values()), (L, errs)


def test_tune_backward_stores_the_best(tmp_path):
    """kernel.tune_backward measures linear_bwd's space (whole training steps, gradients checked against
    the default config's) and stores the best; a new kernel on the same database picks it up."""
    from lincomp.tuning import TuningDB
    db = TuningDB(tmp_path / "db", shipped=None)
    spec = lincomp.presets.gla("scalar")
    x = random_inputs(spec, B=1, H=2, L=40, D=8, seed=0)
    kern = lincomp.compile(spec, target="tvm", db=db)
    res = kern.tune_backward(**x, progress=False, reps=1)
    assert not res.cached and len(res.candidates) == 6
    again = lincomp.compile(spec, target="tvm", db=db)
    again.forward_and_save(**x)
    assert again.config["linear_bwd"]["source"] == "db"
    assert again.config["linear_bwd"]["params"] == res.config
