"""layout="blhd" ([B, L, H, D], flash-attn / fla) on kernel(...) and lincomp.reference(...): the same result as
the [B, H, L, D] call, output in the caller's layout; an implausible head axis is an error, not a wrong answer."""

import dataclasses

import pytest
import torch

import lincomp
from lincomp import presets
from lincomp.layout import MAX_HEADS, check_layout
from lincomp.testing import rel_err

SPEC = dataclasses.replace(presets.lizard(window=6, sinks=2, feature_dim=8), causal=True)
B, H, HKV, L, D = 2, 4, 2, 20, 8


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, D, generator=g)
    k, v = torch.randn(B, L, HKV, D, generator=g), torch.randn(B, L, HKV, D, generator=g)
    gate = torch.nn.functional.logsigmoid(torch.randn(B, L, H, generator=g) + 3)
    weights = dict(feature_weight_q=0.3 * torch.randn(H, D, 8, generator=g),
                   feature_weight_k=0.3 * torch.randn(H, D, 8, generator=g),
                   sink_logits=torch.randn(H, 2, generator=g), alpha=torch.rand(H, generator=g) + 0.5)
    return q, k, v, gate, weights


def _want(q, k, v, gate, weights):
    """The fp64 reference on [B, H, L, D] copies, transposed back to [B, L, H, D]."""
    t = lambda x: x.transpose(1, 2).double()  # noqa: E731
    return lincomp.reference(SPEC, t(q), t(k), t(v), g=t(gate), **{n: w.double() for n, w in weights.items()}
                             ).transpose(1, 2)


def test_reference_blhd_equals_bhld():
    q, k, v, gate, weights = _inputs()
    out = lincomp.reference(SPEC, q, k, v, g=gate, layout="blhd", **weights)
    assert out.shape == (B, L, H, D) and rel_err(out, _want(q, k, v, gate, weights)) < 1e-6
    o, state = lincomp.reference(SPEC, q, k, v, g=gate, layout="blhd", return_state=True, **weights)
    assert o.shape == (B, L, H, D) and state is not None


@pytest.mark.parametrize("target", ["tvm", "triton"])
def test_kernel_blhd_equals_reference(target):
    pytest.importorskip(target)
    q, k, v, gate, weights = _inputs(1)
    if target == "triton" and not torch.cuda.is_available():
        q, k, v, gate = (t[:, :8] for t in (q, k, v, gate))   # the interpreter is slow: a short sequence
    kernel = lincomp.compile(SPEC, target)
    out = kernel(q, k, v, g=gate, layout="blhd", **weights)
    assert out.shape == q.shape[:3] + (D,)
    assert rel_err(out, _want(q, k, v, gate, weights)) < 1e-4      # docs/semantics.md fp32 tolerance vs fp64


def test_ambiguous_shapes_raise_with_the_fix():
    long_axis = torch.randn(1, MAX_HEADS + 44, 4, D)        # a [B, L, H, D] tensor passed without layout
    kernel = lincomp.compile(lincomp.AttentionSpec(window={"kind": "1d", "left": 3, "right": 0}, causal=True),
                             "reference")
    with pytest.raises(ValueError, match="layout='blhd'"):
        kernel(long_axis, long_axis, long_axis)
    with pytest.raises(ValueError, match="layout='blhd'"):
        lincomp.reference(kernel.spec, long_axis, long_axis, long_axis)
    heads_last = torch.randn(1, 4, MAX_HEADS + 44, D)       # [B, H, L, D] passed as blhd
    with pytest.raises(ValueError, match="layout='bhld'"):
        kernel(heads_last, heads_last, heads_last, layout="blhd")
    out = kernel(long_axis, long_axis, long_axis, layout="bhld")   # explicit: the caller says so
    assert out.shape == long_axis.shape
    with pytest.raises(ValueError, match="layout must be one of"):
        check_layout("bshd", long_axis)
