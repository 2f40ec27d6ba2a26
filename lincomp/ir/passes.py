"""Passes over the IR: ``verify``, ``canonicalise`` (length-dependent rewrites) and ``plan``.

``lower_to_plan(spec, L, **hints)`` runs them all (build -> verify -> canonicalise -> verify -> plan) and
returns a :class:`Plan`: what a backend needs to generate and launch kernels for one length (the canonical
spec and graph, the algorithm of each branch, the block plan of the window, cost estimates).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import networkx as nx

from lincomp.ir import cost as _cost
from lincomp.ir.blocks import BlockPlan, block_plan
from lincomp.ir.graph import (OPS, build_graph, connect, copy_graph, derive_sizes, format_ir, graph_to_spec,
                              in_wires, nodes_by_op, topo_order)
from lincomp.ir.lowered import HYBRID_ALGORITHMS, choose_algorithm
from lincomp.ir.tensors import required_tensors
from lincomp.spec import FEATURE_MAPS, HEDGEHOG_MAPS, AttentionSpec, Window1D

WINDOW_ALGORITHMS = ("decode", "quadratic", "flash", "block_sparse")
# Hints lower_to_plan understands (backends: filter yours down to these).
PLAN_HINTS = ("B", "H", "Hkv", "D", "Dv", "E", "dtype_bytes", "block", "block_m", "block_n", "tile", "order",
              "decode", "linear_algorithm", "initial_state", "return_state")
DEFAULT_BLOCK = 64


@dataclass(frozen=True)
class Rewrite:
    """One rewrite canonicalise applied: ``rule`` name, the node it matched, what changed."""

    rule: str
    node: str
    detail: str

    def __str__(self) -> str:
        return f"{self.rule} @%{self.node}: {self.detail}" if self.node else f"{self.rule}: {self.detail}"


# --------------------------------------------------------------------------------------------- verify
def _ports(a: dict) -> Tuple[set, set]:
    """(required, optional) input ports of a node, from its op and params."""
    op, p = a["op"], a["params"]
    if op == "input":
        return set(), set()
    if op == "feature_map":
        return ({"x", "weight"} if p["map"] in HEDGEHOG_MAPS else {"x"}), set()
    if op == "cumulative_gate":
        return {"g"}, set()
    if op == "linear_scan":
        req = {"phi_q", "phi_k", "v"} | ({"gate"} if p["linear"].gate else set())
        return req, ({"S0", "z0"} if p["causal"] else set())
    if op == "window_softmax":
        pooled = {"pool_weight"} if getattr(p["window"], "pool", None) is not None else set()
        return {"q", "k", "v"} | ({"sinks"} if p["sinks"] else set()) | pooled, set()
    if op == "combine":
        if p["mode"] == "shared":
            return {"window_num", "window_den", "linear_num", "linear_den", "gamma"}, set()
        return {"linear", "window", "alpha"}, set()
    if op == "normalize":
        return ({"num", "den"} if p["mode"] == "divide" else {"num"}), set()
    if op == "output":
        return {"o"}, {"S", "z"}
    raise ValueError(f"unknown op {op!r}")


# (consumer op, port) -> (producer op, producer input name or None). "{side}" is the consumer's side param.
_SOURCES = {
    ("feature_map", "x"): ("input", "{side}"), ("feature_map", "weight"): ("input", "feature_weight_{side}"),
    ("cumulative_gate", "g"): ("input", "g"),
    ("linear_scan", "phi_q"): ("feature_map", None), ("linear_scan", "phi_k"): ("feature_map", None),
    ("linear_scan", "v"): ("input", "v"), ("linear_scan", "gate"): ("cumulative_gate", None),
    ("linear_scan", "S0"): ("input", "initial_state"), ("linear_scan", "z0"): ("input", "initial_state"),
    ("window_softmax", "q"): ("input", "q"), ("window_softmax", "k"): ("input", "k"),
    ("window_softmax", "v"): ("input", "v"), ("window_softmax", "sinks"): ("input", "sink_logits"),
    ("window_softmax", "pool_weight"): ("input", "pool_weight"),
    ("combine", "gamma"): ("input", "window_gamma"), ("combine", "alpha"): ("input", "alpha"),
    ("combine", "window_num"): ("window_softmax", None), ("combine", "window_den"): ("window_softmax", None),
    ("combine", "linear_num"): ("linear_scan", None), ("combine", "linear_den"): ("linear_scan", None),
    ("combine", "linear"): ("normalize", None), ("combine", "window"): ("normalize", None),
    ("output", "S"): ("linear_scan", None), ("output", "z"): ("linear_scan", None),
}


def _resolve(shape: tuple, sizes: dict) -> tuple:
    """A shape with known symbols replaced by their values (so F and 2*E compare when both are known)."""
    return tuple(sizes.get(s, s) if isinstance(s, str) and sizes.get(s) is not None else s for s in shape)


def _fail(node: str, msg: str) -> ValueError:
    return ValueError(f"IR node {node!r}: {msg}")


def verify(graph: nx.DiGraph) -> nx.DiGraph:
    """Check the IR; raise ValueError naming the offending node. Returns the graph (for chaining).

    Checks: acyclic; known ops; every required input port wired exactly once, no unknown ports; each wire
    reads an existing output of a producer of the right kind, with the shape the port expects; every
    tensor the spec needs is an input and used; every op reaches the single output.
    """
    for key in ("source_spec", "L", "sizes"):
        if key not in graph.graph:
            raise ValueError(f"IR graph lacks graph attribute {key!r}; build it with build_graph(spec, L)")
    if not nx.is_directed_acyclic_graph(graph):
        cycle = nx.find_cycle(graph)
        raise _fail(cycle[0][0], "is on a cycle " + " -> ".join(u for u, _ in cycle) + f" -> {cycle[0][0]}")
    sizes = graph.graph["sizes"]
    outputs = nodes_by_op(graph, "output")
    if len(outputs) != 1:
        raise ValueError(f"the IR must have exactly one output node, found {outputs}")
    for n in topo_order(graph):
        a = graph.nodes[n]
        for key in ("op", "inputs", "outputs", "params"):
            if key not in a:
                raise _fail(n, f"lacks attribute {key!r}")
        if a["op"] not in OPS:
            raise _fail(n, f"unknown op {a['op']!r}; ops are {list(OPS)}")
        required, optional = _ports(a)
        declared = set(a["inputs"])
        if not required <= declared:
            raise _fail(n, f"{a['op']} needs input ports {sorted(required - declared)} (not declared)")
        if not declared <= required | optional:
            raise _fail(n, f"{a['op']} has unexpected input ports {sorted(declared - required - optional)}")
        wired: Dict[str, Tuple[str, str]] = {}
        for src in graph.predecessors(n):
            for out, port in graph.edges[src, n]["wires"]:
                if port in wired:
                    raise _fail(n, f"input port {port!r} is wired twice ({wired[port][0]!r} and {src!r})")
                if port not in declared:
                    raise _fail(n, f"{src!r} is wired into port {port!r}, which {a['op']} does not have")
                wired[port] = (src, out)
        for port in sorted(declared):
            if port not in wired:
                if port in required:
                    raise _fail(n, f"required input port {port!r} of {a['op']} is not wired")
                raise _fail(n, f"optional port {port!r} is declared but not wired")
        if a["op"] == "linear_scan" and ("S0" in wired) != ("z0" in wired):
            raise _fail(n, "initial_state needs both S0 and z0 wired")
        for port, (src, out) in wired.items():
            pa = graph.nodes[src]
            if out not in pa["outputs"]:
                raise _fail(n, f"port {port!r} reads output {out!r} of {src!r}, which has {sorted(pa['outputs'])}")
            got, want = pa["outputs"][out].shape, a["inputs"][port].shape
            if _resolve(got, sizes) != _resolve(want, sizes):
                raise _fail(n, f"port {port!r} expects shape [{','.join(map(str, want))}] but {src}.{out} is "
                               f"[{','.join(map(str, got))}]")
            rule = _SOURCES.get((a["op"], port))
            if rule is not None:
                op, name = rule
                if name is not None:
                    name = name.format(side=a["params"].get("side", ""))
                if pa["op"] != op or (name is not None and pa["params"].get("name") != name):
                    want_src = f"input {name!r}" if op == "input" else f"a {op} node"
                    raise _fail(n, f"port {port!r} must read {want_src}, got {src!r} ({pa['op']})")
        _check_params(n, a)
    out = outputs[0]
    live = nx.ancestors(graph, out) | {out}
    for n in graph.nodes:
        if n not in live:
            a = graph.nodes[n]
            what = f"input {n!r} is not used by any op" if a["op"] == "input" else "does not reach the output"
            raise _fail(n, what + " (canonicalise removes dead nodes)")
    spec = graph_to_spec(graph)   # raises for an unrepresentable graph
    inputs = {graph.nodes[n]["params"]["name"]: n for n in nodes_by_op(graph, "input")}
    for name in ("q", "k", "v", *required_tensors(spec)):
        if name not in inputs:
            raise _fail(name, f"the spec ({spec.summary()}) needs input tensor {name!r}, which is not in the IR")
    _check_consistency(graph, spec)
    return graph


def _check_params(n: str, a: dict) -> None:
    p, op = a["params"], a["op"]
    if op == "feature_map" and (p.get("map") not in FEATURE_MAPS or p.get("side") not in ("q", "k")):
        raise _fail(n, f"feature_map needs map in {list(FEATURE_MAPS)} and side 'q' or 'k', got {p}")
    if op == "combine" and p.get("mode") not in ("shared", "sum"):
        raise _fail(n, f"combine mode must be 'shared' or 'sum', got {p.get('mode')!r}")
    if op == "normalize" and p.get("mode") not in ("divide", "scale"):
        raise _fail(n, f"normalize mode must be 'divide' or 'scale', got {p.get('mode')!r}")
    if op == "cumulative_gate" and p.get("kind") not in ("scalar", "vector"):
        raise _fail(n, f"cumulative_gate kind must be 'scalar' or 'vector', got {p.get('kind')!r}")
    if op == "linear_scan" and p["linear"].gate and not p["causal"]:
        raise _fail(n, "a gated scan must be causal (a decay from j to i only exists for j <= i)")


def _check_consistency(graph: nx.DiGraph, spec: AttentionSpec) -> None:
    """Facts stored in two places agree (the scan's linear branch vs its feature maps, gate, normaliser)."""
    sizes = graph.graph["sizes"]
    if sizes.get("H") and sizes.get("Hkv") and sizes["H"] % sizes["Hkv"]:
        raise ValueError(f"IR sizes: Hkv={sizes['Hkv']} must divide H={sizes['H']}")
    for n in nodes_by_op(graph, "linear_scan"):
        lin = graph.nodes[n]["params"]["linear"]
        wires = in_wires(graph, n)
        for port in ("phi_q", "phi_k"):
            fm = graph.nodes[wires[port][0]]["params"]
            if fm["map"] != lin.feature_map or fm["side"] != port[-1]:
                raise _fail(wires[port][0], f"feature map {fm['map']!r} (side {fm['side']}) does not match the scan's "
                                            f"{lin.feature_map!r} for port {port!r}")
        if lin.gate and graph.nodes[wires["gate"][0]]["params"]["kind"] != lin.gate:
            raise _fail(wires["gate"][0], f"gate kind does not match the scan's {lin.gate!r}")
        if graph.nodes[n]["params"]["exclude_window"] != (spec.combine == "shared"):
            raise _fail(n, "exclude_window must be set exactly when the scan feeds a shared combine")
        for dst in graph.successors(n):
            da = graph.nodes[dst]
            if da["op"] == "normalize":
                want = "divide" if lin.normalize else "scale"
                if da["params"]["mode"] != want:
                    raise _fail(dst, f"the linear branch has normalize={lin.normalize}: mode must be {want!r}")
    for n in nodes_by_op(graph, "window_softmax"):
        p = graph.nodes[n]["params"]
        if p["sinks"] != sizes.get("m", p["sinks"]):
            raise _fail(n, f"sinks={p['sinks']} but the IR sizes say m={sizes.get('m')}")


# --------------------------------------------------------------------------------------- canonicalise
def _rule_causal_right(g: nx.DiGraph) -> List[Rewrite]:
    """A causal 1D window's right reach is cut by causality: (left, right) == (left, 0)."""
    done = []
    for n in nodes_by_op(g, "window_softmax"):
        p = g.nodes[n]["params"]
        w = p["window"]
        if p["causal"] and isinstance(w, Window1D) and w.right > 0:
            p["window"] = Window1D(w.left, 0)
            done.append(Rewrite("causal_right", n, f"causal 1d window (left={w.left}, right={w.right}) -> "
                                                   f"(left={w.left}, right=0)"))
    return done


def _rule_window_covers(g: nx.DiGraph) -> List[Rewrite]:
    """A window that sees every allowed key at this L is dense (or causal dense); the prefix then vanishes."""
    done, L = [], g.graph["L"]
    for n in nodes_by_op(g, "window_softmax"):
        p = g.nodes[n]["params"]
        w = p["window"]
        if w is None:
            if p["prefix"]:   # prefix tokens see / are seen by everything: already true of dense attention
                done.append(Rewrite("dense_prefix", n, f"prefix={p['prefix']} is implied by dense attention"))
                p["prefix"] = 0
            continue
        probe = AttentionSpec(window=w, causal=p["causal"], prefix=p["prefix"])
        if _cost.window_covers(probe, L):
            N = L - min(p["prefix"], L)
            p["window"], p["prefix"] = None, 0
            done.append(Rewrite("window_to_dense", n, f"{w!r} covers all {N} tokens after the prefix at L={L}: "
                                                      f"{'causal ' if p['causal'] else ''}dense attention"))
    return done


def _rule_shared_covered(g: nx.DiGraph) -> List[Rewrite]:
    """combine='shared' with a dense window: C(i) is empty, so the linear terms vanish (without an
    initial state, which lies outside every window) and gamma cancels in num / den."""
    done = []
    for n in nodes_by_op(g, "combine"):
        a = g.nodes[n]
        if a["params"]["mode"] != "shared" or "linear_num" not in a["inputs"]:
            continue
        wires = in_wires(g, n)
        win, scan = wires["window_num"][0], wires["linear_num"][0]
        if g.nodes[win]["params"]["window"] is not None or "S0" in in_wires(g, scan):
            continue
        g.remove_edge(scan, n)
        for port in ("linear_num", "linear_den"):
            del a["inputs"][port]
        done.append(Rewrite("shared_drops_linear", n, "the window covers every allowed key: no key lies outside "
                                                      "it, the linear branch adds nothing"))
    return done


def _rule_linear_free_hybrid(g: nx.DiGraph) -> List[Rewrite]:
    """A combine left with only its window branch is that window: bypass it (gamma cancels)."""
    done = []
    for n in nodes_by_op(g, "combine"):
        a = g.nodes[n]
        if a["params"]["mode"] != "shared" or "linear_num" in a["inputs"]:
            continue
        wires = in_wires(g, n)
        win = wires["window_num"][0]
        for dst in list(g.successors(n)):
            new = [{"num": ("num", port), "den": ("den", port)}[out] for out, port in g.edges[n, dst]["wires"]]
            g.remove_edge(n, dst)
            for out, port in new:
                connect(g, win, dst, out, port)
        g.remove_node(n)
        done.append(Rewrite("hybrid_to_window", n, "a shared hybrid without a linear branch is its window "
                                                   "softmax: gamma * num / (gamma * den) = num / den"))
    return done


def _dead_code(g: nx.DiGraph) -> List[Rewrite]:
    out = nodes_by_op(g, "output")[0]
    live = nx.ancestors(g, out) | {out}
    dead = [n for n in g.nodes if n not in live]
    if not dead:
        return []
    g.remove_nodes_from(dead)
    if not nodes_by_op(g, "linear_scan"):
        g.graph["relations"] = {}
    return [Rewrite("dead_code", "", "removed " + ", ".join(f"%{n}" for n in dead))]


_RULES = (_rule_causal_right, _rule_window_covers, _rule_shared_covered, _rule_linear_free_hybrid)


def canonicalise(graph: nx.DiGraph) -> nx.DiGraph:
    """A rewritten copy of the graph (length-dependent simplifications; same math at this L).

    Rules, applied to a fixpoint: a causal 1D window drops its right reach; a window that covers every
    allowed key at this L becomes dense (its prefix with it); a shared hybrid whose window is dense loses
    its linear branch; a hybrid left with only a window becomes that window; dead nodes are removed.
    Every rewrite applied is appended to ``graph.graph["rewrites"]`` (a list of :class:`Rewrite`).
    """
    g = copy_graph(graph)
    log: List[Rewrite] = g.graph.setdefault("rewrites", [])
    for _ in range(16):   # each rule strictly simplifies, so a few rounds reach the fixpoint
        applied = [r for rule in _RULES for r in rule(g)]
        if not applied:
            break
        log.extend(applied)
    log.extend(_dead_code(g))
    return g


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    """How one spec runs at one length: the backends' input.

    ``algorithms`` maps a branch (``"window"``, ``"linear"``, ``"hybrid"``) to its choice and ``reasons``
    says why. ``block_plan`` is the window's tile plan (None for dense flash and decoding). ``cost`` is
    for the canonical spec with the chosen algorithms and ``cost_sizes`` (B, H, D, ... used).
    ``dropped_inputs``: tensors the original spec takes that the canonical graph no longer reads.
    """

    spec: AttentionSpec
    canonical_spec: AttentionSpec
    L: int
    graph: nx.DiGraph
    rewrites: Tuple[Rewrite, ...]
    algorithms: Dict[str, str]
    reasons: Dict[str, str]
    block_plan: Optional[BlockPlan]
    block_m: int
    block_n: int
    cost: _cost.CostEstimate
    pair_efficiency: Optional[float]
    cost_sizes: Dict[str, int]
    dropped_inputs: Tuple[str, ...] = ()
    hints: Dict = field(default_factory=dict)

    @property
    def window_algorithm(self) -> Optional[str]:
        return self.algorithms.get("window")

    @property
    def linear_algorithm(self) -> Optional[str]:
        return self.algorithms.get("linear")

    @property
    def fused(self) -> bool:
        return self.algorithms.get("hybrid") == "fused"

    def format(self, ir: bool = True, plan_notes: Tuple[str, ...] = ()) -> str:
        """Multi-line text: IR (optional), rewrites, algorithm choices, block plan (+ ``plan_notes``), cost."""
        lines = [format_ir(self.graph)] if ir else []
        lines.append("rewrites:" + ("" if self.rewrites else " none"))
        lines += [f"  - {r}" for r in self.rewrites]
        lines.append("plan:")
        for branch, algo in self.algorithms.items():
            lines.append(f"  {branch}: {algo} ({self.reasons[branch]})")
        bp = self.block_plan
        if bp is not None:
            tile = f", tile {'x'.join(map(str, bp.tile))}" if bp.tile else ""
            lines.append(f"  block plan: {bp.block_m}x{bp.block_n}{tile}: {bp.num_q_tiles} x {bp.num_k_tiles} tiles, "
                         f"{bp.nnz} visited ({bp.density:.2%} density), {bp.full_fraction:.1%} full, "
                         f"max {bp.max_kv_per_q} key tiles per query tile")
        if self.pair_efficiency is not None:
            lines.append(f"  visited-pair efficiency: {self.pair_efficiency:.1%} (useful pairs / computed pairs)")
        lines += [f"  {note}" for note in plan_notes]
        c = self.cost
        s = self.cost_sizes
        lines.append(f"cost (B={s['B']}, H={s['H']}, D={s['D']}, Dv={s['Dv']}, {s['dtype_bytes']}-byte elements):")
        if self.spec.has_softmax:
            lines.append(f"  visible pairs: {c.visible_pairs:,} of {c.allowed_pairs:,} allowed ({c.pair_fraction:.3%})")
        parts = ", ".join(f"{k} {v:.3g}" for k, v in c.breakdown.items())
        lines.append(f"  FLOPs: {c.flops:.4g} ({parts}) vs dense {c.dense_flops:.4g}: {savings_text(c)}")
        lines.append(f"  bytes: {c.bytes:.4g} vs dense {c.dense_bytes:.4g} (inputs read once, output written once); "
                     f"{c.intensity:.3g} FLOP/byte")
        return "\n".join(lines)


def savings_text(c: _cost.CostEstimate) -> str:
    """"99.54% fewer attention FLOPs than dense", or "2.31x the FLOPs of dense attention" when more."""
    if c.flops <= c.dense_flops:
        return f"{100 * c.flops_saved:.2f}% fewer attention FLOPs than dense"
    return f"{c.flops / max(1, c.dense_flops):.2f}x the FLOPs of dense attention at this L"


def window_part(spec: AttentionSpec) -> AttentionSpec:
    """The window part of a spec (all a block plan depends on), so hybrids share cached block plans."""
    return AttentionSpec(window=spec.window, causal=spec.causal, prefix=spec.prefix)


def plan(graph: nx.DiGraph, **hints) -> Plan:
    """Choose the algorithm of each branch and build the window's block plan.

    Window: ``decode`` (L == 1 or ``decode=True``), ``quadratic`` (one tile: L <= block), ``flash`` (a dense
    window: every tile pair, the upper triangle skipped when causal), ``block_sparse`` (flash over the
    block plan's tile pairs). Linear: :func:`lincomp.ir.cost.default_linear_algorithm`. Hybrid:
    :func:`lincomp.ir.lowered.choose_algorithm` (what the backends build).
    Hints: ``PLAN_HINTS`` (sizes for the cost, block sizes, tile, order, decode, ...).
    """
    unknown = sorted(set(hints) - set(PLAN_HINTS))
    if unknown:
        raise TypeError(f"unknown plan hint(s) {unknown}; hints are {list(PLAN_HINTS)}")
    g = copy_graph(graph)
    spec = graph_to_spec(g)
    L = g.graph["L"]
    given = {k: v for k, v in g.graph["sizes"].items() if k in ("B", "H", "Hkv", "D", "Dv", "E") and v is not None}
    for k in ("B", "H", "Hkv", "D", "Dv", "E"):
        if hints.get(k) is not None and given.get(k, hints[k]) != hints[k]:
            if k == "E" and spec.linear is not None and spec.linear.feature_dim is not None:
                continue   # the spec fixes E; a generic E hint does not apply to it
            raise ValueError(f"hint {k}={hints[k]} contradicts the IR's size {k}={given[k]}")
        if hints.get(k) is not None:
            given.setdefault(k, int(hints[k]))
    sizes = g.graph["sizes"] = derive_sizes(spec, L, given)
    decode = bool(hints.get("decode", False)) or L == 1
    bm = int(hints.get("block_m") or hints.get("block") or DEFAULT_BLOCK)
    bn = int(hints.get("block_n") or hints.get("block") or bm)
    algorithms, reasons = {}, {}
    bp, eff = None, None
    win_nodes, scan_nodes = nodes_by_op(g, "window_softmax"), nodes_by_op(g, "linear_scan")
    if win_nodes:
        w = g.nodes[win_nodes[0]]["params"]["window"]   # None = dense (the spec may spell it as a full band)
        if decode:
            algo, why = "decode", "one query against the cached keys of its window"
        elif w is None:
            algo = "flash"
            why = "dense " + ("causal: tiles above the diagonal skipped" if spec.causal else "attention: every tile")
            eff = _cost.dense_pair_efficiency(spec, L, bm, bn)
        else:
            bp = block_plan(window_part(spec), L, bm, bn, tile=hints.get("tile"), order=hints.get("order", "tiled"))
            if L <= bm and L <= bn:
                algo, why = "quadratic", f"L={L} fits one {bm}x{bn} tile: one masked block"
            else:
                algo, why = "block_sparse", (f"flash over {bp.nnz} of {bp.num_q_tiles * bp.num_k_tiles} tile pairs, "
                                             f"{bp.density:.2%}")
            eff = _cost.pair_efficiency(spec, L, bp)
        algorithms["window"], reasons["window"] = algo, why
        a = g.nodes[win_nodes[0]]
        a["algorithm"] = algo
        a["block"] = {"block_m": bm, "block_n": bn, "tile": None if bp is None else bp.tile}
    linear_algo = None
    if scan_nodes:
        lin = spec.linear
        linear_algo = hints.get("linear_algorithm") or _cost.default_linear_algorithm(
            spec.causal, L, lin.chunk_size, decode)
        if linear_algo not in _cost.LINEAR_ALGORITHMS:
            raise ValueError(f"linear_algorithm must be one of {_cost.LINEAR_ALGORITHMS}, got {linear_algo!r}")
        if (linear_algo == "noncausal") != (not spec.causal):
            raise ValueError(f"linear_algorithm={linear_algo!r} does not fit a {'causal' if spec.causal else 'non-causal'} "
                             "linear branch")
        why = {"noncausal": "non-causal: S = phi(K)^T V once, then phi(Q) S",
               "recurrent": "one token at a time: S_t = diag(a_t) S_{t-1} + phi(k_t)^T v_t",
               "quadratic": f"L={L} <= chunk_size={lin.chunk_size}: one chunk, masked quadratic form",
               "chunked": f"chunks of {lin.chunk_size}: quadratic inside, state carried across "
                          f"{-(-L // lin.chunk_size)} chunks"}[linear_algo]
        algorithms["linear"], reasons["linear"] = linear_algo, why
        g.nodes[scan_nodes[0]]["algorithm"] = linear_algo
    combines = nodes_by_op(g, "combine")
    if combines:
        algo, why = _choose_fusion(spec, decode)
        algorithms["hybrid"], reasons["hybrid"] = algo, why
        g.nodes[combines[0]]["algorithm"] = algo
    out = nodes_by_op(g, "output")[0]
    has_state_in = any("S0" in in_wires(g, n) for n in scan_nodes)
    cost_sizes = {"B": sizes.get("B") or 1, "H": sizes.get("H") or 1, "D": sizes.get("D") or 64}
    cost_sizes.update(Dv=sizes.get("Dv") or cost_sizes["D"], Hkv=sizes.get("Hkv") or cost_sizes["H"],
                      dtype_bytes=int(hints.get("dtype_bytes", 2)))
    est = _cost.estimate(spec, L, E=sizes.get("E"), linear_algorithm=linear_algo, initial_state=has_state_in,
                         return_state=g.nodes[out]["params"].get("return_state", False), decode=decode, **cost_sizes)
    src = g.graph["source_spec"]
    used = {g.nodes[n]["params"]["name"] for n in nodes_by_op(g, "input")}
    dropped = tuple(t for t in (*required_tensors(src), "initial_state") if t not in used
                    and (t != "initial_state" or hints.get("initial_state")))
    return Plan(spec=src, canonical_spec=spec, L=L, graph=g, rewrites=tuple(g.graph.get("rewrites", ())),
                algorithms=algorithms, reasons=reasons, block_plan=bp, block_m=bm, block_n=bn, cost=est,
                pair_efficiency=eff, cost_sizes=cost_sizes, dropped_inputs=dropped, hints=dict(hints))


def _choose_fusion(spec: AttentionSpec, decode: bool) -> Tuple[str, str]:
    if decode:
        return "fused", "decoding: one step updates the state and reads the window cache"
    return choose_algorithm(spec)   # the decision both backends build (lincomp.ir.lowered)


def lower_to_plan(spec, L: int, **hints) -> Plan:
    """build_graph -> verify -> canonicalise -> verify -> plan, for ``spec`` at length ``L``.

    Hints (``PLAN_HINTS``): sizes ``B, H, Hkv, D, Dv, E`` (cost estimates; B=1, H=1, D=64 otherwise),
    ``dtype_bytes``, ``block`` / ``block_m`` / ``block_n`` / ``tile`` / ``order`` for the block plan,
    ``decode``, ``linear_algorithm`` to override a choice, ``initial_state`` / ``return_state``.
    """
    spec = AttentionSpec.coerce(spec)
    unknown = sorted(set(hints) - set(PLAN_HINTS))
    if unknown:
        raise TypeError(f"unknown plan hint(s) {unknown}; hints are {list(PLAN_HINTS)}")
    sizes = {k: hints[k] for k in ("B", "H", "Hkv", "D", "Dv", "E") if hints.get(k) is not None}
    if spec.linear is not None and spec.linear.feature_dim is not None:
        sizes.pop("E", None)
    graph = build_graph(spec, L, initial_state=bool(hints.get("initial_state")),
                        return_state=bool(hints.get("return_state")), sizes=sizes)
    verify(graph)
    graph = verify(canonicalise(graph))
    return plan(graph, **hints)


__all__ = ["verify", "canonicalise", "plan", "lower_to_plan", "Plan", "Rewrite", "PLAN_HINTS",
           "WINDOW_ALGORITHMS", "HYBRID_ALGORITHMS", "window_part", "savings_text"]
