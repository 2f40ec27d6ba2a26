"""Generated Triton kernels of the linear branch and the hybrids against the fp64 reference.

Runs on CUDA when present, else on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1,
set below before any kernel module is generated). Shapes stay tiny: the interpreter runs one program
at a time in numpy. Outputs are NaN-poisoned before the kernels write them.

Tolerances (docs/semantics.md section 5): fp32 forward 1e-4, gradients 1e-3, each relaxed to 10x the
error of the same math run through the reference in fp32 where that is larger (gradients that are
ill-conditioned in fp32, e.g. a gate whose true gradient underflows).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402
from hypothesis import given, strategies as st  # noqa: E402

from lincomp import presets  # noqa: E402
from lincomp.lower.triton.linear import render_source  # noqa: E402
from lincomp.lower.triton.linear_kernel import LinearKernel, _op_inputs, compile_linear  # noqa: E402
from lincomp.lower.triton.linear_launch import Dims, default_config, tune_linear  # noqa: E402
from lincomp.reference import reference  # noqa: E402
from lincomp.runtime.kernel import LincompFallbackWarning  # noqa: E402
from lincomp.spec import AttentionSpec  # noqa: E402
from lincomp.testing import examples, random_inputs, rel_err, spec_strategy  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.interpreter] if DEV == "cpu" else [pytest.mark.gpu]




def _cast(x, dtype, grad):
    if isinstance(x, tuple):
        return tuple(_cast(t, dtype, grad) for t in x)
    return x.detach().to(DEV, dtype).requires_grad_(grad)


def _leaves(inp: dict):
    for name, x in inp.items():
        if isinstance(x, tuple):
            for i, t in enumerate(x):
                yield f"{name}[{i}]", t
        else:
            yield name, x


def _loss(out, weight):
    if isinstance(out, tuple):  # (o, (S, z)): every output feeds the loss
        o, (S, z) = out
        return (o.double() * weight).sum() + 0.3 * S.double().sum() - 0.2 * z.double().sum()
    return (out.double() * weight).sum()


def check_against_reference(spec, *, L=24, B=1, H=2, Hkv=None, D=16, chunk=16, seed=0, grads=True,
                            initial_state=False, return_state=False, gate_strength=1.0, kernel=None,
                            dtype=torch.float32, tol_fwd=1e-4, tol_grad=1e-3, gate_grad_absolute=False):
    """Run the kernel and the fp64 reference (and the fp32 reference as a yardstick); assert closeness.

    ``gate_grad_absolute``: judge d g against the size of the terms it is the difference of
    (|q * dq| + |k * dk|, identity map) instead of its own size: with gates so strong that the true
    d g underflows, fp32 can only be absolutely accurate (flash-linear-attention's identity
    dG = q dq - k dk has the same property).
    """
    spec = AttentionSpec.coerce(spec)
    inp = random_inputs(spec, B=B, H=H, Hkv=Hkv, L=L, D=D, seed=seed, initial_state=initial_state,
                        gate_strength=gate_strength)
    kern = kernel or compile_linear(spec, chunk_size=chunk)
    a = {k: _cast(v, dtype, grads) for k, v in inp.items()}
    r64 = {k: _cast(v, torch.float64, grads) for k, v in inp.items()}
    r32 = {k: _cast(v, torch.float32, grads) for k, v in inp.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = kern(**a, return_state=return_state)
    fell_back = any(issubclass(w.category, LincompFallbackWarning) for w in caught)
    # the one documented fallback: "shared" with gates and prefix tokens runs on the reference
    expected = spec.combine == "shared" and spec.linear.gate is not None and spec.prefix > 0
    assert fell_back == expected, f"{spec.summary()}: fallback {fell_back}, expected {expected}: {caught}"
    ref = reference(spec, **r64, return_state=return_state)
    ref32 = reference(spec, **r32, return_state=return_state)
    o, o_ref = (out[0], ref[0]) if return_state else (out, ref)
    assert o.dtype == dtype and o.shape == o_ref.shape
    errs = {"o": rel_err(o, o_ref)}
    if return_state:
        errs["S"] = rel_err(out[1][0], ref[1][0])
        errs["z"] = rel_err(out[1][1], ref[1][1])
    for name, e in errs.items():
        assert e <= tol_fwd, f"{spec.summary()}: forward {name} rel err {e:.3g} > {tol_fwd}"
    if not grads:
        return errs
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64).to(DEV)
    names = [n for n, _ in _leaves(a)]
    g = torch.autograd.grad(_loss(out, w), [t for _, t in _leaves(a)], allow_unused=True)
    g64 = torch.autograd.grad(_loss(ref, w), [t for _, t in _leaves(r64)], allow_unused=True)
    g32 = torch.autograd.grad(_loss(ref32, w), [t for _, t in _leaves(r32)], allow_unused=True)
    grads64 = dict(zip(names, g64))
    for name, x, y, y32 in zip(names, g, g64, g32):
        if name == "g" and gate_grad_absolute:
            qd, kd = r64["q"].detach(), r64["k"].detach().repeat_interleave(H // (Hkv or H), 1)
            size = (qd * grads64["q"]).norm() + (kd * grads64["k"].repeat_interleave(H // (Hkv or H), 1)).norm()
            e = float((x.double() - y).norm() / size)
            assert e <= tol_grad, f"{spec.summary()}: grad g abs err {e:.3g} (relative to |q dq| + |k dk|)"
            errs["dg"] = e
            continue
        if y is None:
            assert x is None or float(x.abs().max()) == 0.0, f"{name}: gradient where the reference has none"
            continue
        assert x is not None, f"{spec.summary()}: no gradient for {name}"
        e, e32 = rel_err(x, y), rel_err(y32, y)
        # Where fp32 itself cannot resolve a gradient (window_gamma, strong gates: the true value is a small
        # difference of large terms) the kernel may be as far off as the fp32 reference, within 3x (the
        # suite passes at 1.5x; it was 10x before, which a wrong gradient of the right size could pass).
        allowed = max(tol_grad, 3 * e32)
        assert e <= allowed, f"{spec.summary()}: grad {name} rel err {e:.3g} > {allowed:.3g} (fp32 reference {e32:.3g})"
        errs["d" + name] = e
    return errs


# ------------------------------------------------------------------------------- properties
def _linear_specs(**kw):
    return spec_strategy(max_prefix=4, max_grid=5, **kw).filter(lambda s: s.linear is not None)


@examples(16)
@given(spec=_linear_specs(), data=st.data())
def test_forward_matches_reference(spec, data):
    """Every linear / hybrid spec: forward (and the final state when defined) vs the fp64 reference."""
    L = data.draw(st.integers(1, 40)) if spec.expected_length() is None else None
    H = data.draw(st.sampled_from([1, 2]))
    Hkv = data.draw(st.sampled_from([h for h in (1, 2) if H % h == 0]))
    D = data.draw(st.sampled_from([8, 16]))
    chunk = data.draw(st.sampled_from([16, 32]))
    stateful = spec.causal and spec.combine != "shared" and data.draw(st.booleans())
    check_against_reference(spec, L=L, H=H, Hkv=Hkv, D=D, chunk=chunk, grads=False,
                            initial_state=stateful, return_state=stateful, seed=data.draw(st.integers(0, 99)))


@examples(10)
@given(spec=_linear_specs(), data=st.data())
def test_gradients_match_reference(spec, data):
    """Gradients of q, k, v, g, feature weights, sinks, gamma, alpha, initial state vs autograd of the reference."""
    L = data.draw(st.integers(1, 28)) if spec.expected_length() is None else None
    stateful = spec.causal and data.draw(st.booleans())
    check_against_reference(spec, L=L, H=2, Hkv=data.draw(st.sampled_from([1, 2])), D=8,
                            initial_state=stateful, return_state=stateful and spec.combine != "shared",
                            seed=data.draw(st.integers(0, 99)))


# -------------------------------------------------------------------------------- targeted
@pytest.mark.parametrize("name,spec", [
    ("gla-scalar", presets.gla("scalar")),
    ("gla-vector", presets.gla("vector")),
    ("lizard", presets.lizard(window=8, sinks=3, feature_dim=8)),
    ("lolcats", presets.lolcats(block=8, feature_dim=8)),
])
def test_paper_specs_forward_and_gradients(name, spec):
    """The papers' configurations at L not a multiple of the chunk, with grouped heads."""
    check_against_reference(spec, L=37, H=2, Hkv=1, D=16, initial_state=spec.combine != "shared")


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_chunked_equals_recurrent_for_any_chunk(gate):
    """Chunk sizes 16 / 32 / 64 agree with each other and with the token-by-token recurrence."""
    spec = AttentionSpec.from_dict({"causal": True, "linear": {"feature_map": "elu1", "gate": gate,
                                                               "normalize": True}})
    inp = random_inputs(spec, B=1, H=2, L=50, D=8, seed=3)
    rec = reference(spec, **{k: v.double() for k, v in inp.items()}, form="recurrent")
    outs = [compile_linear(spec, chunk_size=c)(**{k: v.to(DEV) for k, v in inp.items()}) for c in (16, 32, 64)]
    for o in outs:
        assert rel_err(o, rec) <= 1e-4
    assert rel_err(outs[0], outs[2]) <= 1e-5


@pytest.mark.parametrize("gate", [None, "scalar", "vector"])
def test_state_carried_across_two_calls_equals_one_call(gate):
    spec = AttentionSpec.from_dict({"causal": True, "linear": {"feature_map": "hedgehog_exp", "gate": gate,
                                                               "normalize": True, "feature_dim": 4}})
    inp = {k: (tuple(t.to(DEV) for t in v) if isinstance(v, tuple) else v.to(DEV))
           for k, v in random_inputs(spec, B=1, H=2, L=40, D=8, seed=5).items()}
    kern = compile_linear(spec, chunk_size=16)
    o_all, (S_all, z_all) = kern(**inp, return_state=True)
    cut = 23  # inside a chunk
    first = {k: (v[:, :, :cut] if k in ("q", "k", "v", "g") else v) for k, v in inp.items()}
    second = {k: (v[:, :, cut:] if k in ("q", "k", "v", "g") else v) for k, v in inp.items()}
    o1, st1 = kern(**first, return_state=True)
    o2, (S2, z2) = kern(**second, initial_state=st1, return_state=True)
    assert rel_err(torch.cat([o1, o2], 2), o_all) <= 1e-5
    assert rel_err(S2, S_all) <= 1e-5 and rel_err(z2, z_all) <= 1e-5


@pytest.mark.parametrize("gate,strength", [("scalar", 1e-7), ("scalar", 3e3), ("vector", 1e-7), ("vector", 3e3)])
def test_gates_near_zero_and_very_negative(gate, strength):
    """No exponential overflows: forward exact, gradients finite and as good as the fp32 reference."""
    spec = AttentionSpec.from_dict({"causal": True, "linear": {"feature_map": "identity", "gate": gate}})
    errs = check_against_reference(spec, L=33, D=8, gate_strength=strength, initial_state=True, return_state=True,
                                   gate_grad_absolute=True)
    assert all(e == e for e in errs.values())


def test_shared_hybrid_with_strong_gates_and_long_window():
    """LoLCATs-style "shared" with a gated linear part whose terms underflow next to the window."""
    spec = AttentionSpec.from_dict({"window": {"kind": "1d", "left": 40, "right": 0}, "causal": True,
                                    "combine": "shared", "linear": {"feature_map": "hedgehog", "gate": "scalar",
                                                                    "normalize": True}})
    check_against_reference(spec, L=64, D=16, gate_strength=2.0, initial_state=True)


def test_noncausal_shared_prefix_rows_have_no_linear_term():
    """Non-causal "shared": prefix rows see every key, so their linear term is exactly 0 (no cancellation)."""
    spec = AttentionSpec.from_dict({"window": {"kind": "1d", "left": 3, "right": 4}, "prefix": 3,
                                    "combine": "shared", "linear": {"feature_map": "elu1", "normalize": True}})
    check_against_reference(spec, L=40, D=8)


def test_value_blocks_split_over_programs():
    """Dv = 32 with 16-wide value blocks: per-block partial gradients must add up."""
    spec = presets.lizard(window=6, sinks=2, feature_dim=4)
    cfg = {"BT": 16, "BV": 16, "num_warps": 4, "num_stages": 1}
    kern = compile_linear(spec, config=cfg)
    check_against_reference(spec, L=21, D=32, kernel=kern)
    assert kern.config["linear_fwd"]["params"]["BV"] == 16


def test_strided_inputs_and_fp16():
    """[B, L, H, D]-major inputs (transposed views) need no copy; fp16 meets 1e-2."""
    spec = presets.gla("scalar")
    inp = random_inputs(spec, B=1, H=2, L=20, D=16, seed=1)
    q, k, v = (inp[n].transpose(1, 2).contiguous().transpose(1, 2).to(DEV) for n in ("q", "k", "v"))
    assert not q.is_contiguous()
    kern = compile_linear(spec)
    o = kern(q, k, v, g=inp["g"].to(DEV))
    ref = reference(spec, **{n: t.double() for n, t in inp.items()})
    assert rel_err(o, ref) <= 1e-4
    o16 = kern(q.half(), k.half(), v.half(), g=inp["g"].half().to(DEV))
    assert o16.dtype == torch.float16 and rel_err(o16, ref) <= 1e-2


# ------------------------------------------------------------------------ interface / errors
def test_bad_input_names_the_field():
    kern = compile_linear(presets.gla("vector"))
    inp = {k: v.to(DEV) for k, v in random_inputs(presets.gla("vector"), L=8, D=8).items()}
    with pytest.raises(ValueError, match="g"):
        kern(inp["q"], inp["k"], inp["v"])
    with pytest.raises(ValueError, match="g .*<= 0"):
        kern(inp["q"], inp["k"], inp["v"], g=inp["g"].abs())
    with pytest.raises(ValueError, match="g has shape"):
        kern(inp["q"], inp["k"], inp["v"], g=inp["g"][..., 0])
    with pytest.raises(ValueError, match="linear branch"):
        compile_linear(presets.sliding_window(8))


def test_key_padding_mask_falls_back_with_a_warning():
    spec = presets.gla("scalar")
    inp = {k: v.to(DEV) for k, v in random_inputs(spec, L=8, D=8).items()}
    mask = torch.ones(1, 8, dtype=torch.bool, device=DEV)
    mask[:, -2:] = False
    with pytest.warns(LincompFallbackWarning, match="key_padding_mask"):
        o = compile_linear(spec)(**inp, key_padding_mask=mask)
    assert rel_err(o, reference(spec, **inp, key_padding_mask=mask)) <= 1e-6


def test_generated_source_is_the_spec():
    """One module per spec: the window rule, feature map and flags appear as generated code."""
    spec = presets.lizard(window=128, sinks=4, feature_dim=64)
    src = compile_linear(spec).source
    assert "vis = (d <= 127) & (d >= 0)" in src   # the IR's rule: i - 127 <= j <= i, causal folded in
    assert "tl.exp(proj)" in src and "COMBINE = tl.constexpr(1)" in src and "SINKS = tl.constexpr(4)" in src
    assert "def linear_fwd(" in src and "def linear_bwd_dq(" in src and "def linear_bwd_dkv(" in src
    grid = AttentionSpec.from_dict({"window": {"kind": "2d", "grid": [8, 8], "radius": 3, "shape": "circle"},
                                    "prefix": 4, "combine": "sum", "linear": {"feature_map": "elu1"}})
    assert "< 9" in render_source(LinearKernel(grid).plan)
    kern = compile_linear(presets.gla("vector"))
    assert isinstance(kern, LinearKernel) and kern.target == "triton"
    assert default_config(kern.plan, _dims(), "cpu")["BT"] <= 32  # vector gates keep the chunk short


def _dims():
    return Dims(1, 2, 2, 64, 16, 16, 16, 1)


def test_custom_op_traces_without_graph_breaks():
    """torch.compile(fullgraph=True) through the custom op (fake impl + autograd), forward and backward."""
    spec = presets.lizard(window=6, sinks=2, feature_dim=4)
    kern = compile_linear(spec)
    inp = {k: v.to(DEV).requires_grad_() for k, v in random_inputs(spec, L=12, D=8, seed=2).items()}

    def f(q, k, v, g, wq, wk, s, a):
        return kern(q, k, v, g=g, feature_weight_q=wq, feature_weight_k=wk, sink_logits=s, alpha=a)

    args = [inp[n] for n in ("q", "k", "v", "g", "feature_weight_q", "feature_weight_k", "sink_logits", "alpha")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = torch.compile(f, backend="aot_eager", fullgraph=True)(*args)
    o.sum().backward()
    assert rel_err(o, f(*args)) <= 1e-6
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in args)


def test_opcheck_schema_fake_and_autograd_registration():
    import json
    spec = presets.gla("scalar")
    inp = random_inputs(spec, L=8, D=8, seed=4)
    cfg = json.dumps({"fwd": {"BT": 16, "BV": 16, "num_warps": 4, "num_stages": 1},
                      "bwd": {"BT": 16, "BV": 16, "num_warps": 4, "num_stages": 1}})
    args = [inp["q"].to(DEV).requires_grad_(), inp["k"].to(DEV), inp["v"].to(DEV), inp["g"].to(DEV), None, None,
            None, None, None, None, spec.canonical_json(), cfg, 0.35, 0.35, False, True]
    import lincomp.lower.triton.linear_op  # noqa: F401  (registers the ops)
    torch.library.opcheck(torch.ops.lincomp.linear_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_tuning_stores_results_and_reuses_them(tmp_path):
    """The measured search stores forward and backward configs; the same key then costs no work."""
    from lincomp.inputs import bind
    from lincomp.tuning import TuningDB
    spec = presets.gla("scalar")
    kern = compile_linear(spec)
    inp = {k: v.to(DEV) for k, v in random_inputs(spec, L=16, D=16).items()}
    call = bind(spec, **inp)
    dims = Dims.of(kern.plan, inp["q"], inp["k"], inp["v"])
    db = TuningDB(tmp_path, shipped=None)
    runs = []

    def bench(fn):
        fn()
        runs.append(1)
        return 1.0 + len(runs)

    first = tune_linear(kern, dims, torch.float32, DEV, _op_inputs(kern, call), db=db, bench=bench)
    assert [r.cached for r in first] == [False, False] and runs
    n = len(runs)
    again = tune_linear(kern, dims, torch.float32, DEV, _op_inputs(kern, call), db=db, bench=bench)
    assert [r.cached for r in again] == [True, True] and len(runs) == n
    assert {e.kernel for e in db.entries()} == {"linear_fwd", "linear_bwd"}


@pytest.mark.slow
def test_long_sequence_strong_and_weak_gates():
    for gate, strength in (("scalar", 0.01), ("vector", 5.0)):
        spec = AttentionSpec.from_dict({"causal": True, "linear": {"feature_map": "elu1", "gate": gate,
                                                                   "normalize": True}})
        check_against_reference(spec, L=700, D=16, chunk=32, gate_strength=strength, grads=False,
                                initial_state=True, return_state=True)
