"""The masks transformers passes on the usual calls (``model(**tokenizer(text))``, a compiled causal LM with
``use_cache=False``) carry no information beyond the spec: lincomp drops them and stays on its kernels (TVM on
the CPU), with zero fallback warnings, matching the reference."""

import copy
import warnings

import pytest
import torch

import lincomp
from lincomp import presets
from lincomp.models import linearize
from lincomp.models.modules import LinearizedAttention
from lincomp.runtime.kernel import LincompFallbackWarning
from lincomp.backends.ops import drop_trivial_padding
from lincomp.testing import rel_err

transformers = pytest.importorskip("transformers")
pytest.importorskip("tvm")

ENCODER = lincomp.AttentionSpec(window={"kind": "1d", "left": 3, "right": 3},
                                linear={"feature_map": "hedgehog", "feature_dim": 8, "normalize": True},
                                combine="shared")
LIZARD = presets.lizard(window=6, sinks=2, feature_dim=8)


def _on_reference(model):
    """A copy of a linearised model (same learned tensors: gates start random) that runs the reference."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, LinearizedAttention):
            m.target = "reference"
    return ref


def _strict():
    """Every warning raised inside the block is an error (fallbacks, copies, anything)."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error")
    return ctx


def test_drop_trivial_padding_keeps_real_padding():
    ones = torch.ones(2, 5, dtype=torch.bool)
    assert drop_trivial_padding(ones) is None and drop_trivial_padding(None) is None
    pad = ones.clone()
    pad[1, 0] = False
    assert drop_trivial_padding(pad) is pad


def test_minilm_tokenizer_call_stays_on_the_kernels(minilm):
    stock, tok = minilm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # linearize warns that attention dropout is not applied
        model = linearize(copy.deepcopy(stock), ENCODER)                     # target "auto": TVM on the CPU
    ref = _on_reference(model)
    inputs = tok("lincomp compiles attention for transformers models", return_tensors="pt")
    assert inputs["attention_mask"].all()       # the all-ones mask every tokenizer call carries
    with torch.no_grad():
        want = ref(**inputs).last_hidden_state
        ctx = _strict()
        try:
            got = model(**inputs).last_hidden_state
            again = model(**tok(["a second sentence"], return_tensors="pt")).last_hidden_state
        finally:
            ctx.__exit__(None, None, None)
    assert rel_err(got, want) < 1e-4 and torch.isfinite(again).all()


def test_minilm_real_padding_still_applies(minilm):
    """A padded batch still masks: the padded sentence equals itself alone (the mask is not dropped)."""
    stock, tok = minilm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = linearize(copy.deepcopy(stock), ENCODER, target="reference")
    texts = ["short one", "a much longer sentence that forces padding of the first"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        both = model(**batch).last_hidden_state
        alone = model(**tok(texts[:1], return_tensors="pt")).last_hidden_state
    n = alone.shape[1]
    assert rel_err(both[0, :n], alone[0]) < 1e-5


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "ones-mask"])
def test_compiled_llama_use_cache_false_stays_on_the_kernels(llama, with_mask):
    model = linearize(copy.deepcopy(llama), LIZARD)
    ref = _on_reference(model)
    torch.manual_seed(3)
    ids = torch.randint(0, 64, (2, 20))
    kw = {"attention_mask": torch.ones_like(ids)} if with_mask else {}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="lincomp", options={"inductor": False})
    with torch.no_grad():
        want = ref(ids, use_cache=False, **kw).logits
        ctx = _strict()
        try:       # compiled: transformers builds an and_mask (packed-sequence check) that lincomp reduces
            got = compiled(ids, use_cache=False, **kw).logits
            eager = model(ids, use_cache=False, **kw).logits
        finally:
            ctx.__exit__(None, None, None)
    torch._dynamo.reset()
    assert rel_err(got, want) < 1e-4 and rel_err(eager, want) < 1e-4


def _left_padded(ids):
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return mask


def test_real_left_padding_stays_on_the_kernels(llama):
    """A real key-padding mask (left padding) runs on the TVM kernels, no fallback, matching the reference."""
    model = linearize(copy.deepcopy(llama), LIZARD)
    ref = _on_reference(model)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        want = ref(ids, attention_mask=_left_padded(ids), use_cache=False).logits
        ctx = _strict()
        try:
            got = model(ids, attention_mask=_left_padded(ids), use_cache=False).logits
        finally:
            ctx.__exit__(None, None, None)
    assert rel_err(got, want) < 1e-4


def test_fallback_counter_sees_a_real_refusal(llama):
    """The strict checks above can fail: padding with an elu1 map (phi(0) != 0) makes TVM fall back loudly."""
    spec = lincomp.AttentionSpec(causal=True, linear={"feature_map": "elu1", "normalize": True})
    model = linearize(copy.deepcopy(llama), spec)
    ids = torch.randint(0, 64, (2, 12))
    with pytest.warns(LincompFallbackWarning, match="key_padding_mask"), torch.no_grad():
        model(ids, attention_mask=_left_padded(ids), use_cache=False)


def test_stock_minilm_through_the_backend_stays_on_the_kernels(minilm):
    """torch.compile(backend="lincomp") on the stock model: the traced all-ones SDPA mask is reduced and dropped."""
    stock, tok = minilm
    spec = lincomp.AttentionSpec(window={"kind": "1d", "left": 2, "right": 2})
    inputs = tok("the backend rewrites scaled_dot_product_attention", return_tensors="pt")
    torch._dynamo.reset()
    with torch.no_grad():
        want = torch.compile(stock, backend="lincomp", options={"spec": spec, "target": "reference",
                                                                "inductor": False})(**inputs).last_hidden_state
        torch._dynamo.reset()
        compiled = torch.compile(stock, backend="lincomp", options={"spec": spec, "inductor": False})
        ctx = _strict()
        try:
            got = compiled(**inputs).last_hidden_state
        finally:
            ctx.__exit__(None, None, None)
    torch._dynamo.reset()
    assert rel_err(got, want) < 1e-4
