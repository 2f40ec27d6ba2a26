"""Generated Triton window kernels (forward + backward) against the reference oracle.

On a CPU-only machine the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); on a CUDA machine the same tests run the compiled kernels
on the GPU. Outputs are poisoned with NaN before the kernels write them. Tiny shapes: the interpreter
runs one program at a time.
"""

import json

import pytest
import torch

pytest.importorskip("triton")

from hypothesis import given, settings, strategies as st  # noqa: E402

from lincomp.ir.blocks import block_plan  # noqa: E402
from lincomp.reference import reference, window_mask  # noqa: E402
from lincomp.runtime.kernel import LincompFallbackWarning  # noqa: E402
from lincomp.spec import AttentionSpec, GridWindow  # noqa: E402
from lincomp.testing import random_inputs, rel_err, spec_strategy  # noqa: E402

pytestmark = pytest.mark.interpreter

W = pytest.importorskip("lincomp.lower.triton.window_launch")
from lincomp.lower.triton.window import render_source  # noqa: E402
from lincomp.lower.triton.window_kernel import WindowKernel, compile_window  # noqa: E402
from lincomp.lower.triton.window_op import window_attention  # noqa: E402
from lincomp.runtime.buffers import POISON_ENV  # noqa: E402
from lincomp.lower.triton.window_plan import tile_lists  # noqa: E402

GRAD_NAMES = ("q", "k", "v", "sink_logits")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    with pytest.MonkeyPatch.context() as mp:
        if DEVICE == "cpu":
            mp.setenv("TRITON_INTERPRET", "1")
        mp.setenv(POISON_ENV, "1")      # NaN in every output element a kernel forgets to write
        yield


def _inputs(spec, **kw):
    return random_inputs(spec, device=DEVICE, **kw)


def _configs(spec):
    """Tile configs worth exercising for a spec (block 16 and 32, unequal blocks for 1D)."""
    if isinstance(spec.window, GridWindow):
        return [{"block_m": 16, "block_n": 16}, {"block_m": 32, "block_n": 32}]
    return [{"block_m": 16, "block_n": 16}, {"block_m": 32, "block_n": 16}, {"block_m": 16, "block_n": 32}]


def _draw_case(data, spec, max_L=40, max_bh=2):
    B = data.draw(st.integers(1, 2), label="B")
    H = data.draw(st.sampled_from([h for h in (1, 2, 4) if B * h <= 2 * max_bh]), label="H")
    Hkv = data.draw(st.sampled_from([d for d in (1, 2, 4) if H % d == 0]), label="Hkv")
    L = data.draw(st.integers(1, max_L), label="L") if spec.expected_length() is None else None
    D = data.draw(st.sampled_from([4, 8, 16, 24]), label="D")
    cfg = data.draw(st.sampled_from(_configs(spec)), label="config")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    return dict(B=B, H=H, Hkv=Hkv, L=L, D=D, seed=seed), cfg


def _run(spec, inputs, cfg=None, grads=False, do_seed=0):
    """Kernel output (and grads of GRAD_NAMES) vs the fp64 reference's."""
    kern = compile_window(spec, config=cfg)
    leaves = {n: t.detach().clone().requires_grad_(grads and n in GRAD_NAMES) if torch.is_tensor(t) else t
              for n, t in inputs.items()}
    ref_in = {n: t.detach().double().requires_grad_(grads and n in GRAD_NAMES) if torch.is_tensor(t) and
              t.is_floating_point() else t for n, t in inputs.items()}
    o = kern(**leaves)
    r = reference(spec, **ref_in)
    if not grads:
        return o, r, None, None
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(do_seed)).to(o.device, o.dtype)
    names = [n for n in GRAD_NAMES if n in leaves]
    g = torch.autograd.grad(o, [leaves[n] for n in names], do)
    gr = torch.autograd.grad(r, [ref_in[n] for n in names], do.double())
    return o, r, dict(zip(names, g)), dict(zip(names, gr))


WINDOW_SPECS = spec_strategy(windows=("1d", "terraced", "2d", "3d", None), linear=False, hybrids=False,
                             max_prefix=5, max_grid=6)


# ----------------------------------------------------------------------------------- forward
@given(spec=WINDOW_SPECS, data=st.data())
def test_forward_matches_reference(spec, data):
    shape, cfg = _draw_case(data, spec)
    inputs = _inputs(spec, **shape)
    o, r, _, _ = _run(spec, inputs, cfg)
    assert not torch.isnan(o).any(), "a kernel left an output element unwritten (or produced NaN)"
    assert rel_err(o, r) <= 1e-4, (spec, shape, cfg, rel_err(o, r))


# ---------------------------------------------------------------------------------- backward
@settings(max_examples=10)
@given(spec=WINDOW_SPECS, data=st.data())
def test_gradients_match_reference(spec, data):
    shape, cfg = _draw_case(data, spec, max_L=24, max_bh=1)
    inputs = _inputs(spec, **shape)
    o, r, g, gr = _run(spec, inputs, cfg, grads=True, do_seed=shape["seed"])
    assert rel_err(o, r) <= 1e-4
    for name in g:
        assert rel_err(g[name], gr[name]) <= 1e-3, (name, spec, shape, cfg, rel_err(g[name], gr[name]))


TILE_SPECS = {   # sliding tiles (STA) and NATTEN neighbourhoods; aligned configs skip every mask
    "sta-2d-aligned": (AttentionSpec(window={"kind": "2d", "grid": [12, 8], "shape": "tile", "tile": [4, 4],
                                             "kernel": [3, 1]}, prefix=3, sinks=1),
                       {"block_m": 16, "block_n": 16, "tile": [4, 4]}),
    "sta-3d-aligned": (AttentionSpec(window={"kind": "3d", "grid": [3, 4, 8], "shape": "tile", "tile": [1, 2, 8],
                                             "kernel": [3, 1, 1]}),
                       {"block_m": 16, "block_n": 16, "tile": [1, 2, 8]}),
    "natten": (AttentionSpec(window={"kind": "2d", "grid": [6, 7], "shape": "tile", "tile": [1, 1],
                                     "kernel": [3, 5]}), {"block_m": 16, "block_n": 16}),
    "tile-causal": (AttentionSpec(window={"kind": "2d", "grid": [4, 8], "shape": "tile", "tile": [2, 2],
                                          "kernel": [1, 3]}, causal=True, prefix=2), {"block_m": 16, "block_n": 16}),
}


@pytest.mark.parametrize("name", list(TILE_SPECS))
def test_sliding_tiles_forward_and_gradients(name):
    spec, cfg = TILE_SPECS[name]
    inputs = _inputs(spec, B=1, H=2, Hkv=1, D=8, seed=7)
    o, r, g, gr = _run(spec, inputs, cfg, grads=True, do_seed=3)
    assert rel_err(o, r) <= 1e-4, rel_err(o, r)
    for n in g:
        assert rel_err(g[n], gr[n]) <= 1e-3, (n, rel_err(g[n], gr[n]))
    if name.endswith("aligned"):   # tiles aligned to the window's: every visited tile pair is full
        plan = block_plan(spec, spec.expected_length(), 16, tile=tuple(cfg["tile"]))
        body = plan.q_tokens.min(1).values >= spec.prefix    # tiles holding grid tokens only
        rows = torch.repeat_interleave(torch.arange(plan.num_q_tiles), plan.kv_offsets.diff().long())
        grid_pairs = body[rows] & body[plan.kv_indices.long()]
        assert grid_pairs.any() and plan.kv_full[grid_pairs].all()


@pytest.mark.parametrize("spec", [
    AttentionSpec(window={"kind": "1d", "left": 6, "right": 0}, causal=True, sinks=2),
    AttentionSpec(window={"kind": "2d", "grid": [4, 6], "radius": 2, "shape": "circle"}, prefix=3),
], ids=["swa-sinks", "clear-like"])
def test_fp16_forward_and_gradients(spec):
    inputs = _inputs(spec, B=1, H=2, Hkv=1, L=29, D=16, dtype=torch.float16, seed=5)
    o, r, g, gr = _run(spec, inputs, grads=True)
    assert o.dtype == torch.float16
    assert rel_err(o, r) <= 1e-2
    for name in g:
        assert g[name].dtype == torch.float16
        assert rel_err(g[name], gr[name]) <= 1e-2, name


# -------------------------------------------------------------------- padding, GQA, odd lengths
@pytest.mark.parametrize("sinks", [0, 2])
def test_key_padding_rows_without_keys_are_zero_and_finite(sinks):
    spec = AttentionSpec(window={"kind": "1d", "left": 3, "right": 0}, causal=True, sinks=sinks)
    L = 21
    inputs = _inputs(spec, B=2, H=2, Hkv=1, L=L, D=8, seed=11)
    kpm = torch.ones(2, L, dtype=torch.bool)
    kpm[0, 4:12] = False          # rows 7..11 of batch 0 see no key at all
    kpm[1, -1] = False
    inputs["key_padding_mask"] = kpm.to(DEVICE)
    o, r, g, gr = _run(spec, inputs, {"block_m": 16, "block_n": 16}, grads=True)
    assert torch.isfinite(o).all()
    empty = ~(window_mask(spec, L) & kpm[0][None, :]).any(1)
    assert empty.sum() == 5
    assert (o[0, :, empty.to(DEVICE)] == 0).all()
    assert rel_err(o, r) <= 1e-4
    for name in g:
        assert torch.isfinite(g[name]).all(), name
        assert rel_err(g[name], gr[name]) <= 1e-3, name


@pytest.mark.parametrize("H,Hkv", [(4, 1), (4, 2)])
def test_grouped_query_heads(H, Hkv):
    spec = AttentionSpec(window={"kind": "2d", "grid": [3, 5], "radius": 2, "shape": "square"}, prefix=2, sinks=1)
    inputs = _inputs(spec, B=1, H=H, Hkv=Hkv, D=8, seed=H + Hkv)
    o, r, g, gr = _run(spec, inputs, grads=True)
    assert rel_err(o, r) <= 1e-4
    assert g["k"].shape[1] == Hkv
    for name in g:
        assert rel_err(g[name], gr[name]) <= 1e-3, name


@pytest.mark.parametrize("L", [1, 17, 33])
def test_odd_lengths_and_unequal_tiles(L):
    spec = AttentionSpec(window={"kind": "terraced", "block": 5}, causal=True, prefix=2)
    inputs = _inputs(spec, B=1, H=1, L=L, D=12, seed=L)
    o, r, g, gr = _run(spec, inputs, {"block_m": 32, "block_n": 16}, grads=True)
    assert rel_err(o, r) <= 1e-4
    for name in g:
        assert rel_err(g[name], gr[name]) <= 1e-3, name


@pytest.mark.parametrize("spec,L,cfg", [
    (AttentionSpec(window={"kind": "2d", "grid": [8, 12], "radius": 5, "shape": "circle"}, prefix=16, sinks=1), None,
     {"block_m": 16, "block_n": 16, "tile": [4, 4]}),
    (AttentionSpec(window={"kind": "1d", "left": 20, "right": 17}, prefix=3), 70, {"block_m": 16, "block_n": 16}),
], ids=["clear-like-4x4-tiles", "1d-bidirectional"])
def test_many_tiles_with_full_and_partial_tiles(spec, L, cfg):
    L = spec.expected_length() or L
    plan = block_plan(spec, L, 16, 16, tile=tuple(cfg["tile"]) if "tile" in cfg else None)
    assert plan.kv_full.any() and (~plan.kv_full).any()   # both loops run
    inputs = _inputs(spec, B=1, H=1, L=L, D=8, seed=7)
    o, r, g, gr = _run(spec, inputs, cfg, grads=True)
    assert rel_err(o, r) <= 1e-4
    for name in g:
        assert rel_err(g[name], gr[name]) <= 1e-3, name


def test_value_head_dim_differs_and_strided_inputs():
    spec = AttentionSpec(window={"kind": "1d", "left": 4, "right": 3})
    B, L, H, D, Dv = 1, 19, 2, 8, 16
    g = torch.Generator().manual_seed(0)
    # [B, L, H, D] storage seen as [B, H, L, D]: non-contiguous heads, unit stride on the last axis
    q = torch.randn(B, L, H, D, generator=g).to(DEVICE).transpose(1, 2)
    k = torch.randn(B, L, H, D, generator=g).to(DEVICE).transpose(1, 2)
    v = torch.randn(B, L, H, Dv, generator=g).to(DEVICE).transpose(1, 2)
    o, r, g_, gr = _run(spec, {"q": q, "k": k, "v": v}, grads=True)
    assert o.shape == (B, H, L, Dv)
    assert rel_err(o, r) <= 1e-4
    for name in g_:
        assert rel_err(g_[name], gr[name]) <= 1e-3, name


def test_lse_and_its_gradient():
    spec = AttentionSpec(window={"kind": "1d", "left": 5, "right": 1}, prefix=2, sinks=2)
    inp = _inputs(spec, B=1, H=2, L=18, D=8, seed=3)
    leaves = [inp[n].clone().requires_grad_(True) for n in ("q", "k", "v", "sink_logits")]
    o, lse = window_attention(*leaves[:3], leaves[3], None, spec.canonical_json(), 0.35, "")
    # reference lse: logsumexp over visible scores and the sinks
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    q, k, v, s = ref_leaves
    scores = 0.35 * q @ k.transpose(-1, -2)
    scores = scores.masked_fill(~window_mask(spec, 18, DEVICE), float("-inf"))
    ref_lse = torch.logsumexp(torch.cat([scores, s[None, :, None, :].expand(1, 2, 18, 2)], -1), -1)
    assert rel_err(lse, ref_lse) <= 1e-5
    w = torch.randn(lse.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref_o = reference(spec, q, k, v, sink_logits=s, scale=0.35)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    g = torch.autograd.grad((o * do).sum() + (lse * w).sum(), leaves)
    gr = torch.autograd.grad((ref_o * do.double()).sum() + (ref_lse * w.double()).sum(), ref_leaves)
    for a, b in zip(g, gr):
        assert rel_err(a, b) <= 1e-4


# ---------------------------------------------------------------------------- plan plumbing
@pytest.mark.parametrize("spec,cfg", [
    (AttentionSpec(window={"kind": "2d", "grid": [7, 9], "radius": 2}, prefix=5), {"block_m": 16, "block_n": 16}),
    (AttentionSpec(window={"kind": "2d", "grid": [7, 9], "radius": 2}, prefix=16),
     {"block_m": 16, "block_n": 16, "tile": [8, 2]}),
    (AttentionSpec(window={"kind": "3d", "grid": [3, 5, 6], "radius": 1, "shape": "square"}, prefix=3),
     {"block_m": 32, "block_n": 32}),
    (AttentionSpec(window={"kind": "1d", "left": 2, "right": 2}), {"block_m": 16, "block_n": 16}),
])
def test_generated_tile_tokens_match_the_plan(spec, cfg):
    L = spec.expected_length() or 37
    cfg = W.normalize_config(spec, cfg)
    got = W.token_map(spec, L, cfg, device=DEVICE).cpu()
    plan = block_plan(spec, L, cfg["block_m"], cfg["block_n"], tile=tuple(cfg["tile"]) if "tile" in cfg else None)
    want = plan.q_tokens if plan.q_tokens is not None else torch.arange(plan.num_q_tiles * cfg["block_m"]).view(
        plan.num_q_tiles, -1).masked_fill_(torch.arange(plan.num_q_tiles * cfg["block_m"]).view(
            plan.num_q_tiles, -1) >= L, -1)
    assert torch.equal(got, want.to(torch.int32))


def test_tile_lists_partition_the_plan():
    spec = AttentionSpec(window={"kind": "2d", "grid": [16, 16], "radius": 3}, prefix=7, causal=True)
    plan = block_plan(spec, spec.expected_length(), 16)
    fwd, bwd = tile_lists(plan, "cpu")
    assert tile_lists(plan, "cpu")[0] is fwd  # cached
    for lists, off, idx, full in ((fwd, plan.kv_offsets, plan.kv_indices, plan.kv_full),
                                  (bwd, plan.q_offsets, plan.q_indices, plan.q_full)):
        assert sorted(lists.order.tolist()) == list(range(len(off) - 1))
        for t in range(len(off) - 1):
            entries = {(int(i), bool(f)) for i, f in zip(idx[off[t]:off[t + 1]], full[off[t]:off[t + 1]])}
            part = {(int(i), False) for i in lists.part_idx[lists.part_off[t]:lists.part_off[t + 1]]}
            fl = {(int(i), True) for i in lists.full_idx[lists.full_off[t]:lists.full_off[t + 1]]}
            assert entries == part | fl and not (part & fl)
    work = [(fwd.part_off[t + 1] - fwd.part_off[t]) * 1.15 + fwd.full_off[t + 1] - fwd.full_off[t]
            for t in fwd.order.tolist()]
    assert all(a >= b for a, b in zip(work, work[1:]))  # heaviest tiles launch first


# ------------------------------------------------------------------------------ the interface
def test_source_and_config_are_exposed():
    spec = AttentionSpec(window={"kind": "2d", "grid": [4, 4], "radius": 3, "shape": "circle"}, prefix=1)
    import lincomp
    kern = lincomp.compile(spec, target="triton")
    assert isinstance(kern, WindowKernel) and kern.target == "triton"
    for text in ("def window_fwd", "def window_bwd_dq", "def window_bwd_dkdv", "dy * dy + dx * dx < 9",
                 "qpre = qi < 1", "_rows(qpre, TRANSPOSED)", "tile_tokens"):
        assert text in kern.source, text
    compile(kern.source, "<generated>", "exec")   # valid Python
    kern(**_inputs(spec, B=1, H=1, D=4, seed=0))
    if DEVICE == "cpu":
        assert kern.config["window_fwd"]["params"]["block_m"] == W.INTERPRETER_CONFIG["block_m"]
        assert kern.config["window_fwd"]["source"] == "default"
    else:   # the tuning db's choice or the heuristic
        assert kern.config["window_fwd"]["params"]["block_m"] >= 16
        assert kern.config["window_fwd"]["source"] in ("db", "nearest", "default")
    src = render_source(AttentionSpec(window={"kind": "3d", "grid": [2, 3, 4], "radius": 1, "shape": "square"},
                                        causal=True))
    assert "tl.abs(df) <= 1" in src and "<= _rows(qi, TRANSPOSED)" in src


def test_bad_inputs_raise_or_fall_back(monkeypatch):
    spec = AttentionSpec(window={"kind": "1d", "left": 2, "right": 0}, causal=True, sinks=1)
    kern = compile_window(spec)
    inp = _inputs(spec, B=1, H=2, L=9, D=8, seed=0)
    with pytest.raises(ValueError, match="sink_logits"):
        kern(inp["q"], inp["k"], inp["v"])
    with pytest.raises(ValueError, match="sink_logits"):
        kern(inp["q"], inp["k"], inp["v"], sink_logits=torch.zeros(2, 3, device=DEVICE))
    with pytest.raises(ValueError, match="key_padding_mask"):
        kern(**inp, key_padding_mask=torch.ones(1, 9, device=DEVICE))
    with pytest.raises(ValueError, match="divide"):
        kern(inp["q"], inp["k"][:, :1].expand(1, 3, 9, 8).contiguous()[:, :3], inp["v"][:, :1].expand(1, 3, 9, 8),
             sink_logits=inp["sink_logits"])
    with pytest.raises(TypeError):
        kern(inp["q"], inp["k"].half(), inp["v"], sink_logits=inp["sink_logits"])
    with pytest.raises(ValueError, match="block_m"):
        compile_window(spec, config={"block_m": 24})
    with pytest.raises(ValueError, match="block_m == block_n"):
        compile_window(AttentionSpec(window={"kind": "2d", "grid": [4, 4], "radius": 1}),
                         config={"block_m": 32, "block_n": 16})
    with pytest.raises(ValueError, match="linear"):
        compile_window({"window": None, "causal": True, "linear": {"feature_map": "elu1"}})
    # fp64: not a kernel dtype -> the reference, with a warning
    inp64 = {n: t.double() for n, t in inp.items()}
    with pytest.warns(LincompFallbackWarning, match="float64"):
        o = kern(**inp64)
    assert rel_err(o, reference(spec, **inp64)) == 0
    # CPU tensors without the interpreter -> the reference, with a warning
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.warns(LincompFallbackWarning, match="TRITON_INTERPRET"):
        kern(**{n: t.cpu() for n, t in inp.items()})


def test_custom_op_checks_and_torch_compile_without_graph_breaks():
    spec = AttentionSpec(window={"kind": "1d", "left": 3, "right": 1}, causal=True, sinks=2)
    inp = _inputs(spec, B=1, H=2, Hkv=1, L=12, D=8, seed=3)
    args = (inp["q"], inp["k"], inp["v"], inp["sink_logits"], None, spec.canonical_json(), 0.3, "")
    torch.library.opcheck(window_attention, args)
    kern = compile_window(spec)
    leaves = {n: t.clone().requires_grad_(True) for n, t in inp.items()}

    def f(q, k, v, s):
        return (kern(q, k, v, sink_logits=s) * 2).sum()

    torch._dynamo.reset()
    cf = torch.compile(f, backend="aot_eager", fullgraph=True)    # fullgraph: a graph break raises
    loss = cf(leaves["q"], leaves["k"], leaves["v"], leaves["sink_logits"])
    loss.backward()
    ref_in = {n: t.double().requires_grad_(True) for n, t in inp.items()}
    ref = (reference(spec, **ref_in) * 2).sum()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item()) + 1e-5
    for n in ("q", "k", "v", "sink_logits"):
        assert rel_err(leaves[n].grad, ref_in[n].grad) <= 1e-3, n


# --------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("spec", [
    AttentionSpec(window={"kind": "1d", "left": 127, "right": 0}, causal=True),
    AttentionSpec(window={"kind": "2d", "grid": [64, 64], "radius": 8}, prefix=512),
    AttentionSpec(window={"kind": "3d", "grid": [4, 32, 32], "radius": 4, "shape": "square"}),
    AttentionSpec(causal=True),
], ids=["swa", "clear", "3d", "dense"])
@pytest.mark.parametrize("D", [32, 64, 128, 256])
def test_search_spaces_are_valid(spec, D):
    for kernel in W.KERNELS:
        space = W.search_space(kernel, spec, D, D)
        assert space[0] == W.heuristic_config(kernel, spec, D, D)
        assert len(space) == len({json.dumps(c, sort_keys=True) for c in space}) >= 3
        for cfg in space:
            assert W.normalize_config(spec, cfg) == cfg
            json.dumps(cfg)   # stored in the tuning db
            d = W.block_d(D)
            # shared memory: keep tiles x head dim within an H100's budget
            assert (cfg["block_m"] + 2 * cfg["block_n"] * cfg["num_stages"]) * d * 2 <= 232448
            if isinstance(spec.window, GridWindow):
                plan = block_plan(spec, spec.expected_length(), cfg["block_m"], tile=tuple(cfg["tile"]))
                assert plan.nnz > 0


def test_interpreter_uses_a_fixed_config():
    spec = AttentionSpec(window={"kind": "1d", "left": 3, "right": 0}, causal=True)
    q = torch.randn(1, 1, 8, 8)
    assert W.choose_config("window_fwd", spec, q, q, autotune=True, runner=None).params == \
        W.normalize_config(spec, W.INTERPRETER_CONFIG)
    with pytest.raises(ValueError, match="CUDA"):
        W.tune_window(spec, L=64, device="cpu")


def test_import_lincomp_does_not_import_triton():
    import subprocess
    import sys
    code = ("import sys, lincomp; lincomp.AttentionSpec; import lincomp.lower.triton; "
            "from lincomp.lower.triton.window import render_source; "
            "render_source(lincomp.presets.clear(8)); assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
