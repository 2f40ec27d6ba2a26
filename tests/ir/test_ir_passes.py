"""The IR graph, verify, canonicalise (same outputs before / after) and plan choices."""

import networkx as nx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lincomp import AttentionSpec, presets, reference
from lincomp.ir import cost
from lincomp.ir.graph import build_graph, format_ir, graph_to_spec, nodes_by_op
from lincomp.ir.passes import PLAN_HINTS, canonicalise, lower_to_plan, verify
from lincomp.testing import length_for, random_inputs, rel_err, spec_strategy


def _rules(plan):
    return [r.rule for r in plan.rewrites]


# ------------------------------------------------------------------------------------------- graph
@pytest.mark.parametrize("name", sorted(presets.PAPER_SPECS))
def test_presets_build_verify_and_round_trip(name):
    spec = presets.PAPER_SPECS[name]()
    L = spec.expected_length() or 300
    g = verify(build_graph(spec, L))
    assert nx.is_directed_acyclic_graph(g)
    assert graph_to_spec(g) == spec
    text = format_ir(g)
    assert "%q = input : in[B,H,L,D]" in text and "%output = output(o=" in text
    for n, a in g.nodes(data=True):
        assert a["op"] and isinstance(a["inputs"], dict) and isinstance(a["outputs"], dict)


@given(spec_strategy(max_prefix=4, max_grid=5), st.integers(1, 24), st.booleans())
def test_random_specs_build_verify_round_trip(spec, L, with_state):
    L = length_for(spec, L)
    state = with_state and spec.linear is not None and spec.causal
    g = verify(build_graph(spec, L, initial_state=state, sizes={"B": 2, "H": 4, "Hkv": 2, "D": 8}))
    assert graph_to_spec(g) == spec
    if spec.linear is not None:
        assert g.nodes["scan"]["params"]["exclude_window"] == (spec.combine == "shared")
    assert ("sink_logits" in g) == bool(spec.sinks)


def test_ir_dump_shows_ops_params_and_shapes():
    text = format_ir(build_graph(presets.lizard(), 256, sizes={"D": 64}))
    assert "%phi_q = feature_map(x=%q, weight=%feature_weight_q) {map=hedgehog_exp}" in text
    assert "window=1d(left=127, right=0)" in text and "sinks=4" in text
    assert "%gate = cumulative_gate(g=%g) {kind=scalar} -> G: f32[B,H,L]" in text
    assert "num: f32[B,H,L,Dv]" in text and "S: f32[B,H,F,Dv]" in text
    assert "L=256" in text and "F=2*E" in text and "F=128" in text


def test_build_graph_rejects_bad_requests():
    with pytest.raises(ValueError, match="grid"):
        build_graph(presets.clear(8, (8, 8), 4), 100)
    with pytest.raises(ValueError, match="initial_state"):
        build_graph(presets.sliding_window(8), 32, initial_state=True)
    with pytest.raises(ValueError, match="return_state"):
        build_graph(presets.lolcats(), 32, return_state=True)
    with pytest.raises(ValueError, match="L must be"):
        build_graph(presets.sliding_window(8), 0)


# ------------------------------------------------------------------------------------------ verify
def _broken(spec, L, edit):
    g = build_graph(spec, L)
    edit(g)
    return g


@pytest.mark.parametrize("edit,node,msg", [
    (lambda g: g.remove_edge("q", "window"), "window", "required input port 'q'"),
    (lambda g: g.nodes["window"]["inputs"].update(q=g.nodes["k"]["outputs"]["value"]), "window", "expects shape"),
    (lambda g: g.add_edge("norm_window", "sink_logits", wires=[("o", "x")]), "window", "cycle"),
    (lambda g: g.remove_node("alpha"), "combine", "required input port 'alpha'"),
    (lambda g: g.add_node("window_gamma", op="input", inputs={}, outputs={"value": None}, algorithm=None,
                          params={"name": "window_gamma", "optional": False}), "window_gamma", "not used"),
    (lambda g: (g.remove_edge("v", "window"), g.add_edge("k", "window", wires=[("value", "q"), ("value", "v")])),
     "window", "wired twice"),
    (lambda g: g.nodes["phi_k"]["params"].update(map="relu"), "phi_k", r"unexpected input ports \['weight'\]"),
    (lambda g: g.nodes["window"]["inputs"].pop("sinks"), "window", r"needs input ports \['sinks'\]"),
    (lambda g: g.nodes["scan"]["outputs"].pop("num"), "norm_linear", "reads output 'num'"),
    (lambda g: g.nodes["norm_linear"]["params"].update(mode="scale"), "norm_linear", "unexpected input ports"),
])
def test_verify_names_the_broken_node(edit, node, msg):
    g = _broken(presets.lizard(window=16), 64, edit)
    with pytest.raises(ValueError, match=msg) as e:
        verify(g)
    assert f"'{node}'" in str(e.value)


def test_verify_wrong_producer_and_missing_tensor():
    g = build_graph(presets.lizard(window=16), 64)
    w = g.edges["sink_logits", "window"]["wires"]
    g.remove_edge("sink_logits", "window")
    g.add_edge("alpha", "window", wires=w)          # alpha [H] is not [H, m] and not sink_logits
    with pytest.raises(ValueError, match="'window'"):
        verify(g)
    g = build_graph(presets.lizard(window=16), 64)
    g.nodes["window"]["params"]["sinks"] = 0        # drop the sinks port, leaving sink_logits unused
    g.nodes["window"]["inputs"].pop("sinks")
    g.remove_edge("sink_logits", "window")
    with pytest.raises(ValueError, match="sink_logits"):
        verify(g)


# ------------------------------------------------------------------------------------ canonicalise
def _used_inputs(plan, inputs):
    return {k: v for k, v in inputs.items() if k not in plan.dropped_inputs}


def _same_outputs(spec, L, *, seed=0, initial_state=False, **hints):
    plan = lower_to_plan(spec, L, initial_state=initial_state, **hints)
    inputs = random_inputs(spec, B=1, H=2, L=L, D=4, dtype=torch.float64, seed=seed, feature_dim=2,
                           initial_state=initial_state)
    before = reference(spec, **inputs)
    after = reference(plan.canonical_spec, **_used_inputs(plan, inputs))
    assert rel_err(after, before) < 1e-10, (spec, plan.canonical_spec, plan.rewrites)
    return plan


@given(spec_strategy(max_prefix=3, max_grid=4), st.integers(1, 14), st.integers(0, 2 ** 16))
def test_canonicalise_keeps_the_math(spec, L, seed):
    L = length_for(spec, L)
    plan = _same_outputs(spec, L, seed=seed)
    verify(plan.graph)
    covers = spec.window is not None and cost.window_covers(spec, L)
    assert ("window_to_dense" in _rules(plan)) == covers
    if covers and spec.combine == "shared":
        assert plan.canonical_spec.linear is None and "hybrid_to_window" in _rules(plan)
        assert "window_gamma" in plan.dropped_inputs


@pytest.mark.parametrize("spec,L,dense", [
    (AttentionSpec(window={"kind": "1d", "left": 9, "right": 9}), 10, True),
    (AttentionSpec(window={"kind": "1d", "left": 9, "right": 8}), 10, False),
    (AttentionSpec(window={"kind": "1d", "left": 6, "right": 6}, prefix=3), 10, True),      # 7 body tokens
    (AttentionSpec(window={"kind": "2d", "grid": [3, 4], "radius": 4, "shape": "circle"}), 12, True),   # 4+9 < 16
    (AttentionSpec(window={"kind": "2d", "grid": [3, 4], "radius": 3, "shape": "circle"}), 12, False),
    (AttentionSpec(window={"kind": "3d", "grid": [2, 3, 3], "radius": 2, "shape": "square"}, prefix=2), 20, True),
    (AttentionSpec(window={"kind": "terraced", "block": 16}, causal=True), 16, True),
    (AttentionSpec(window={"kind": "terraced", "block": 8}, causal=True), 16, True),          # own + previous
    (AttentionSpec(window={"kind": "terraced", "block": 8}, causal=True), 17, False),
    (AttentionSpec(window={"kind": "terraced", "block": 16}), 16, False),                     # j <= i only
])
def test_covering_windows_become_dense(spec, L, dense):
    plan = _same_outputs(spec, L)
    assert (plan.canonical_spec.window is None) == dense
    assert ("window_to_dense" in _rules(plan)) == dense
    if dense:
        assert plan.canonical_spec.prefix == 0 and plan.window_algorithm in ("flash", "quadratic")


def test_shared_hybrid_loses_linear_part():
    spec = presets.lolcats(block=8, feature_dim=2, chunk_size=4)
    plan = _same_outputs(spec, 16)
    assert _rules(plan) == ["window_to_dense", "shared_drops_linear", "hybrid_to_window", "dead_code"]
    assert plan.canonical_spec == AttentionSpec(causal=True)
    assert set(plan.dropped_inputs) == {"window_gamma", "feature_weight_q", "feature_weight_k"}
    assert nodes_by_op(plan.graph, "linear_scan") == [] and nodes_by_op(plan.graph, "combine") == []
    # One token more and a key lies outside the window: nothing changes.
    plan = _same_outputs(spec, 17)
    assert plan.rewrites == () and plan.canonical_spec == spec


def test_shared_hybrid_with_initial_state_keeps_linear_part():
    # The entering state lies outside every window, so the linear branch still contributes.
    spec = presets.lolcats(block=8, feature_dim=2, chunk_size=4)
    plan = _same_outputs(spec, 12, initial_state=True)
    assert _rules(plan) == ["window_to_dense"]
    assert plan.canonical_spec.linear is not None and plan.canonical_spec.combine == "shared"


def test_sum_hybrid_keeps_both_branches_and_causal_right_is_cut():
    spec = AttentionSpec(window={"kind": "1d", "left": 3, "right": 5}, causal=True, sinks=2,
                         linear={"feature_map": "elu1", "normalize": True, "chunk_size": 4}, combine="sum")
    plan = _same_outputs(spec, 20)
    assert _rules(plan) == ["causal_right"]
    assert plan.canonical_spec.window.right == 0 and plan.canonical_spec.combine == "sum"
    plan = _same_outputs(spec, 4)   # the window covers: dense in the graph, a full band in spec form
    assert "window_to_dense" in _rules(plan) and plan.canonical_spec.linear is not None
    assert plan.canonical_spec.window.left == 3 and plan.window_algorithm == "flash"


def test_canonicalise_does_not_mutate_its_input():
    g = build_graph(presets.lolcats(block=8), 16)
    n = g.number_of_nodes()
    h = canonicalise(g)
    assert g.number_of_nodes() == n and g.graph["rewrites"] == [] and h.number_of_nodes() < n


# -------------------------------------------------------------------------------------------- plan
def test_plan_choices():
    p = lower_to_plan(presets.lizard(), 4096)
    assert p.algorithms == {"window": "block_sparse", "linear": "chunked", "hybrid": "fused"}
    assert p.block_plan.block_m == 64 and p.fused
    p = lower_to_plan(presets.lizard(), 1)
    assert p.algorithms == {"window": "decode", "linear": "recurrent", "hybrid": "fused"} and p.block_plan is None
    p = lower_to_plan(presets.lizard(), 4096, decode=True)
    assert p.window_algorithm == "decode" and p.linear_algorithm == "recurrent"
    assert lower_to_plan(presets.gla(), 48).linear_algorithm == "quadratic"
    with pytest.raises(TypeError, match="fuse"):   # no backend builds a separate hybrid: no hint asks for one
        lower_to_plan(presets.lizard(), 4096, fuse=False)
    wide = presets.lizard(window=2048)
    assert lower_to_plan(wide, 8192).algorithms["hybrid"] == "fused"
    enc = AttentionSpec(window={"kind": "2d", "grid": [16, 16], "radius": 3}, linear={"feature_map": "relu"},
                        combine="sum")
    p = lower_to_plan(enc, 256, block=32)
    assert p.algorithms == {"window": "block_sparse", "linear": "noncausal", "hybrid": "fused"}
    assert p.block_plan.tile == (4, 8)
    p = lower_to_plan(presets.clear(8, (64, 64), 512), 4608, block=128)
    assert p.block_plan.tile == (8, 16) and 0 < p.block_plan.density < 1 and 0 < p.pair_efficiency <= 1
    assert lower_to_plan(presets.sliding_window(64), 48).window_algorithm == "flash"     # covered -> dense
    assert lower_to_plan(presets.sliding_window(16), 48).window_algorithm == "quadratic"  # one tile
    assert lower_to_plan(AttentionSpec(causal=True), 1000).window_algorithm == "flash"
    assert lower_to_plan(presets.sliding_window(16), 200, block_m=32, block_n=16).block_plan.block_n == 16


def test_plan_cost_and_hints():
    p = lower_to_plan(presets.sliding_window(128), 4096, B=2, H=8, D=64)
    assert p.cost.flops == cost.attention_flops(presets.sliding_window(128), 4096, B=2, H=8, D=64)
    assert p.cost_sizes["B"] == 2 and p.cost.flops_saved > 0.9
    assert "fewer attention FLOPs than dense" in p.format()
    with pytest.raises(TypeError, match="unknown plan hint"):
        lower_to_plan(presets.sliding_window(128), 4096, num_warps=4)
    assert "block" in PLAN_HINTS
    with pytest.raises(ValueError, match="linear_algorithm"):
        lower_to_plan(presets.gla(), 256, linear_algorithm="noncausal")
