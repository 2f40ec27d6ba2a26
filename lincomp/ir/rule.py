"""The window rule as a small expression tree, and its printers (torch, FlexAttention, Triton, TVMScript).

:func:`visibility` builds, once per spec, the predicate "query token ``i`` sees key token ``j``" (original
token indices, prefix included) from one rule per window kind plus the prefix and causal terms. Every
backend prints the same tree:

- :func:`evaluate`: elementwise on (broadcast) index tensors -> a bool mask (torch);
- :func:`mask_mod`: a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``;
- :func:`triton_lines`: Triton statements on a query vector and a key vector (per-side subexpressions
  computed on the vectors, broadcast to the tile only where both sides meet);
- :func:`tvm_expr`: one TVMScript expression on scalars.

A new window shape is one ``_rule_*`` function here (plus its oracle in ``lincomp.reference.masks``,
which never imports this module, and its interval test in ``lincomp.ir.blocks``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Tuple

import torch

from lincomp.spec import AttentionSpec, GridWindow, TerracedWindow, Window1D

# Infix spelling, and precedence (higher binds tighter) in Python / Triton, where comparisons bind looser
# than & and |, and in TVMScript, where "and" / "or" bind looser than comparisons.
_INFIX = {"add": "+", "sub": "-", "mul": "*", "floordiv": "//", "mod": "%", "lt": "<", "le": "<=", "ge": ">=",
          "eq": "==", "and": "&", "or": "|"}
_PREC_PY = {"lt": 1, "le": 1, "ge": 1, "eq": 1, "or": 2, "and": 3, "add": 4, "sub": 4, "mul": 5, "floordiv": 5,
            "mod": 5}
_CALLS_TVM = {"floordiv": "T.floordiv", "mod": "T.floormod", "min": "T.min", "max": "T.max", "abs": "T.abs"}
_PREC_TVM = {**{k: v for k, v in _PREC_PY.items() if k not in _CALLS_TVM}, "or": 0, "and": 0.5}
_SPELL_TVM = {**_INFIX, "and": "and", "or": "or"}
_CALLS_TRITON = {"min": "tl.minimum", "max": "tl.maximum", "abs": "tl.abs"}
_COMPARE = ("lt", "le", "ge", "eq")
_ASSOCIATIVE = ("and", "or", "add", "mul")


@dataclass(frozen=True)
class Expr:
    """One node: ``op`` is "var" (args = (name,)), "const" (args = (value,)) or an operator of its args."""

    op: str
    args: tuple
    label: str = field(default="", compare=False)   # a name for generated code (e.g. "dy"); not part of the math

    # -- building (ints on either side become constants) -----------------------------------------
    def _bin(self, op, other, swap=False):
        other = other if isinstance(other, Expr) else const(other)
        return node(op, other, self) if swap else node(op, self, other)

    def __add__(self, o): return self._bin("add", o)
    def __radd__(self, o): return self._bin("add", o, True)
    def __sub__(self, o): return self._bin("sub", o)
    def __rsub__(self, o): return self._bin("sub", o, True)
    def __mul__(self, o): return self._bin("mul", o)
    def __floordiv__(self, o): return self._bin("floordiv", o)
    def __mod__(self, o): return self._bin("mod", o)
    def __lt__(self, o): return self._bin("lt", o)
    def __le__(self, o): return self._bin("le", o)
    def __ge__(self, o): return self._bin("ge", o)
    def __and__(self, o): return self._bin("and", o)
    def __or__(self, o): return self._bin("or", o)

    def eq(self, o) -> "Expr":
        return self._bin("eq", o)

    @property
    def value(self):
        return self.args[0] if self.op == "const" else None

    def sides(self) -> frozenset:
        """The variables this node depends on."""
        if self.op == "var":
            return frozenset(self.args)
        if self.op == "const":
            return frozenset()
        return frozenset().union(*(a.sides() for a in self.args))


def named(e: Expr, label: str) -> Expr:
    """``e`` with a name the text printers give its line when it gets one."""
    return replace(e, label=label) if e.op not in ("var", "const") else e


def var(name: str) -> Expr:
    return Expr("var", (name,))


def const(value) -> Expr:
    if isinstance(value, Expr):
        return value
    return Expr("const", (value,))


def node(op: str, *args: Expr) -> Expr:
    """An operator node, folded where an argument is a constant that decides or drops it."""
    vals = [a.value if a.op == "const" else None for a in args]
    if all(a.op == "const" for a in args) and op in ("and", "or"):
        return const(vals[0] and vals[1] if op == "and" else vals[0] or vals[1])
    if op in ("and", "or"):
        unit, zero = (True, False) if op == "and" else (False, True)
        for a, b, va in ((args[0], args[1], vals[0]), (args[1], args[0], vals[1])):
            if va is zero:
                return const(zero)
            if va is unit:
                return b
    if op in ("floordiv", "mul") and vals[1] == 1:
        return args[0]
    if op == "floordiv" and args[0].op == "floordiv" and args[0].args[1].op == "const" and vals[1] is not None \
            and vals[1] > 0 and args[0].args[1].value > 0:   # (x // a) // b == x // (a b)
        return node("floordiv", args[0].args[0], const(args[0].args[1].value * vals[1]))
    if op in ("add", "sub") and vals[1] == 0:
        return args[0]
    return Expr(op, tuple(args))


def minimum(a: Expr, b) -> Expr:
    return node("min", a, const(b))


def maximum(a: Expr, b) -> Expr:
    return node("max", a, const(b))


def absolute(a: Expr) -> Expr:
    return node("abs", a)


def clamp(a: Expr, lo: int, hi: int) -> Expr:
    return minimum(maximum(a, lo), hi)


def all_of(terms: List[Expr]) -> Expr:
    out = const(True)
    for t in terms:
        out = out & t
    return out


I, J = var("i"), var("j")   # query / key token index (original order, prefix included)


# ================================================================================= window rules
AXES = ("f", "y", "x")   # names of the grid axes in generated code (frames, rows, cols)


def grid_coord(p: Expr, grid: Tuple[int, ...], axis: int) -> Expr:
    """Coordinate of (body) position ``p`` along ``axis`` of a row-major grid."""
    stride = math.prod(grid[axis + 1:])
    c = p // stride
    return c if axis == 0 else c % grid[axis]


def _rule_1d(w: Window1D, causal: bool, prefix: int) -> Tuple[Expr, bool]:
    d = named(I - J, "d")   # i - j; the prefix shift cancels
    lower = -w.right
    if causal and not prefix:   # causal is d >= 0 itself: one test fewer per pair
        return (d <= w.left) & (d >= max(lower, 0)), True
    return (d <= w.left) & (d >= lower), False


def _rule_terraced(w: TerracedWindow, ip: Expr, jp: Expr, prefix: int) -> Tuple[Expr, bool]:
    b = w.block
    dblock = named(named(ip // b, "qb") - named(jp // b, "kb"), "dblock")
    rule = (jp <= ip) & (dblock <= 1)   # with j <= i, block(j) <= block(i)
    return rule, not prefix   # j <= i is part of the rule: causal adds nothing without a prefix


def _rule_grid(w: GridWindow, ip: Expr, jp: Expr) -> Expr:
    nd = len(w.grid)
    axes = AXES[-nd:]
    qc = [named(grid_coord(ip, w.grid, a), "q" + axes[a]) for a in range(nd)]
    kc = [named(grid_coord(jp, w.grid, a), "k" + axes[a]) for a in range(nd)]
    if w.shape == "circle":
        d = [named(a - b, "d" + x) for a, b, x in zip(qc, kc, axes)]
        total = d[0] * d[0]
        for x in d[1:]:
            total = total + x * x
        return total < w.grid_radius * w.grid_radius
    if w.shape == "square":
        return all_of([absolute(named(a - b, "d" + x)) <= w.grid_radius for a, b, x in zip(qc, kc, axes)])
    if w.shape == "tile":
        terms = []
        for a, (t, k, g) in enumerate(zip(w.tile, w.kernel, w.grid)):
            h, n_tiles = k // 2, g // t
            centre = qc[a] // t
            if h:   # the query's window shifts inside at borders (a kernel of 1 needs no clamp)
                centre = clamp(centre, h, n_tiles - 1 - h)
            centre, key_tile = named(centre, "c" + axes[a]), named(kc[a] // t, "t" + axes[a])
            terms.append(absolute(named(centre - key_tile, "d" + axes[a])) <= h if h else centre.eq(key_tile))
        return all_of(terms)
    raise ValueError(f"window.shape {w.shape!r} has no rule")


def window_rule(spec: AttentionSpec) -> Tuple[Optional[Expr], bool]:
    """(the window's own rule on I, J or None for no window, whether it already implies causality)."""
    w, n = spec.window, spec.prefix
    ip, jp = named(I - n, "qp"), named(J - n, "kp")   # positions after the prefix
    if w is None:
        return None, False
    if isinstance(w, Window1D):
        return _rule_1d(w, spec.causal, n)
    if isinstance(w, TerracedWindow):
        return _rule_terraced(w, ip, jp, n)
    if isinstance(w, GridWindow):
        return _rule_grid(w, ip, jp), False
    raise TypeError(f"unknown window {w!r}")


@lru_cache(maxsize=512)
def visibility(spec: AttentionSpec) -> Expr:
    """The whole W(i) membership of ``spec`` on (I, J): window rule | prefix rows / keys, & causal."""
    rule, implies_causal = window_rule(spec)
    vis = const(True) if rule is None else rule
    if rule is not None and spec.prefix:
        vis = vis | named(I < spec.prefix, "qpre") | named(J < spec.prefix, "kpre")
    if spec.causal and not implies_causal:
        vis = vis & (J <= I)
    return vis


def describe(spec: AttentionSpec) -> str:
    """One line in words (the comment above every generated rule)."""
    w, n = spec.window, spec.prefix
    if w is None:
        doc = "no window: every key" + (" j <= i" if spec.causal else "")
        return doc
    if isinstance(w, Window1D):
        doc = f"1D: i - {w.left} <= j <= i + {w.right}"
    elif isinstance(w, TerracedWindow):
        doc = f"terraced blocks of {w.block}: j <= i and block(j) in {{block(i) - 1, block(i)}}"
    elif w.shape == "tile":
        doc = (f"{w.kind} sliding tiles on grid {list(w.grid)}: tiles {list(w.tile)}, kernel {list(w.kernel)} "
               "tiles (|clamp(tile(i)) - tile(j)| <= kernel // 2 per axis)")
    elif w.shape == "circle":
        names = ("f", "y", "x")[-len(w.grid):]
        doc = f"{w.kind} circle on grid {list(w.grid)}: " + " + ".join(f"d{x}^2" for x in names) + f" < {w.radius}^2"
    else:
        doc = f"{w.kind} square on grid {list(w.grid)}: max |d| <= {w.radius}"
    if n:
        doc += f"; prefix {n}: rows and keys < {n} see / are seen by all"
    if spec.causal:
        doc += "; causal: j <= i"
    return doc


# ================================================================================= torch printers
def evaluate(expr: Expr, env: Dict[str, object]):
    """``expr`` on torch tensors (or ints): ``env`` maps "i" / "j" to (broadcastable) index tensors."""
    def ev(e: Expr):
        if e.op == "var":
            return env[e.args[0]]
        if e.op == "const":
            return e.args[0]
        a = [ev(x) for x in e.args]
        if e.op == "abs":
            return a[0].abs() if isinstance(a[0], torch.Tensor) else abs(a[0])
        if e.op in ("min", "max"):
            if isinstance(a[1], torch.Tensor):
                return (torch.minimum if e.op == "min" else torch.maximum)(a[0], a[1])
            return a[0].clamp(max=a[1]) if e.op == "min" else a[0].clamp(min=a[1])
        x, y = a
        return {"add": lambda: x + y, "sub": lambda: x - y, "mul": lambda: x * y, "floordiv": lambda: x // y,
                "mod": lambda: x % y, "lt": lambda: x < y, "le": lambda: x <= y, "ge": lambda: x >= y, "eq": lambda: x == y,
                "and": lambda: x & y, "or": lambda: x | y}[e.op]()

    return ev(expr)


def mask(spec: AttentionSpec, i, j):
    """Bool tensor: query ``i`` sees key ``j`` (broadcast index tensors; what FlexAttention calls)."""
    out = evaluate(visibility(spec), {"i": i, "j": j})
    if isinstance(out, bool):   # no window, not causal: every pair
        return torch.full(torch.broadcast_shapes(i.shape, j.shape), out, dtype=torch.bool, device=i.device)
    return out


def mask_mod(spec: AttentionSpec) -> Callable:
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` for ``spec``."""
    expr = visibility(spec)

    def fn(b, h, q_idx, kv_idx):
        out = evaluate(expr, {"i": q_idx, "j": kv_idx})
        if isinstance(out, bool):
            return (q_idx >= 0) | (kv_idx >= 0) if out else (q_idx < 0) & (kv_idx < 0)
        return out

    fn.__name__ = f"mask_{spec.summary()}"
    return fn


# ================================================================================ text printers
def _infix(e: Expr, texts: List[str], prec: Dict[str, float], spell: Dict[str, str] = _INFIX) -> str:
    """``a op b`` with the parentheses ``prec`` needs (no chained comparisons; ``a - (b - c)`` kept)."""
    p = prec[e.op]
    out = []
    for k, (child, text) in enumerate(zip(e.args, texts)):
        cp = prec.get(child.op, 9)   # names, numbers and calls bind tightest
        if child.op == "const" and str(text).startswith("-"):
            cp = 6
        tight = cp > p or (cp == p and ((k == 0 and e.op not in _COMPARE) or
                                        (e.op == child.op and e.op in _ASSOCIATIVE)))
        out.append(text if tight else f"({text})")
    return f"{out[0]} {spell[e.op]} {out[1]}"


def tvm_expr(expr: Expr, env: Dict[str, str]) -> str:
    """One TVMScript expression on scalars (``env`` maps "i" / "j" to the query / key position text)."""
    def pr(e: Expr) -> str:
        if e.op == "var":
            return env[e.args[0]]
        if e.op == "const":
            return str(e.args[0])
        a = [pr(x) for x in e.args]
        if e.op in _CALLS_TVM:
            return f"{_CALLS_TVM[e.op]}({', '.join(a)})"
        return _infix(e, a, _PREC_TVM, _SPELL_TVM)

    return pr(expr)


def triton_lines(expr: Expr, env: Dict[str, str], broadcast: Optional[Dict[str, str]] = None,
                 out: str = "vis") -> List[str]:
    """Triton statements assigning ``expr`` to ``out``.

    ``env`` maps "i" / "j" to vector names. With ``broadcast`` (e.g. {"i": "_rows({})", "j": "_cols({})"})
    the two sides are vectors: a subexpression of one side is computed on its vector, and wrapped by the
    side's format where it meets the other side. Without it, the names are already broadcast tensors.
    A subexpression used twice, a one-sided one meeting the other side, or a labelled tile term gets its
    own line (named by its label, else q0, k0, t0, ...).
    """
    uses: Dict[Expr, int] = {}

    def count(e: Expr):
        uses[e] = uses.get(e, 0) + 1
        if uses[e] == 1 and e.op not in ("var", "const"):
            for a in e.args:
                count(a)

    count(expr)
    lines: List[str] = []
    names: Dict[Expr, str] = {}
    taken = set(env.values()) | {out}
    side_tag = {frozenset({"i"}): "q", frozenset({"j"}): "k"}

    def assign(e: Expr, text: str) -> str:
        name = e.label
        if not name or name in taken:
            tag, n = side_tag.get(e.sides(), "t"), 0
            while f"{tag}{n}" in taken:
                n += 1
            name = f"{tag}{n}"
        taken.add(name)
        lines.append(f"{name} = {text}")
        names[e] = name
        return name

    def pr(e: Expr) -> str:
        if e in names:
            return names[e]
        if e.op == "var":
            return env[e.args[0]]
        if e.op == "const":
            return str(e.args[0])
        sides = e.sides()
        parts, kids = [], []
        for a in e.args:
            t = pr(a)
            meets = broadcast is not None and len(a.sides()) == 1 and len(sides) == 2
            if meets and a.op not in ("var", "const") and a not in names:
                t = assign(a, t)   # computed once on the vector, then broadcast
            if meets:
                t = broadcast[next(iter(a.sides()))].format(t)
            parts.append(t)
            kids.append(a if not (meets or a in names) else Expr("var", ("_",)))   # names print as atoms
        if e.op in _CALLS_TRITON:
            text = f"{_CALLS_TRITON[e.op]}({', '.join(parts)})"
        else:
            text = _infix(Expr(e.op, tuple(kids)), parts, _PREC_PY)
        named_tile = broadcast is not None and e.label and len(sides) == 2   # e.g. dy: one line per tile term
        if (uses.get(e, 0) > 1 or named_tile) and e is not expr:
            return assign(e, text)
        return text

    if expr.op == "const":   # no window, not causal: a tile of one value
        i, j = (env[s] if broadcast is None else broadcast[s].format(env[s]) for s in ("i", "j"))
        lines.append(f"{out} = ({i} >= 0) | ({j} >= 0)" if expr.value else f"{out} = ({i} < 0) & ({j} < 0)")
        return lines
    if broadcast is not None and len(expr.sides()) < 2:
        raise ValueError("a tile mask must depend on both the query and the key")
    lines.append(f"{out} = {pr(expr)}")
    return lines
