"""lincomp.linearize on tiny random Llama / Flux and the real all-MiniLM-L6-v2: outputs against the reference,
gradients into the learned parts, teacher mode, attention capture, compiled == eager, zero graph breaks."""

import copy
import warnings

import pytest
import torch

import lincomp
from lincomp import presets
from lincomp.backends import lincomp_backend, rewrite_report
from lincomp.models import (attention_modules, capture_attention, learned_parameters, linearize,
                            set_attention_mode)
from lincomp.models.modules import LinearizedAttention


def learned_modules(model):
    return [m for m in model.modules() if isinstance(m, LinearizedAttention)]
from lincomp.reference import window_mask
from lincomp.testing import rel_err

transformers = pytest.importorskip("transformers")

LIZARD = presets.lizard(window=6, sinks=2, feature_dim=8)
LOLCATS = presets.lolcats(block=4, feature_dim=8)
ENCODER = lincomp.AttentionSpec(window={"kind": "1d", "left": 3, "right": 3},
                                linear={"feature_map": "hedgehog", "feature_dim": 8, "normalize": True},
                                combine="shared")


@pytest.fixture(autouse=True)
def _quiet():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def flux():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                             pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()
    return model


def _flux_inputs(Hg=4, Wg=6, T=5):
    g = torch.Generator().manual_seed(1)
    ar = [torch.zeros(1), torch.arange(Hg).float(), torch.arange(Wg).float()]
    img_ids = torch.stack(torch.meshgrid(*ar, indexing="ij"), -1).reshape(-1, 3)
    return dict(hidden_states=torch.randn(1, Hg * Wg, 8, generator=g), encoder_hidden_states=torch.randn(1, T, 16, generator=g),
                pooled_projections=torch.randn(1, 8, generator=g), timestep=torch.tensor([0.5]), img_ids=img_ids,
                txt_ids=torch.zeros(T, 3), joint_attention_kwargs={"lincomp_grid": (Hg, Wg)})


# ---------------------------------------------------------------------------------------- Llama
@pytest.mark.parametrize("spec", [LIZARD, LOLCATS], ids=["lizard", "lolcats"])
def test_llama_student_matches_reference_and_trains(llama, spec):
    model = linearize(copy.deepcopy(llama), spec, target="reference")
    ids = torch.randint(0, 64, (2, 20))
    caps = {}
    with capture_attention(model) as rec:
        out = model(ids).logits
        caps.update(rec)
    layer = model.model.layers[0].self_attn
    assert isinstance(layer.lincomp, LinearizedAttention) and layer.lincomp.spec.causal
    assert set(caps) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert caps["model.layers.0.self_attn"].shape == (2, 20, 32)
    # Gradients reach every learned part, and those are exactly what linearize added.
    added = {n for n, _ in model.named_parameters()} - {n for n, _ in llama.named_parameters()}
    learned = list(learned_parameters(model))
    assert {id(p) for p in learned} == {id(p) for n, p in model.named_parameters() if n in added}
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned)


def test_llama_attention_equals_reference_on_the_layer_inputs(llama):
    model = linearize(copy.deepcopy(llama), LIZARD, target="reference")
    attn = model.model.layers[1].self_attn
    seen = {}

    def grab(mod, args, kwargs):
        seen["x"] = kwargs["hidden_states"]
        seen["pos"] = kwargs["position_embeddings"]
    h = attn.register_forward_pre_hook(grab, with_kwargs=True)
    ids = torch.randint(0, 64, (1, 18))
    with capture_attention(model) as rec, torch.no_grad():
        model(ids)
    h.remove()
    x, (cos, sin) = seen["x"], seen["pos"]
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    q = attn.q_proj(x).view(1, 18, -1, 8).transpose(1, 2)
    k = attn.k_proj(x).view(1, 18, -1, 8).transpose(1, 2)
    v = attn.v_proj(x).view(1, 18, -1, 8).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    with torch.no_grad():
        want = lincomp.reference(attn.lincomp.spec, q, k, v, scale=attn.scaling, **attn.lincomp.tensors(x))
    assert rel_err(rec["model.layers.1.self_attn"], want.transpose(1, 2).flatten(2)) < 1e-6


def test_llama_teacher_mode_is_the_stock_model(llama):
    model = linearize(copy.deepcopy(llama), LOLCATS, target="reference")
    ids = torch.randint(0, 64, (2, 16))
    pad = torch.ones(2, 16, dtype=torch.long)
    pad[0, :3] = 0
    with torch.no_grad():
        stock = llama(ids, attention_mask=pad).logits
        set_attention_mode(model, "teacher")
        assert rel_err(model(ids, attention_mask=pad).logits, stock) < 1e-6
        with capture_attention(model) as t_caps, capture_attention(llama) as s_caps:
            model(ids)
            llama(ids)
        assert all(rel_err(t_caps[n], s_caps[n]) < 1e-6 for n in s_caps)
        set_attention_mode(model, "student")
        assert rel_err(model(ids).logits, llama(ids).logits) > 1e-3
        eager = copy.deepcopy(llama)               # an eager teacher takes causality from its mask only
        eager.set_attn_implementation("eager")
        student = set_attention_mode(linearize(copy.deepcopy(eager), LOLCATS, target="reference"), "teacher")
        for mask in (None, pad):
            assert rel_err(student(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits) < 1e-6


def test_llama_compiled_equals_eager_with_zero_graph_breaks(llama):
    model = linearize(copy.deepcopy(llama), LIZARD, target="reference")
    ids = torch.randint(0, 64, (1, 24))
    with torch.no_grad():
        eager = model(ids).logits
        explained = torch._dynamo.explain(model)(ids)
        assert explained.graph_break_count == 0
        torch._dynamo.reset()
        rewrite_report(clear=True)
        for lin in learned_modules(model):
            lin.target = "auto"
        targets = []

        def inspecting(gm, example_inputs):   # the backend's "target" option re-targets linearised layers
            out = lincomp_backend(gm, example_inputs, {"target": "reference", "inductor": False})
            targets.extend(n.args[12] if len(n.args) > 12 else n.kwargs["target"] for n in gm.graph.nodes
                           if n.op == "call_function" and "lincomp" in str(n.target))
            return out
        assert rel_err(torch.compile(model, backend=inspecting)(ids).logits, eager) < 1e-6
    assert targets == ["reference", "reference"]
    report = rewrite_report(clear=True)
    assert [r["action"] for r in report] == ["lincomp", "lincomp"]


# --------------------------------------------------------------------------------------- MiniLM
def test_minilm_linearised_matches_reference_with_padding(minilm):
    stock, tok = minilm
    model = linearize(copy.deepcopy(stock), ENCODER, target="reference")
    texts = ["lincomp compiles attention", "a longer sentence about linear attention kernels and their compilers"]
    batch = tok(texts, padding=True, return_tensors="pt")
    alone = tok(texts[:1], return_tensors="pt")
    n = alone["input_ids"].shape[1]
    with torch.no_grad():
        both = model(**batch).last_hidden_state
        single = model(**alone).last_hidden_state
        # Padding invariance: the padded sentence sees exactly what it sees alone.
        assert rel_err(both[0, :n], single[0]) < 1e-5
        compiled = torch.compile(model, backend="lincomp", options={"inductor": False})
        assert rel_err(compiled(**batch).last_hidden_state, both) < 1e-6
        set_attention_mode(model, "teacher")
        assert rel_err(model(**batch).last_hidden_state[1], stock(**batch).last_hidden_state[1]) < 1e-6
    set_attention_mode(model, "student")
    out = model(**batch).last_hidden_state
    out.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned_parameters(model))
    lin = model.encoder.layer[0].attention.self.lincomp
    assert torch.allclose(torch.sigmoid(lin.window_factor), torch.full((12,), 0.1))     # LoLCATs init
    assert torch.equal(lin.feature_q.weight[0], torch.eye(32, 8))                     # identity-like init


def test_minilm_stock_window_spec_through_the_backend(minilm):
    stock, tok = minilm
    spec = lincomp.AttentionSpec(window={"kind": "1d", "left": 2, "right": 2})
    batch = tok(["short", "a somewhat longer sentence for padding"], padding=True, return_tensors="pt")
    L = batch["input_ids"].shape[1]
    mask = window_mask(spec, L)[None, None] & batch["attention_mask"].bool()[:, None, None, :]
    with torch.no_grad():
        want = stock(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        got = torch.compile(stock, backend="lincomp", options={"spec": spec, "target": "reference",
                                                              "inductor": False})(**batch).last_hidden_state
    valid = batch["attention_mask"].bool()
    assert rel_err(got[valid], want[valid]) < 1e-5
    torch._dynamo.reset()
    assert torch._dynamo.explain(stock)(**batch).graph_break_count == 0


# ----------------------------------------------------------------------------------------- Flux
def _flux_expected(model, spec, inputs, grid=None):
    """The stock processors with the spec's visibility as an explicit mask (CLEAR has no learned parts)."""
    T, L = inputs["encoder_hidden_states"].shape[1], inputs["hidden_states"].shape[1]
    full = spec.with_grid(grid or inputs["joint_attention_kwargs"]["lincomp_grid"])
    full = lincomp.AttentionSpec(window=full.window, prefix=T)
    mask = window_mask(full, T + L)[None, None]
    stock = copy.deepcopy(model)
    for _, m in attention_modules(stock):
        orig = m.processor
        m.set_processor(lambda attn, h, e=None, attention_mask=None, image_rotary_emb=None, _o=orig:
                        _o(attn, h, e, mask, image_rotary_emb))
    kw = {k: v for k, v in inputs.items() if k != "joint_attention_kwargs"}
    with torch.no_grad():
        return stock(**kw).sample


def test_flux_clear_matches_masked_stock_attention(flux):
    spec = presets.clear(radius=2, grid=(1, 1), text_tokens=0)
    inputs = _flux_inputs()
    model = linearize(copy.deepcopy(flux), spec, target="reference")
    with torch.no_grad():
        out = model(**inputs).sample
        assert rel_err(out, _flux_expected(flux, spec, inputs)) < 1e-5
        explained = torch._dynamo.explain(model)(**inputs)
        assert explained.graph_break_count == 0
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="lincomp", options={"inductor": False})
        assert rel_err(compiled(**inputs).sample, out) < 1e-6
        set_attention_mode(model, "teacher")
        kw = {k: v for k, v in inputs.items() if k != "joint_attention_kwargs"}
        assert rel_err(model(**inputs).sample, flux(**kw).sample) < 1e-6
    assert list(learned_parameters(model)) == []


def test_flux_learned_spec_captures_and_trains(flux):
    spec = lincomp.AttentionSpec(window={"kind": "2d", "grid": [1, 1], "radius": 2},
                                 linear={"feature_map": "hedgehog", "feature_dim": 4, "normalize": True},
                                 combine="shared")
    model = linearize(copy.deepcopy(flux), spec, target="reference")
    inputs = _flux_inputs(Hg=4, Wg=4, T=3)
    del inputs["joint_attention_kwargs"]   # a square image: the grid is inferred
    with capture_attention(model) as caps:
        out = model(**inputs).sample
    assert set(caps) == {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"}
    assert all(t.shape == (1, 19, 16) for t in caps.values())
    out.pow(2).mean().backward()
    learned = list(learned_parameters(model))
    assert len(learned) == 2 * 3 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned)


def _check_flux_grid(flux, spec, model, Hg, Wg):
    """``model`` (linearised ``flux``) called without joint_attention_kwargs on an Hg x Wg image attends on that grid."""
    inputs = _flux_inputs(Hg=Hg, Wg=Wg)
    del inputs["joint_attention_kwargs"]
    with torch.no_grad():
        assert rel_err(model(**inputs).sample, _flux_expected(flux, spec, inputs, grid=(Hg, Wg))) < 1e-5
    return inputs


def test_flux_grid_from_img_ids_for_any_aspect_ratio(flux):
    """No joint_attention_kwargs: a 4 x 6 image's grid is read off img_ids (the spec's grid is for another size)."""
    spec = presets.clear(radius=2, grid=(8, 8), text_tokens=0)
    model = linearize(copy.deepcopy(flux), spec, target="reference")
    _check_flux_grid(flux, spec, model, 4, 6)
    _check_flux_grid(flux, spec, model, 6, 4)   # the same token count, transposed: a different mask


def test_flux_uses_the_specs_own_grid_and_checks_it_against_img_ids(flux):
    spec = presets.clear(radius=2, grid=(4, 6), text_tokens=0)
    inputs = _check_flux_grid(flux, spec, linearize(copy.deepcopy(flux), spec, target="reference"), 4, 6)
    with torch.no_grad():
        wrong = linearize(copy.deepcopy(flux), presets.clear(radius=2, grid=(6, 4), text_tokens=0), target="reference")
        with pytest.raises(ValueError, match=r"spec's grid \[6, 4\].*img_ids lay them out as \[4, 6\]"):
            wrong(**inputs)


def test_compile_patterns_match_diffusers_module_names(flux):
    """torch.compile(stock Flux, backend="lincomp") with per-block patterns: both kinds of block are replaced, the
    output is the stock model's under the spec's mask, and a pattern that matches nothing warns."""
    T, Hg, Wg = 5, 4, 6
    spec = presets.clear(radius=2, grid=(Hg, Wg), text_tokens=T)
    inputs = _flux_inputs(Hg=Hg, Wg=Wg, T=T)
    del inputs["joint_attention_kwargs"]
    options = {"spec": {"transformer_blocks.*.attn": spec, "single_transformer_blocks.*.attn": spec,
                        "model.layers.*.self_attn": spec}, "inductor": False, "target": "reference"}
    rewrite_report(clear=True)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(copy.deepcopy(flux), backend="lincomp", options=options)(**inputs).sample
    sites = {r["site"]: r["action"] for r in rewrite_report()}
    assert sites == {"transformer_blocks.0.attn": "replaced", "single_transformer_blocks.0.attn": "replaced"}
    unmatched = [str(w.message) for w in caught if "matches none" in str(w.message)]
    assert len(unmatched) == 1 and "'model.layers.*.self_attn'" in unmatched[0]
    assert "'transformer_blocks.0.attn'" in unmatched[0]
    assert rel_err(out, _flux_expected(flux, spec, dict(inputs, joint_attention_kwargs={}), grid=(Hg, Wg))) < 1e-5


# ----------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_give_clear_errors(llama, flux):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        linearize("model", LIZARD)
    with pytest.raises(ValueError, match="no attention layers"):
        linearize(torch.nn.Linear(2, 2), LIZARD)
    with pytest.raises(ValueError, match="linear.feature_map"):
        linearize(copy.deepcopy(llama), {"linear": {"feature_map": "cosine"}, "causal": True})
    model = linearize(copy.deepcopy(llama), {"model.layers.0.*": LIZARD})
    assert not hasattr(model.model.layers[1].self_attn, "lincomp")
    with pytest.raises(ValueError, match="already linearised"):
        linearize(model, LIZARD)
    with pytest.raises(ValueError, match="no attention layer matched"):
        linearize(copy.deepcopy(llama), {"decoder.*": LIZARD})
    with pytest.raises(ValueError, match="mode must be one of"):
        set_attention_mode(model, "softmax")
    with pytest.raises(ValueError, match="linearised model"):
        set_attention_mode(llama, "teacher")
    f = linearize(copy.deepcopy(flux), presets.clear(radius=2, grid=(1, 1), text_tokens=0), target="reference")
    inputs = _flux_inputs(Hg=4, Wg=6)
    del inputs["joint_attention_kwargs"]
    inputs["img_ids"] = inputs["img_ids"].flip(0)   # not row-major: no grid to read off
    with pytest.raises(ValueError, match="row-major.*lincomp_grid"):
        f(**inputs)
    del inputs["img_ids"], inputs["txt_ids"]        # no ids at all (e.g. a custom caller): only squares infer
    for m in attention_modules(f):
        m[1].processor.shared.clear()
    with pytest.raises(ValueError, match="not a square, no img_ids.*lincomp_grid"):
        f.transformer_blocks[0].attn(torch.randn(1, 24, 16), torch.randn(1, 5, 16))


@pytest.mark.slow
def test_llama_inductor_training_matches_eager_gradients(llama):
    """Inductor + AOTAutograd: the backward of torch.ops.lincomp.attention runs as its own opaque op."""
    model = linearize(copy.deepcopy(llama), LOLCATS, target="reference")
    model.train()
    ids = torch.randint(0, 64, (2, 16))
    learned = list(learned_parameters(model))
    eager = model(ids).logits
    want = torch.autograd.grad(eager.pow(2).mean(), learned)
    out = torch.compile(model, backend="lincomp")(ids).logits
    got = torch.autograd.grad(out.pow(2).mean(), learned)
    assert rel_err(out, eager) < 1e-5
    assert max(rel_err(a, b) for a, b in zip(got, want)) < 1e-4
