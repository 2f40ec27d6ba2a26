"""Chunked prefill: a multi-token prompt goes through the forward kernel once and fills the decoder state
(``(S, z)`` from ``return_state``, the window's last keys, the prefix tokens), and decoding from there gives
what token-by-token prefill gives. Tiny random Llama (GQA: 4 query heads, 2 key/value heads), Lizard spec
with a 6-token window and 2 sinks; prompts around the window size."""

import dataclasses

import pytest
import torch

from lincomp import presets
from lincomp.reference import ReferenceDecoder

transformers = pytest.importorskip("transformers")
LIZARD = presets.lizard(window=6, sinks=2, feature_dim=8)
PREFIXED = dataclasses.replace(LIZARD, prefix=2)


def _decoders(target):
    if target == "reference":
        return [ReferenceDecoder]
    pytest.importorskip("tvm")
    from lincomp.lower.tvm import TVMDecoder
    return [TVMDecoder]


def _count_steps(monkeypatch, classes) -> dict:
    """Wrap each decoder class's ``step`` with a call counter."""
    calls = {"step": 0}
    for cls in classes:
        step = cls.step

        def counted(self, *a, _step=step, **kw):
            calls["step"] += 1
            return _step(self, *a, **kw)
        monkeypatch.setattr(cls, "step", counted)
    return calls


def _generate(model, ids, **kw):
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None,
                         output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("target", ["reference", "auto"])
@pytest.mark.parametrize("spec", [LIZARD, PREFIXED], ids=["lizard", "lizard-prefix2"])
@pytest.mark.parametrize("n", [2, 5, 6, 7, 13])
def test_chunked_prefill_generates_what_token_by_token_prefill_does(linearised_llama, monkeypatch, target, spec, n):
    classes = _decoders(target)
    model = linearised_llama(spec, target)
    ids = torch.randint(3, 64, (2, n), generator=torch.Generator().manual_seed(n))
    calls = _count_steps(monkeypatch, classes)
    chunked, chunked_logits = _generate(model, ids)
    layers = model.config.num_hidden_layers
    assert calls["step"] == layers * 4, calls   # the prompt (and token 1) went through prefill; 4 single steps
    for cls in classes:                         # token-by-token: the decoders without prefill
        monkeypatch.delattr(cls, "prefill")
    calls["step"] = 0
    stepped, stepped_logits = _generate(model, ids)
    assert calls["step"] == layers * (n + 4)
    assert torch.equal(chunked, stepped)
    torch.testing.assert_close(chunked_logits, stepped_logits, rtol=1e-4, atol=1e-4)


def test_left_padded_batch_prefills_each_row(linearised_llama, monkeypatch):
    model = linearised_llama(LIZARD)
    short, long = (torch.randint(3, 64, (1, n), generator=torch.Generator().manual_seed(n)) for n in (4, 11))
    batch = torch.cat([torch.cat([torch.zeros(1, 7, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :7] = 0
    calls = _count_steps(monkeypatch, [ReferenceDecoder])
    out, _ = _generate(model, batch, attention_mask=mask)
    assert calls["step"] == 2 * 2 * 4                     # 2 layers x 2 rows x 4 single steps
    assert torch.equal(out[0, 11:], _generate(model, short)[0][0, 4:])
    assert torch.equal(out[1, 11:], _generate(model, long)[0][0, 11:])


@pytest.mark.parametrize("target", ["reference", "tvm"])
@pytest.mark.parametrize("spec,stepped", [(presets.gla("scalar"), 0), (LIZARD, 7)], ids=["gla", "lizard"])
def test_second_chunk_on_a_filled_decoder(monkeypatch, target, spec, stepped):
    """A window-free spec carries (S, z) into the kernel's initial_state; a windowed one steps the second
    chunk token by token (the kernel cannot see the previous chunk's keys). Both equal all-steps decoding."""
    cls = _decoders("reference" if target == "reference" else "auto")[0]
    B, H, Hkv, D, n, split = 2, 4, 2, 16, 12, 5
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(B, H, n, D, generator=gen), torch.randn(B, Hkv, n, D, generator=gen), \
        torch.randn(B, Hkv, n, D, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(B, H, n, generator=gen) + 3)
    w = {}
    if spec.linear.has_weights:
        w = {"feature_weight_q": 0.3 * torch.randn(H, D, 8, generator=gen),
             "feature_weight_k": 0.3 * torch.randn(H, D, 8, generator=gen)}
    if spec.sinks:
        w["sink_logits"] = torch.randn(H, spec.sinks, generator=gen)
    if spec.combine == "sum":
        w["alpha"] = torch.rand(H, generator=gen) + 0.5
    one = cls(spec, **w)
    expect = torch.cat([one.step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], g[:, :, i:i + 1])
                        for i in range(n)], 2)
    dec = cls(spec, **w)
    calls = _count_steps(monkeypatch, [cls])
    got = torch.cat([dec.prefill(q[:, :, :split], k[:, :, :split], v[:, :, :split], g[:, :, :split]),
                     dec.prefill(q[:, :, split:], k[:, :, split:], v[:, :, split:], g[:, :, split:])], 2)
    assert calls["step"] == stepped and dec.t == n
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
