"""Issue 19: SDPA masks the torch.compile backend accepts as key padding: a 2D [L, L] (or 3D) attn_mask that
SDPA broadcasts, and old-style additive masks with -1e4 (BERT) instead of -inf / finfo.min."""

import pytest
import torch
import torch.nn.functional as F

import lincomp
from lincomp import presets
from lincomp.backends import ops  # noqa: F401  (registers torch.ops.lincomp.*)
from lincomp.testing import rel_err

SWA = presets.sliding_window(6)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _kpm(mask, causal=True):
    return torch.ops.lincomp.key_padding_mask(mask, causal, True)


@pytest.mark.parametrize("shape", [(8, 8), (1, 8, 8), (2, 8, 8), (1, 1, 8, 8)])
def test_causal_masks_of_2_to_4_dims(shape):
    mask = torch.ones(8, 8, dtype=torch.bool).tril().expand(shape)
    assert _kpm(mask).shape == (1, 8) and bool(_kpm(mask).all())


def test_additive_minus_1e4_padding_is_padding_not_a_bias():
    """Issue 19 repro: an old-style -1e4 additive padding mask was called "a bias"."""
    pad = torch.tensor([[True] * 6 + [False] * 2])
    for big in (-1e4, -1e9, torch.finfo(torch.float32).min, float("-inf")):
        add = torch.where(pad, 0.0, big)[:, None, None, :].expand(1, 1, 8, 8)
        assert torch.equal(_kpm(add, causal=False), pad)
    with pytest.raises(ValueError, match="bias"):
        _kpm(torch.where(pad, 0.0, -50.0)[:, None, None, :].expand(1, 1, 8, 8), causal=False)


def test_compiled_sdpa_with_a_2d_mask():
    """Issue 19 repro: a 2D [L, L] attn_mask (SDPA accepts it) was rejected by the backend."""
    def f(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    compiled = torch.compile(f, backend="lincomp", options={"spec": SWA, "target": "reference", "inductor": False})
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    assert rel_err(compiled(q, k, v, mask), lincomp.reference(SWA, q, k, v)) < 1e-6
    additive = torch.zeros(8, 8).masked_fill(~mask, -1e4)
    assert rel_err(compiled(q, k, v, additive), lincomp.reference(SWA, q, k, v)) < 1e-6
