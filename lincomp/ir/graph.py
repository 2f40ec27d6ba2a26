"""The lincomp IR: one attention spec at one sequence length as a small op graph (a networkx DAG).

Nodes are ops (inputs included) that produce named tensors; every node carries typed attributes:

- ``op``: the op kind (``OPS``);
- ``inputs``: ``{port: TensorType}``, what the op expects on each input port;
- ``outputs``: ``{name: TensorType}``, what it produces;
- ``params``: op parameters (plain values: the window, the feature map, the chunk size, ...);
- ``algorithm``: ``None`` until the ``plan`` pass chooses one.

An edge ``u -> v`` carries ``wires = [(output name of u, input port of v), ...]`` (several wires when one
node feeds several ports of another, e.g. a window's ``num`` and ``den`` into a shared combine).
Shapes are tuples of symbols (``B, H, Hkv, L, D, Dv, E, F, m``); ``graph.graph["sizes"]`` binds the
symbols that are known (``L`` always). The graph is built from a spec by :func:`build_graph`, turned back
into a spec by :func:`graph_to_spec`, and printed by :func:`format_ir`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import networkx as nx

from lincomp.spec import AttentionSpec, GridWindow, LinearBranch, TerracedWindow, Window1D

OPS = ("input", "feature_map", "cumulative_gate", "linear_scan", "window_softmax", "combine", "normalize",
       "output")
SYMBOLS = ("B", "H", "Hkv", "L", "D", "Dv", "E", "F", "m")


@dataclass(frozen=True)
class TensorType:
    """A symbolic tensor type: ``shape`` is a tuple of symbols / ints, ``dtype`` is ``"in"`` (the dtype
    of q) or ``"f32"`` (an accumulator: scan terms, states, softmax sums)."""

    shape: Tuple
    dtype: str = "in"

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"


def _t(*shape, dtype: str = "in") -> TensorType:
    """Shorthand: ``_t("B", "H", "L", "D")``."""
    return TensorType(tuple(shape), dtype)


# Shapes of the tensors of docs/semantics.md, by keyword name.
_QKV = {"q": _t("B", "H", "L", "D"), "k": _t("B", "Hkv", "L", "D"), "v": _t("B", "Hkv", "L", "Dv")}


def add_node(graph: nx.DiGraph, node: str, op: str, /, *, inputs: Optional[Mapping] = None,
             outputs: Optional[Mapping] = None, **params) -> str:
    """Add op node ``node`` (a unique name) and return it; ``params`` become the node's params."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {list(OPS)}")
    if node in graph:
        raise ValueError(f"node {node!r} already exists")
    graph.add_node(node, op=op, inputs=dict(inputs or {}), outputs=dict(outputs or {}), params=params,
                   algorithm=None)
    return node


def connect(graph: nx.DiGraph, src: str, dst: str, out: str, port: str) -> None:
    """Wire output ``out`` of ``src`` into input ``port`` of ``dst``."""
    if graph.has_edge(src, dst):
        graph.edges[src, dst]["wires"].append((out, port))
    else:
        graph.add_edge(src, dst, wires=[(out, port)])


def _input(graph: nx.DiGraph, name: str, ttype: TensorType, *, optional: bool = False) -> str:
    return add_node(graph, name, "input", outputs={"value": ttype}, name=name, optional=optional)


def in_wires(graph: nx.DiGraph, node: str) -> Dict[str, Tuple[str, str]]:
    """``{port: (producer node, producer output)}`` of ``node`` (the last wire wins; verify checks duplicates)."""
    res = {}
    for src in graph.predecessors(node):
        for out, port in graph.edges[src, node]["wires"]:
            res[port] = (src, out)
    return res


def nodes_by_op(graph: nx.DiGraph, op: str) -> List[str]:
    return [n for n, a in graph.nodes(data=True) if a["op"] == op]


def derive_sizes(spec: AttentionSpec, L: int, sizes: Optional[Mapping]) -> dict:
    """Concrete values of the shape symbols (None where unknown): the given ones, L, m, and what follows
    (Hkv = H and Dv = D by default, F = D or 2E, E from the spec's feature_dim)."""
    s = {k: None for k in SYMBOLS}
    for k, val in dict(sizes or {}).items():
        if k not in SYMBOLS:
            raise ValueError(f"unknown size symbol {k!r}; symbols are {list(SYMBOLS)}")
        s[k] = None if val is None else int(val)
    s["L"] = int(L)
    s["m"] = spec.sinks
    if s["Hkv"] is None:
        s["Hkv"] = s["H"]
    if s["Dv"] is None:
        s["Dv"] = s["D"]
    lin = spec.linear
    if lin is not None:
        if lin.has_weights:
            if lin.feature_dim is not None:
                s["E"] = lin.feature_dim
            s["F"] = None if s["E"] is None else 2 * s["E"]
        else:
            s["F"] = s["D"]
    return s


def build_graph(spec, L: int, *, initial_state: bool = False, return_state: bool = False,
                sizes: Optional[Mapping] = None) -> nx.DiGraph:
    """The IR of ``spec`` at sequence length ``L``.

    ``initial_state`` / ``return_state``: whether the call passes ``initial_state`` / asks for the final
    state (causal linear branches only). ``sizes``: known values of ``B, H, Hkv, D, Dv, E``.
    """
    spec = AttentionSpec.coerce(spec)
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise ValueError(f"L must be a positive int, got {L!r}")
    expected = spec.expected_length()
    if expected is not None and expected != L:
        raise ValueError(f"L={L} does not match the spec's grid: expected prefix + prod(grid) = {expected}; "
                         "use spec.with_grid(...) for another size")
    lin = spec.linear
    stateful = lin is not None and spec.causal
    if (initial_state or return_state) and not stateful:
        raise ValueError("initial_state / return_state need a causal linear branch; this spec "
                         f"({spec.summary()}) has none")
    if return_state and spec.combine == "shared":
        raise ValueError("return_state is not defined for combine='shared' (docs/semantics.md section 3)")

    g = nx.DiGraph(source_spec=spec, L=int(L), sizes=derive_sizes(spec, L, sizes), rewrites=[])
    g.graph["relations"] = {} if lin is None else {"F": "2*E" if lin.has_weights else "D"}
    for name, tt in _QKV.items():
        _input(g, name, tt)

    linear_out = window_out = None
    if lin is not None:
        linear_out = _build_linear(g, spec, initial_state, exclude_window=spec.combine == "shared")
    if spec.has_softmax:
        window_out = _build_window(g, spec)

    if spec.combine == "shared":
        _input(g, "window_gamma", _t("H"))
        add_node(g, "combine", "combine", mode="shared",
                 inputs={"window_num": _t("B", "H", "L", "Dv", dtype="f32"), "window_den": _t("B", "H", "L", dtype="f32"),
                         "linear_num": _t("B", "H", "L", "Dv", dtype="f32"), "linear_den": _t("B", "H", "L", dtype="f32"),
                         "gamma": _t("H")},
                 outputs={"num": _t("B", "H", "L", "Dv", dtype="f32"), "den": _t("B", "H", "L", dtype="f32")})
        connect(g, "window", "combine", "num", "window_num")
        connect(g, "window", "combine", "den", "window_den")
        connect(g, "scan", "combine", "num", "linear_num")
        connect(g, "scan", "combine", "den", "linear_den")
        connect(g, "window_gamma", "combine", "value", "gamma")
        o = _normalize(g, "norm", ("combine", "num"), ("combine", "den"), "divide")
    elif spec.combine == "sum":
        o_lin = _normalize_linear(g, lin, "norm_linear")
        o_win = _normalize(g, "norm_window", ("window", "num"), ("window", "den"), "divide")
        _input(g, "alpha", _t("H"))
        add_node(g, "combine", "combine", mode="sum",
                 inputs={"linear": _t("B", "H", "L", "Dv"), "window": _t("B", "H", "L", "Dv"), "alpha": _t("H")},
                 outputs={"o": _t("B", "H", "L", "Dv")})
        connect(g, o_lin, "combine", "o", "linear")
        connect(g, o_win, "combine", "o", "window")
        connect(g, "alpha", "combine", "value", "alpha")
        o = "combine"
    elif linear_out is not None:
        o = _normalize_linear(g, lin, "norm")
    else:
        o = _normalize(g, "norm", ("window", "num"), ("window", "den"), "divide")

    out_inputs = {"o": _t("B", "H", "L", "Dv")}
    if return_state:
        out_inputs.update(S=_t("B", "H", "F", "Dv", dtype="f32"), z=_t("B", "H", "F", dtype="f32"))
    add_node(g, "output", "output", inputs=out_inputs, return_state=bool(return_state))
    connect(g, o, "output", "o", "o")
    if return_state:
        connect(g, "scan", "output", "S", "S")
        connect(g, "scan", "output", "z", "z")
    return g


def _build_linear(g: nx.DiGraph, spec: AttentionSpec, initial_state: bool, exclude_window: bool) -> str:
    lin: LinearBranch = spec.linear
    phi = _t("B", "H", "L", "F", dtype="f32")
    for side in ("q", "k"):
        ins = {"x": _QKV[side]}
        if lin.has_weights:
            wname = f"feature_weight_{side}"
            _input(g, wname, _t("H", "D", "E"))
            ins["weight"] = _t("H", "D", "E")
        # The k side expands key heads to query heads (GQA): hedgehog weights are per query head.
        add_node(g, f"phi_{side}", "feature_map", inputs=ins, outputs={"y": phi}, map=lin.feature_map,
                 side=side, feature_dim=lin.feature_dim, expand_heads=side == "k")
        connect(g, side, f"phi_{side}", "value", "x")
        if lin.has_weights:
            connect(g, f"feature_weight_{side}", f"phi_{side}", "value", "weight")
    ins = {"phi_q": phi, "phi_k": phi, "v": _QKV["v"]}
    if lin.gate is not None:
        gt = _t("B", "H", "L") if lin.gate == "scalar" else _t("B", "H", "L", "F")
        _input(g, "g", gt)
        add_node(g, "gate", "cumulative_gate", inputs={"g": gt}, outputs={"G": TensorType(gt.shape, "f32")},
                 kind=lin.gate)
        connect(g, "g", "gate", "value", "g")
        ins["gate"] = TensorType(gt.shape, "f32")
    if initial_state:
        # One input node with two outputs: the call passes (S0, z0), or S0 alone (z0 = 0).
        add_node(g, "initial_state", "input", outputs={"S0": _t("B", "H", "F", "Dv"), "z0": _t("B", "H", "F")},
                 name="initial_state", optional=True)
        ins.update(S0=_t("B", "H", "F", "Dv"), z0=_t("B", "H", "F"))
    outs = {"num": _t("B", "H", "L", "Dv", dtype="f32"), "den": _t("B", "H", "L", dtype="f32")}
    if spec.causal:
        outs.update(S=_t("B", "H", "F", "Dv", dtype="f32"), z=_t("B", "H", "F", dtype="f32"))
    add_node(g, "scan", "linear_scan", inputs=ins, outputs=outs, causal=spec.causal, linear=lin,
             chunk_size=lin.chunk_size, exclude_window=exclude_window)
    for port in ("phi_q", "phi_k"):
        connect(g, port, "scan", "y", port)
    connect(g, "v", "scan", "value", "v")
    if lin.gate is not None:
        connect(g, "gate", "scan", "G", "gate")
    if initial_state:
        connect(g, "initial_state", "scan", "S0", "S0")
        connect(g, "initial_state", "scan", "z0", "z0")
    return "scan"


def _build_window(g: nx.DiGraph, spec: AttentionSpec) -> str:
    ins = dict(_QKV)
    if spec.sinks:
        _input(g, "sink_logits", _t("H", "m"))
        ins["sinks"] = _t("H", "m")
    if spec.pool is not None:   # CLEAR's pooled keys: P = prod(grid / pool) extra keys, pooled with this weight
        _input(g, "pool_weight", _t(*map(str, spec.pool)))
        ins["pool_weight"] = _t(*map(str, spec.pool))
    # num/den are the un-normalised softmax sums, shifted by the row max of the window scores (m_i).
    add_node(g, "window", "window_softmax", inputs=ins,
             outputs={"num": _t("B", "H", "L", "Dv", dtype="f32"), "den": _t("B", "H", "L", dtype="f32")},
             window=spec.window, prefix=spec.prefix, causal=spec.causal, sinks=spec.sinks)
    for name in ("q", "k", "v"):
        connect(g, name, "window", "value", name)
    if spec.sinks:
        connect(g, "sink_logits", "window", "value", "sinks")
    if spec.pool is not None:
        connect(g, "pool_weight", "window", "value", "pool_weight")
    return "window"


def _normalize(g: nx.DiGraph, name: str, num: Tuple[str, str], den: Optional[Tuple[str, str]], mode: str) -> str:
    """``o = num / den`` (0 where den == 0) for ``mode="divide"``, ``o = linear_scale * num`` for "scale"."""
    ins = {"num": _t("B", "H", "L", "Dv", dtype="f32")}
    if den is not None:
        ins["den"] = _t("B", "H", "L", dtype="f32")
    add_node(g, name, "normalize", inputs=ins, outputs={"o": _t("B", "H", "L", "Dv")}, mode=mode)
    connect(g, num[0], name, num[1], "num")
    if den is not None:
        connect(g, den[0], name, den[1], "den")
    return name


def _normalize_linear(g: nx.DiGraph, lin: LinearBranch, name: str) -> str:
    if lin.normalize:
        return _normalize(g, name, ("scan", "num"), ("scan", "den"), "divide")
    return _normalize(g, name, ("scan", "num"), None, "scale")


# ------------------------------------------------------------------------------------ graph -> spec
def graph_to_spec(graph: nx.DiGraph) -> AttentionSpec:
    """The spec the graph computes now (after rewrites: the canonical spec). Inverse of build_graph."""
    windows, scans = nodes_by_op(graph, "window_softmax"), nodes_by_op(graph, "linear_scan")
    combines = nodes_by_op(graph, "combine")
    if len(windows) > 1 or len(scans) > 1 or len(combines) > 1:
        raise ValueError("graph_to_spec needs at most one window, one scan and one combine node")
    src: AttentionSpec = graph.graph["source_spec"]
    # Without a window node the prefix has no effect; keep the source's so specs round-trip exactly.
    window, prefix, sinks, causal = None, src.prefix, 0, src.causal
    if windows:
        p = graph.nodes[windows[0]]["params"]
        window, prefix, sinks, causal = p["window"], p["prefix"], p["sinks"], p["causal"]
    linear = graph.nodes[scans[0]]["params"]["linear"] if scans else None
    if scans:
        causal = graph.nodes[scans[0]]["params"]["causal"]
    combine = graph.nodes[combines[0]]["params"]["mode"] if combines else None
    if windows and window is None and linear is not None:
        # A spec says "dense softmax branch" only without a linear branch (window=None + linear means
        # linear-only). In a hybrid, a window that became dense at this L is the full 1D band.
        L = graph.graph["L"]
        window, prefix = Window1D(L - 1, 0 if causal else L - 1), 0
    return AttentionSpec(window=window, causal=causal, prefix=prefix, sinks=sinks, linear=linear,
                         combine=combine, name=src.name)


# ----------------------------------------------------------------------------------------- printing
def _fmt_param(value) -> str:
    if isinstance(value, Window1D):
        return f"1d(left={value.left}, right={value.right})"
    if isinstance(value, TerracedWindow):
        return f"terraced(block={value.block})"
    if isinstance(value, GridWindow):
        shape = (f"tile {'x'.join(map(str, value.tile))} kernel {'x'.join(map(str, value.kernel))}"
                 if value.shape == "tile" else f"{value.shape} r={value.radius}")
        pool = "" if value.pool is None else f", pool {'x'.join(map(str, value.pool))}"
        return f"{value.kind}({'x'.join(map(str, value.grid))}, {shape}{pool})"
    if isinstance(value, LinearBranch):
        return (f"{value.feature_map}{'' if value.feature_dim is None else f'/{value.feature_dim}'}"
                f"{', gate=' + value.gate if value.gate else ''}{', normalize' if value.normalize else ''}")
    if value is None:
        return "dense"
    return str(value)


# Params shown in the dump (the rest are derivable or shown elsewhere).
_SHOWN = {"feature_map": ("map",), "cumulative_gate": ("kind",), "combine": ("mode",), "normalize": ("mode",),
          "linear_scan": ("linear", "causal", "chunk_size", "exclude_window"),
          "window_softmax": ("window", "prefix", "causal", "sinks"), "output": ("return_state",)}


def topo_order(graph: nx.DiGraph) -> List[str]:
    """A stable topological order (ties broken by insertion order)."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    return list(nx.lexicographical_topological_sort(graph, key=index.__getitem__))


def format_ir(graph: nx.DiGraph) -> str:
    """A readable dump: one line per node in topological order, e.g.

    ``%window = window_softmax(q=%q, k=%k, v=%v) {window=2d(64x64, circle r=8), prefix=512} -> num: f32[B,H,L,Dv], ...``
    """
    s = graph.graph["sizes"]
    known = ", ".join(f"{k}={v}" for k, v in s.items() if v is not None)
    rel = ", ".join(f"{k}={v}" for k, v in graph.graph.get("relations", {}).items())
    try:
        title = graph_to_spec(graph).summary()
    except (ValueError, TypeError):   # a broken graph still prints (that is when a dump helps most)
        title = "(not a valid spec)"
    lines = [f"ir {title or 'attention'} ({known}{'; ' + rel if rel else ''})"]
    order = topo_order(graph) if nx.is_directed_acyclic_graph(graph) else list(graph.nodes)
    for n in order:
        a = graph.nodes[n]
        if a["op"] == "input":
            outs = ", ".join(f"{k}: {t}" for k, t in a["outputs"].items()) if len(a["outputs"]) > 1 \
                else str(next(iter(a["outputs"].values())))
            opt = " (optional)" if a["params"].get("optional") else ""
            lines.append(f"  %{n} = input : {outs}{opt}")
            continue
        wires = in_wires(graph, n)
        args = ", ".join(f"{p}=%{wires[p][0]}{'' if wires[p][1] in ('value', 'y', 'o') else '.' + wires[p][1]}"
                         if p in wires else f"{p}=<missing>" for p in a["inputs"])
        shown = [f"{k}={_fmt_param(a['params'][k])}" for k in _SHOWN.get(a["op"], ()) if k in a["params"]
                 and not (k in ("prefix", "sinks") and not a["params"][k])
                 and not (k == "exclude_window" and not a["params"][k])
                 and not (k == "return_state" and not a["params"][k])]
        algo = f" @{a['algorithm']}" if a.get("algorithm") else ""
        outs = ", ".join(f"{k}: {t}" for k, t in a["outputs"].items())
        lines.append(f"  %{n} = {a['op']}({args})"
                     f"{' {' + ', '.join(shown) + '}' if shown else ''}{algo}{' -> ' + outs if outs else ''}")
    return "\n".join(lines)


def copy_graph(graph: nx.DiGraph) -> nx.DiGraph:
    """A copy whose node params, inputs, outputs and edge wires can be edited independently."""
    h = nx.DiGraph(**{k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                      for k, v in graph.graph.items()})
    for n, a in graph.nodes(data=True):
        h.add_node(n, op=a["op"], inputs=dict(a["inputs"]), outputs=dict(a["outputs"]), params=dict(a["params"]),
                   algorithm=a.get("algorithm"), **{k: v for k, v in a.items()
                                                    if k not in ("op", "inputs", "outputs", "params", "algorithm")})
    for u, v, a in graph.edges(data=True):
        h.add_edge(u, v, wires=list(a["wires"]))
    return h


