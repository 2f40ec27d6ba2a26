"""torch.ops.lincomp.*: values and gradients against the reference, fake/autograd registration, masks, fallbacks."""

import warnings

import pytest
import torch

import lincomp
from lincomp import presets
from lincomp.backends import ops
from lincomp.runtime.kernel import LincompFallbackWarning
from lincomp.testing import random_inputs, rel_err

SPECS = {
    "swa": presets.sliding_window(4, sinks=2),
    "lizard": presets.lizard(window=4, sinks=2, feature_dim=4),
    "lolcats": presets.lolcats(block=4, feature_dim=4),
    "clear": presets.clear(radius=2, grid=(3, 4), text_tokens=2),
}


def _call(spec, inp, **kw):
    t = {n: inp.get(n) for n in ops.WEIGHT_NAMES}
    return torch.ops.lincomp.attention(inp["q"], inp["k"], inp["v"], ops.spec_to_json(spec), kw.get("scale"),
                                       t["g"], t["feature_weight_q"], t["feature_weight_k"], t["sink_logits"],
                                       t["window_gamma"], t["alpha"], kw.get("key_padding_mask"),
                                       kw.get("target", "reference"), kw.get("fallback", "warn"))


@pytest.mark.parametrize("name", list(SPECS))
def test_values_and_gradients_match_reference(name):
    spec = SPECS[name]
    inp = random_inputs(spec, B=2, H=4, Hkv=2, L=10, D=8, dtype=torch.float64, seed=1)
    leaves = {k: v.requires_grad_() for k, v in inp.items()}
    o = _call(spec, leaves, scale=0.3)
    r = lincomp.reference(spec, **leaves, scale=0.3)
    assert rel_err(o, r) < 1e-12
    go = torch.randn_like(o)
    got = torch.autograd.grad(o, list(leaves.values()), go)
    want = torch.autograd.grad(r, list(leaves.values()), go)
    for n, a, b in zip(leaves, got, want):
        assert rel_err(a, b) < 1e-10, n


def test_opcheck_fake_and_autograd_registrations():
    spec = SPECS["lizard"]
    inp = random_inputs(spec, B=1, H=2, L=6, D=4, seed=2)
    args = (inp["q"], inp["k"], inp["v"], ops.spec_to_json(spec), None, inp["g"], inp["feature_weight_q"],
            inp["feature_weight_k"], inp["sink_logits"], None, inp["alpha"])
    torch.library.opcheck(torch.ops.lincomp.attention.default, args, {"target": "reference"})
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    torch.library.opcheck(torch.ops.lincomp.key_padding_mask.default, (mask, True, True))


def test_fake_impl_keeps_symbolic_lengths():
    from torch.fx.experimental.proxy_tensor import make_fx
    spec_json = ops.spec_to_json(SPECS["swa"])

    def f(q, k, v, sinks):
        return torch.ops.lincomp.attention(q, k, v, spec_json, None, None, None, None, sinks, target="reference")
    inp = random_inputs(SPECS["swa"], B=2, H=4, Hkv=2, L=8, D=4)
    gm = make_fx(f, tracing_mode="symbolic")(inp["q"], inp["k"], inp["v"][..., :3].contiguous(), inp["sink_logits"])
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    shape = (out[0] if isinstance(out, (list, tuple)) else out).meta["val"].shape
    assert isinstance(shape[0], torch.SymInt) and isinstance(shape[2], torch.SymInt)
    assert str(shape[2]) == str(inp["q"].shape[2]) or not str(shape[2]).isdigit()
    assert str(shape[3]) != "4"   # Dv comes from v, not q


def test_key_padding_mask_from_sdpa_masks():
    kpm = torch.tensor([[False, False, True, True, True], [True] * 5])
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None] & kpm[:, None, None, :]
    assert torch.equal(torch.ops.lincomp.key_padding_mask(causal, True), kpm)
    dense = kpm[:, None, None, :].expand(2, 1, 5, 5)
    assert torch.equal(torch.ops.lincomp.key_padding_mask(dense, False), kpm)
    additive = torch.zeros(2, 1, 1, 5).masked_fill(~kpm[:, None, None, :], torch.finfo(torch.float32).min)
    assert torch.equal(torch.ops.lincomp.key_padding_mask(additive, False), kpm)
    with pytest.raises(ValueError, match="causal mask: use a causal spec"):
        torch.ops.lincomp.key_padding_mask(causal, False)
    with pytest.raises(ValueError, match="not a key-padding mask"):
        torch.ops.lincomp.key_padding_mask(torch.rand(1, 1, 5, 5) > 0.5, False)
    with pytest.raises(ValueError, match="bias"):
        torch.ops.lincomp.key_padding_mask(torch.randn(1, 1, 5, 5), False)
    unchecked = torch.ops.lincomp.key_padding_mask(torch.rand(1, 1, 5, 5) > 0.5, False, False)   # check=False
    assert unchecked.shape == (1, 5) and unchecked.dtype == torch.bool


def test_missing_target_falls_back_or_raises(monkeypatch):
    import lincomp.compiler as compiler

    def unavailable(target, spec, hints):
        raise ImportError("not built here")
    monkeypatch.setattr(compiler, "_build", unavailable)
    ops.clear_kernel_cache()
    spec = SPECS["swa"]
    inp = random_inputs(spec, L=6, D=4)
    try:
        with pytest.warns(LincompFallbackWarning, match="not available"):
            o = _call(spec, inp, target="tvm")
        assert rel_err(o, lincomp.reference(spec, **inp)) < 1e-6
        with pytest.raises(RuntimeError, match="fallback='warn'"):
            _call(spec, inp, target="triton", fallback="error")
    finally:
        ops.clear_kernel_cache()


def test_kernel_runtime_fallback_is_an_error_when_asked():
    spec = SPECS["swa"]
    inp = random_inputs(spec, L=6, D=4)
    kpm = torch.ones(1, 6, dtype=torch.bool)
    kernel = ops.get_kernel(ops.spec_to_json(spec), "reference", "error")

    class Refusing(type(kernel)):
        target = "refusing"

        def forward(self, q, k, v, **kw):
            from lincomp.runtime.kernel import Unsupported
            raise Unsupported("test")
    ops._kernels[(ops.spec_to_json(spec), "reference", "error", "")] = Refusing(spec)
    try:
        with pytest.raises(LincompFallbackWarning):
            _call(spec, inp, key_padding_mask=kpm, fallback="error")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ops._kernels[(ops.spec_to_json(spec), "reference", "warn", "")] = Refusing(spec)
            assert rel_err(_call(spec, inp, key_padding_mask=kpm), lincomp.reference(spec, **inp)) < 1e-6
    finally:
        ops.clear_kernel_cache()


def test_bad_arguments_name_the_field():
    spec = SPECS["swa"]
    inp = random_inputs(spec, L=6, D=4)
    with pytest.raises(ValueError, match="target must be one of"):
        _call(spec, inp, target="cuda")
    with pytest.raises(ValueError, match="sink_logits is required"):
        torch.ops.lincomp.attention(inp["q"], inp["k"], inp["v"], ops.spec_to_json(spec), target="reference")
