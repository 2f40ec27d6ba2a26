"""torch.compile(backend="lincomp"): SDPA call sites rewritten to lincomp ops, options, graph breaks, recompiles."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import lincomp
from lincomp import presets
from lincomp.backends import dynamo, lincomp_backend, parse_options, rewrite_report
from lincomp.documents import cu_seqlens_of, document_ids
from lincomp.reference import window_mask
from lincomp.testing import rel_err

transformers = pytest.importorskip("transformers")

SWA = presets.sliding_window(6)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    rewrite_report(clear=True)
    yield
    torch._dynamo.reset()


def _masked_logits(model, ids, spec, padding=None):
    """The stock model with the spec's visibility (and padding) given as an explicit 4D SDPA mask."""
    mask = window_mask(spec, ids.shape[1])[None, None]
    if padding is not None:
        mask = mask & padding.bool()[:, None, None, :]
    with torch.no_grad():
        return model(ids, attention_mask=mask.expand(ids.shape[0], 1, -1, -1)).logits


def _compiled(model, **options):
    options.setdefault("target", "reference")
    options.setdefault("inductor", False)
    return torch.compile(model, backend="lincomp", options=options)


def test_entry_point_in_a_fresh_process():
    code = textwrap.dedent("""
        import sys, torch
        import torch.nn.functional as F
        assert "lincomp" not in sys.modules
        f = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2
        q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
        spec = {"window": {"kind": "1d", "left": 3, "right": 0}, "causal": True}
        out = torch.compile(f, backend="lincomp", options={"spec": spec, "target": "reference", "inductor": False})(q, k, v)
        import lincomp
        err = ((out - 2 * lincomp.reference(spec, q, k, v)).norm() / out.norm()).item()
        print("OK", err)
    """)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.split("OK")[1]) < 1e-6


@pytest.mark.parametrize("is_causal,scale,gqa", [(True, None, True), (False, 0.2, False)])
def test_function_call_sites(is_causal, scale, gqa):
    q = torch.randn(2, 4, 10, 8)
    k, v = (torch.randn(2, 2 if gqa else 4, 10, 8) for _ in range(2))

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=gqa) + 1
    spec = lincomp.AttentionSpec(window={"kind": "1d", "left": 2, "right": 1})
    out = _compiled(f, spec=spec)(q, k, v)
    effective = lincomp.AttentionSpec(window=spec.window, causal=is_causal)   # is_causal makes the spec causal
    assert rel_err(out, lincomp.reference(effective, q, k, v, scale=scale) + 1) < 1e-6
    assert [r["action"] for r in rewrite_report()] == ["replaced"]


def test_llama_with_padding_and_repeated_kv(llama):
    ids = torch.randint(0, 64, (2, 20))
    pad = torch.ones(2, 20, dtype=torch.long)
    pad[0, :4] = 0
    seen = {}

    def inspecting(gm, example_inputs):
        out = lincomp_backend(gm, example_inputs, options={"spec": SWA, "target": "reference", "inductor": False})
        seen["kv_heads"] = [n.args[1].meta["example_value"].shape[1] for n in gm.graph.nodes
                            if n.target is torch.ops.lincomp.attention.default]
        return out
    with torch.no_grad():
        out = torch.compile(llama, backend=inspecting)(ids, attention_mask=pad).logits
    want = _masked_logits(llama, ids, SWA, pad)
    assert rel_err(out[1], want[1]) < 1e-5 and rel_err(out[0, 4:], want[0, 4:]) < 1e-5
    assert seen["kv_heads"] == [2, 2]   # repeat_kv undone: the kernel reads the 2 key/value heads


def test_inductor_compiles_the_rest_of_the_graph():
    w1, w2 = torch.randn(16, 16), torch.randn(16, 16)

    def block(x):
        q = k = v = (x @ w1).unflatten(-1, (2, 8)).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.relu(o.transpose(1, 2).flatten(2) @ w2)
    x = torch.randn(2, 12, 16)
    seen = {}

    def inspecting(gm, example_inputs):
        seen["compiled"] = lincomp_backend(gm, example_inputs, options={"spec": SWA, "target": "reference"})
        return seen["compiled"]
    out = torch.compile(block, backend=inspecting)(x)
    assert not isinstance(seen["compiled"], torch.fx.GraphModule)   # Inductor's compiled callable
    q = (x @ w1).unflatten(-1, (2, 8)).transpose(1, 2)
    want = torch.relu(lincomp.reference(SWA, q, q, q).transpose(1, 2).flatten(2) @ w2)
    assert rel_err(out, want) < 1e-5


@pytest.mark.slow
def test_llama_inductor_end_to_end(llama):
    ids = torch.randint(0, 64, (1, 24))
    with torch.no_grad():
        out = torch.compile(llama, backend="lincomp", options={"spec": SWA, "target": "reference"})(ids).logits
    assert rel_err(out, _masked_logits(llama, ids, SWA)) < 1e-5
    assert [r["action"] for r in rewrite_report()] == ["replaced", "replaced"]


def test_zero_graph_breaks_and_no_recompile_for_a_new_length(llama):
    ids = torch.randint(0, 64, (1, 24))
    explained = torch._dynamo.explain(llama)(ids)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(1)
        return lincomp_backend(gm, example_inputs, options={"spec": SWA, "target": "reference", "inductor": False})
    compiled = torch.compile(llama, backend=counting)
    with torch.no_grad():
        for L in (24, 40, 33):
            ids = torch.randint(0, 64, (1, L))
            torch._dynamo.mark_dynamic(ids, 1)
            out = compiled(ids).logits
            assert rel_err(out, _masked_logits(llama, ids, SWA)) < 1e-5
    assert len(compiles) == 1


def test_dynamic_true_traced_scale_compiles_once_for_every_length(llama):
    """dynamic=True makes Llama's float ``scaling`` a traced graph value: it is passed to the op (Inductor then has
    Dynamo specialise it inside the first compilation), and later lengths reuse the graph."""
    lengths = []

    def counting(gm, example_inputs):
        lengths.append(current)
        return lincomp_backend(gm, example_inputs, options={"spec": SWA, "target": "reference"})
    compiled = torch.compile(llama, backend=counting, dynamic=True)
    with torch.no_grad():
        for current in (24, 40, 33):
            ids = torch.randint(0, 64, (1, current))
            assert rel_err(compiled(ids).logits, _masked_logits(llama, ids, SWA)) < 1e-5
    assert set(lengths) == {24}   # every compilation (a float-specialising restart included) at the first length


def test_pattern_mapping_and_callable_choose_per_site(llama):
    ids = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        _compiled(llama, spec={"model.layers.0.*": SWA, "*": None})(ids)
    assert [r["action"] for r in rewrite_report(clear=True)] == ["replaced", "kept"]
    torch._dynamo.reset()
    sites = []

    def choose(site):
        sites.append(site)
        return SWA if site.name.endswith("1.self_attn") else None
    with torch.no_grad():
        _compiled(llama, spec=choose)(ids)
    assert [s.name for s in sites] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert sites[0].q_shape == (1, 4, 16, 8) and sites[0].is_causal and sites[0].enable_gqa
    assert [r["action"] for r in rewrite_report()] == ["kept", "replaced"]


def test_unsupported_call_sites_are_rejected_or_kept(llama):
    ids = torch.randint(0, 64, (1, 16))
    with pytest.raises(Exception, match="needs learned tensors.*lincomp.linearize"):
        _compiled(llama, spec=presets.lizard(window=4, feature_dim=4))(ids)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="keeping SDPA"), torch.no_grad():
        out = _compiled(llama, spec=presets.lizard(window=4, feature_dim=4), unsupported="keep")(ids).logits
        assert rel_err(out, llama(ids).logits) < 1e-6
    torch._dynamo.reset()
    with pytest.raises(Exception, match="with_grid"):
        _compiled(llama, spec=presets.clear(radius=2, grid=(3, 3), text_tokens=2))(ids)


def test_a_mask_that_is_not_padding_raises_at_run_time():
    def f(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    compiled = _compiled(f, spec=SWA)
    padding = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    assert rel_err(compiled(q, k, v, padding), lincomp.reference(SWA, q, k, v)) < 1e-6
    band = torch.ones(8, 8, dtype=torch.bool).tril() & torch.ones(8, 8, dtype=torch.bool).triu(-2)
    with pytest.raises(ValueError, match="not a key-padding mask"):   # a sliding window, not documents
        compiled(q, k, v, band[None, None])


def _packed_mask(lengths, causal=True, dtype=torch.bool):
    doc = document_ids(cu_seqlens_of(lengths), sum(lengths))
    mask = doc[:, None] == doc[None, :]
    if causal:
        mask = mask & torch.ones(len(doc), len(doc), dtype=torch.bool).tril()
    if dtype != torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    return mask[None, None]


@pytest.mark.parametrize("spec", [SWA, {"causal": True, "linear": {"feature_map": "elu1", "normalize": True}}],
                         ids=["swa", "linear"])
def test_llama_packed_row_block_diagonal_mask_equals_documents_one_by_one(llama, spec):
    """transformers' packed-sequence SDPA mask (block diagonal, causal blocks) reaches the kernels as cu_seqlens."""
    lengths = [5, 1, 9, 4]
    ids = torch.randint(0, 64, (1, sum(lengths)), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    compiled = _compiled(llama, spec=spec)
    with torch.no_grad():
        packed = compiled(ids, attention_mask=_packed_mask(lengths), position_ids=pos).logits
        edges = cu_seqlens_of(lengths).tolist()
        alone = torch.cat([compiled(ids[:, a:b]).logits for a, b in zip(edges, edges[1:])], 1)
        whole = compiled(ids).logits
    assert rel_err(packed, alone) < 1e-5
    assert rel_err(whole, alone) > 1e-2      # one long document differs: the comparison can fail
    # a block that is not causal, or a causal mask with a hole, is no packed row for a causal spec: clear error
    holed = _packed_mask(lengths).clone()
    holed[0, 0, 12, 10] = False
    for bad in (_packed_mask(lengths, causal=False), holed):
        with pytest.raises(ValueError, match="not a key-padding mask"):
            compiled(ids, attention_mask=bad, position_ids=pos)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_mask_through_a_compiled_call_site_with_gradients(causal):
    """Float (additive) and bool block-diagonal masks, causal and not: output and q/k/v gradients == the reference
    with cu_seqlens; a padded batch through the same graph still gets its key-padding mask."""
    lengths = [3, 1, 6, 2]
    spec = lincomp.AttentionSpec(window={"kind": "1d", "left": 2, "right": 0 if causal else 2}, causal=causal)

    def f(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    compiled = _compiled(f, spec=spec)
    for dtype in (torch.bool, torch.float32):
        q, k, v = (torch.randn(1, 2, sum(lengths), 4, requires_grad=True) for _ in range(3))
        out = compiled(q, k, v, _packed_mask(lengths, causal, dtype))
        want = lincomp.reference(spec, q, k, v, cu_seqlens=cu_seqlens_of(lengths))
        assert rel_err(out, want) < 1e-6
        probe = torch.randn_like(want)
        got = torch.autograd.grad((out * probe).sum(), (q, k, v))
        ref = torch.autograd.grad((want * probe).sum(), (q, k, v))
        assert all(rel_err(a, b) < 1e-6 for a, b in zip(got, ref))
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    pad = torch.tensor([[True] * 6, [False] * 2 + [True] * 4])
    mask = pad[:, None, None, :] & (torch.ones(6, 6, dtype=torch.bool).tril() if causal else True)
    want = lincomp.reference(spec, q, k, v, key_padding_mask=pad)
    torch._dynamo.reset()   # a fresh static graph (a recompile for new shapes would make q's and k's lengths unrelated)
    assert rel_err(_compiled(f, spec=spec)(q, k, v, mask)[1], want[1]) < 1e-6


def test_mask_documents_op():
    from lincomp.backends.ops import mask_documents
    kpm, cu = mask_documents(_packed_mask([2, 1, 3]), True)
    assert kpm.tolist() == [[True] * 6] and cu.tolist() == [0, 2, 3, 6, 6, 6, 6]
    kpm, cu = mask_documents(torch.ones(1, 1, 4, 4, dtype=torch.bool).tril(), True)     # one document: plain
    assert kpm.all() and cu.tolist() == [0, 4, 4, 4, 4]
    biased = _packed_mask([2, 2], dtype=torch.float32)
    biased[0, 0, 1, 0] = 0.5
    with pytest.raises(ValueError, match="attn_mask is not a key-padding mask"):   # a bias is no packed row
        mask_documents(biased, True)


def test_bad_options_give_clear_errors():
    with pytest.raises(ValueError, match="did you mean 'target'"):
        parse_options({"spec": SWA, "targt": "tvm"})
    with pytest.raises(ValueError, match=r"options\['target'\] must be one of"):
        parse_options({"spec": SWA, "target": "cuda"})
    with pytest.raises(ValueError, match=r"options\['fallback'\]"):
        parse_options({"spec": SWA, "fallback": "ignore"})
    with pytest.raises(TypeError, match=r"options\['spec'\] must be"):
        parse_options({"spec": 3})
    with pytest.raises(ValueError, match="window.left"):
        parse_options({"spec": {"window": {"kind": "1d", "left": -1}}})
    with pytest.raises(TypeError, match="module-name patterns"):
        parse_options({"spec": {1: SWA}})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        parse_options({"spec": SWA, "hints": {"x": object()}})
    with pytest.raises(TypeError, match="check_masks"):
        parse_options({"spec": SWA, "check_masks": "yes"})
    with pytest.raises(TypeError, match="options must be a dict"):
        parse_options([SWA])
    # Through torch.compile the same message reaches the user.
    with pytest.raises(Exception, match="did you mean 'target'"):
        torch.compile(lambda x: x * 2, backend="lincomp", options={"spec": SWA, "targt": "tvm"})(torch.ones(2))


def test_without_a_spec_sdpa_is_kept_with_a_warning():
    f = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    q = torch.randn(1, 1, 4, 4)
    with pytest.warns(UserWarning, match="no options\\['spec'\\]"):
        out = torch.compile(f, backend="lincomp", options={"inductor": False})(q, q, q)
    assert rel_err(out, f(q, q, q)) < 1e-6
    assert isinstance(dynamo.CallSite, type)
