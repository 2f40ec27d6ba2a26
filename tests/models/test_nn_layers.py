"""``lincomp.nn``: drop-in attention layers [B, L, hidden] -> [B, L, hidden] with their own projections.

Each layer is held to a computation written out here by hand (projections, the spec's tensors from the
layer's parameters, ``lincomp.reference`` in fp64, the output projection); gradients reach every parameter."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import lincomp
from lincomp import AttentionSpec, presets
from lincomp.nn import (Attention, ClearAttention, LizardAttention, SlidingWindowAttention, layer_kwargs,
                        spec_from_config)
from lincomp.testing import rel_err

HIDDEN = 32


def _layers():
    return [
        ("swa-gqa", lambda: SlidingWindowAttention(HIDDEN, 4, 8, num_kv_heads=2), 24),
        ("swa-sinks", lambda: SlidingWindowAttention(HIDDEN, 4, 6, sinks=2, bias=True), 20),
        ("lizard", lambda: LizardAttention(HIDDEN, 4, 8, feature_dim=4, chunk_size=8), 24),
        ("clear", lambda: ClearAttention(HIDDEN, 2, (4, 4), 2, text_tokens=3), 19),
        ("clear-pool", lambda: ClearAttention(HIDDEN, 2, (4, 4), 2, pool=2), 16),
        ("lolcats", lambda: Attention(HIDDEN, 4, presets.lolcats(4, 4, chunk_size=8)), 20),
        ("gla-vector", lambda: Attention(HIDDEN, 2, presets.gla("vector", chunk_size=8)), 20),
    ]


def _by_hand(layer, x):
    """The layer's output computed from its parameters without calling the layer (fp64)."""
    d = torch.float64
    x = x.to(d)
    B, L, _ = x.shape
    H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim

    def proj(lin, n):
        w = lin.weight.to(d)
        y = x @ w.T + (0 if lin.bias is None else lin.bias.to(d))
        return y.view(B, L, n, D).transpose(1, 2)

    q, k, v = proj(layer.q_proj, H), proj(layer.k_proj, Hkv), proj(layer.v_proj, Hkv)
    a, spec, tensors = layer.attn, layer.spec, {}
    if a.gate is not None and a.gate.kind == "scalar":
        tensors["g"] = F.logsigmoid(x @ a.gate.proj.weight.to(d).T + a.gate.proj.bias.to(d)).transpose(1, 2)
    elif a.gate is not None:
        low = x @ a.gate.down.weight.to(d).T
        g = F.logsigmoid(low @ a.gate.proj.weight.to(d).T + a.gate.proj.bias.to(d)) / 16
        tensors["g"] = g.view(B, L, H, -1).transpose(1, 2)
    if a.feature_q is not None:
        tensors["feature_weight_q"], tensors["feature_weight_k"] = a.feature_q.weight.to(d), a.feature_k.weight.to(d)
    if spec.sinks:
        tensors["sink_logits"] = a.sink_logits.to(d)
    if spec.combine == "sum":
        tensors["alpha"] = a.alpha.to(d)
    if spec.combine == "shared":
        tensors["window_gamma"] = torch.sigmoid(a.window_factor.to(d))
    if spec.pool is not None:
        tensors["pool_weight"] = a.pool_weight.to(d)
    o = lincomp.reference(spec, q, k, v, scale=D ** -0.5, **tensors)
    o = o.transpose(1, 2).reshape(B, L, H * D)
    return o @ layer.o_proj.weight.to(d).T + (0 if layer.o_proj.bias is None else layer.o_proj.bias.to(d))


def _perturb(layer):
    """Move every parameter off its initial value (sinks start at 0, alpha at 1: a test at init could miss a
    parameter that is read but ignored)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name, make, L", _layers(), ids=[c[0] for c in _layers()])
def test_shapes_and_gradients_reach_every_parameter(name, make, L):
    torch.manual_seed(0)
    layer = make()
    _perturb(layer)
    x = torch.randn(2, L, HIDDEN, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, L, HIDDEN) and y.dtype == torch.float32
    (y * torch.randn_like(y)).sum().backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert rel_err(y.detach(), _by_hand(layer, x.detach())) <= 1e-4


# The generated kernels (target="auto" -> TVM on the CPU) against the hand-built computation, no fallback.
KERNEL_CASES = ["swa-gqa", "lizard", "clear"]


@pytest.mark.parametrize("name", KERNEL_CASES)
def test_layer_on_the_kernels_equals_the_hand_built_computation(name):
    pytest.importorskip("tvm")
    make, L = next((m, L) for n, m, L in _layers() if n == name)
    torch.manual_seed(0)
    layer = make()
    _perturb(layer)
    x = torch.randn(2, L, HIDDEN)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")   # a fallback to the reference warns: this must run the kernel
        y = layer(x)
    assert layer.attn.target == "auto"
    assert rel_err(y, _by_hand(layer, x)) <= 1e-4


def test_layers_build_the_spec_they_name():
    assert SlidingWindowAttention(HIDDEN, 4, 16).spec == presets.sliding_window(16)
    assert LizardAttention(HIDDEN, 4, 32).spec == presets.lizard(32, 4, HIDDEN // 4)
    c = ClearAttention(HIDDEN, 4, (8, 8), 3, text_tokens=5, shape="square")
    assert c.spec == presets.clear(3, (8, 8), 5, "square") and c.spec.expected_length() == 69
    p = ClearAttention(HIDDEN, 4, (8, 8), 3, pool=4).attn.pool_weight
    assert p.shape == (4, 4) and torch.allclose(p, torch.full((4, 4), 1 / 16))   # CLEAR's average at init
    a = LizardAttention(HIDDEN, 4, 8).attn
    assert torch.equal(a.alpha, torch.ones(4)) and torch.equal(a.sink_logits, torch.zeros(4, 4))
    assert torch.equal(a.feature_q.weight[0], torch.eye(HIDDEN // 4))             # identity-like Hedgehog init


@pytest.mark.parametrize("make, words", [
    (lambda: Attention(HIDDEN, 4, AttentionSpec(), num_kv_heads=3), "num_kv_heads=3 must divide num_heads=4"),
    (lambda: Attention(30, 4, AttentionSpec()), "pass head_dim"),
    (lambda: Attention(HIDDEN, 0, AttentionSpec()), "num_heads must be a positive int"),
    (lambda: SlidingWindowAttention(HIDDEN, 4, 0), "window must be a positive int"),
    (lambda: Attention(HIDDEN, 4, AttentionSpec(), target="gpu"), "target must be one of"),
])
def test_bad_arguments_name_the_field(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"x must be \[B, L, hidden=32\]"):
        SlidingWindowAttention(HIDDEN, 4, 8)(torch.randn(2, 8, 16))


def test_from_a_transformers_config():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MistralConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, sliding_window=16)
    assert layer_kwargs(cfg) == {"hidden_size": 64, "num_heads": 8, "num_kv_heads": 2, "head_dim": 8, "bias": False}
    assert spec_from_config(cfg) == presets.sliding_window(16)
    assert spec_from_config(cfg, "lizard") == presets.lizard(16, 4, 8)
    layer = Attention.from_config(cfg)
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim) == (8, 2, 8)
    assert layer.k_proj.out_features == 16 and layer.spec == presets.sliding_window(16)
    y = layer(torch.randn(1, 20, 64))
    assert y.shape == (1, 20, 64)
    llama = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, attention_bias=True)
    with pytest.raises(ValueError, match="sliding_window is not set.*pass window="):
        spec_from_config(llama)
    assert spec_from_config(llama, window=32) == presets.sliding_window(32)
    assert Attention.from_config(llama, preset="gla").q_proj.bias is not None
    with pytest.raises(ValueError, match="preset must be one of"):
        spec_from_config(cfg, "mamba")
