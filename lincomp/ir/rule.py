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
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Tuple

from lincomp.spec import AttentionSpec, GridWindow, TerracedWindow, Window1D

# op -> (arity, python/triton infix, TVMScript infix or function)
_INFIX = {"add": "+", "sub": "-", "mul": "*", "floordiv": "//", "mod": "%", "lt": "<", "le": "<=", "eq": "==",
          "and": "&", "or": "|"}
_TVM = {"floordiv": "T.floordiv", "mod": "T.floormod", "min": "T.min", "max": "T.max", "abs": "T.abs",
        "and": " and ", "or": " or "}
_BOOL_OPS = ("lt", "le", "eq", "and", "or")


@dataclass(frozen=True)
class Expr:
    """One node: ``op`` is "var" (args = (name,)), "const" (args = (value,)) or an operator of its args."""

    op: str
    args: tuple

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
    def __gt__(self, o): return self._bin("lt", o, True)
    def __ge__(self, o): return self._bin("le", o, True)
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


def any_of(terms: List[Expr]) -> Expr:
    out = const(False)
    for t in terms:
        out = out | t
    return out


I, J = var("i"), var("j")   # query / key token index (original order, prefix included)


# ================================================================================= window rules
def grid_coord(p: Expr, grid: Tuple[int, ...], axis: int) -> Expr:
    """Coordinate of (body) position ``p`` along ``axis`` of a row-major grid."""
    stride = math.prod(grid[axis + 1:])
    c = p // stride
    return c if axis == 0 else c % grid[axis]


def _rule_1d(w: Window1D, causal: bool, prefix: int) -> Tuple[Expr, bool]:
    d = I - J   # i - j; the prefix shift cancels
    lower = -w.right
    if causal and not prefix:   # causal is d >= 0 itself: one test fewer per pair
        return (d <= w.left) & (d >= max(lower, 0)), True
    return (d <= w.left) & (d >= lower), False


def _rule_terraced(w: TerracedWindow, ip: Expr, jp: Expr, prefix: int) -> Tuple[Expr, bool]:
    b = w.block
    rule = (jp <= ip) & ((ip // b - jp // b) <= 1)   # with j <= i, block(j) <= block(i)
    return rule, not prefix   # j <= i is part of the rule: causal adds nothing without a prefix


def _rule_grid(w: GridWindow, ip: Expr, jp: Expr) -> Expr:
    nd = len(w.grid)
    qc = [grid_coord(ip, w.grid, a) for a in range(nd)]
    kc = [grid_coord(jp, w.grid, a) for a in range(nd)]
    if w.shape == "circle":
        d = [a - b for a, b in zip(qc, kc)]
        total = d[0] * d[0]
        for x in d[1:]:
            total = total + x * x
        return total < w.radius * w.radius
    if w.shape == "square":
        return all_of([absolute(a - b) <= w.radius for a, b in zip(qc, kc)])
    if w.shape == "tile":
        terms = []
        for a, (t, k, g) in enumerate(zip(w.tile, w.kernel, w.grid)):
            h, n_tiles = k // 2, g // t
            centre = qc[a] // t
            if h:   # the query's window shifts inside at borders (a kernel of 1 needs no clamp)
                centre = clamp(centre, h, n_tiles - 1 - h)
            terms.append(absolute(centre - kc[a] // t) <= h)
        return all_of(terms)
    raise ValueError(f"window.shape {w.shape!r} has no rule")


def window_rule(spec: AttentionSpec) -> Tuple[Optional[Expr], bool]:
    """(the window's own rule on I, J or None for no window, whether it already implies causality)."""
    w, n = spec.window, spec.prefix
    ip, jp = I - n, J - n
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
        vis = vis | (I < spec.prefix) | (J < spec.prefix)
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
    import torch

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
                "mod": lambda: x % y, "lt": lambda: x < y, "le": lambda: x <= y, "eq": lambda: x == y,
                "and": lambda: x & y, "or": lambda: x | y}[e.op]()

    return ev(expr)


def mask(spec: AttentionSpec, i, j):
    """Bool tensor: query ``i`` sees key ``j`` (broadcast index tensors; what FlexAttention calls)."""
    out = evaluate(visibility(spec), {"i": i, "j": j})
    if isinstance(out, bool):   # no window, not causal: every pair
        import torch
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
def _wrap(text: str) -> str:
    """``text`` as one operand: names, numbers, calls and subscripts stay as they are, the rest gets
    parentheses."""
    head = text
    for k, ch in enumerate(text):
        if ch in "([":
            head = text[:k]
            break
    atomic_head = head != "" and not head[0].isdigit() and all(c.isalnum() or c in "_." for c in head)
    if head == text:
        return text if text.lstrip("-").replace("_", "").replace(".", "").isalnum() and \
            not text.startswith("-") else f"({text})"
    if (atomic_head or head == "") and _balanced(text[len(head):]):
        return text
    return f"({text})"


def _balanced(text: str) -> bool:
    """True when ``text`` is a chain of bracket groups, e.g. ``(a, b)``, ``[i]`` or ``[i](x)``."""
    depth = 0
    for k, ch in enumerate(text):
        depth += ch in "(["
        depth -= ch in ")]"
        if depth == 0 and k < len(text) - 1 and text[k + 1] not in "([":
            return False
    return depth == 0 and text[:1] in ("(", "[")


_ASSOCIATIVE = ("and", "or", "add", "mul")


def _operand(parent: Expr, child: Expr, text: str) -> str:
    """``text`` of ``child`` inside ``parent``'s infix: a chain of one associative op needs no parentheses."""
    if parent.op in _ASSOCIATIVE and child.op == parent.op and child is parent.args[0]:
        return text
    return _wrap(text)


def tvm_expr(expr: Expr, env: Dict[str, str]) -> str:
    """One TVMScript expression on scalars (``env`` maps "i" / "j" to the query / key position text)."""
    def pr(e: Expr) -> str:
        if e.op == "var":
            return env[e.args[0]]
        if e.op == "const":
            return str(e.args[0])
        a = [pr(x) for x in e.args]
        if e.op == "abs":
            return f"T.abs({a[0]})"
        if e.op in ("floordiv", "mod", "min", "max"):
            return f"{_TVM[e.op]}({a[0]}, {a[1]})"
        x, y = _operand(e, e.args[0], a[0]), _wrap(a[1])
        if e.op in ("and", "or"):
            return f"{x}{_TVM[e.op]}{y}"
        return f"{x} {_INFIX[e.op]} {y}"

    return pr(expr)


def triton_lines(expr: Expr, env: Dict[str, str], broadcast: Optional[Dict[str, str]] = None,
                 out: str = "vis") -> List[str]:
    """Triton statements assigning ``expr`` to ``out``.

    ``env`` maps "i" / "j" to vector names. With ``broadcast`` (e.g. {"i": "_rows({})", "j": "_cols({})"})
    the two sides are vectors: a subexpression of one side is computed on its vector, and wrapped by the
    side's format where it meets the other side. Without it, the names are already broadcast tensors.
    A subexpression used twice, or a one-sided one meeting the other side, gets its own line.
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
    counter = {"q": 0, "k": 0, "t": 0}
    side_tag = {frozenset({"i"}): "q", frozenset({"j"}): "k"}

    def fresh(e: Expr) -> str:
        tag = side_tag.get(e.sides(), "t")
        counter[tag] += 1
        return f"{tag}{counter[tag] - 1}"

    def lift(e: Expr, text: str, parent_sides: frozenset) -> str:
        """``text`` of one-sided ``e`` as the tile axis of its side, where the parent mixes sides."""
        s = e.sides()
        if broadcast is None or len(s) != 1 or len(parent_sides) < 2:
            return text
        return broadcast[next(iter(s))].format(text)

    def pr(e: Expr) -> str:
        if e in names:
            return names[e]
        if e.op == "var":
            return env[e.args[0]]
        if e.op == "const":
            return str(e.args[0])
        sides = e.sides()
        parts = []
        for a in e.args:
            t = pr(a)
            if broadcast is not None and len(a.sides()) == 1 and len(sides) == 2 and a.op not in ("var", "const") \
                    and a not in names:
                name = fresh(a)   # computed once on the vector, then broadcast
                lines.append(f"{name} = {t}")
                names[a] = name
                t = name
            parts.append(lift(a, t, sides))
        if e.op == "abs":
            text = f"tl.abs({parts[0]})"
        elif e.op in ("min", "max"):
            text = f"tl.{e.op}imum({parts[0]}, {parts[1]})"
        else:
            text = f"{_operand(e, e.args[0], parts[0])} {_INFIX[e.op]} {_wrap(parts[1])}"
        if uses.get(e, 0) > 1 and e is not expr:
            name = fresh(e)
            lines.append(f"{name} = {text}")
            names[e] = name
            return name
        return text

    if expr.op == "const":   # no window, not causal: a tile of one value
        i, j = (env[s] if broadcast is None else broadcast[s].format(env[s]) for s in ("i", "j"))
        lines.append(f"{out} = ({i} >= 0) | ({j} >= 0)" if expr.value else f"{out} = ({i} < 0) & ({j} < 0)")
        return lines
    text = pr(expr)
    if broadcast is not None and len(expr.sides()) < 2:
        raise ValueError("a tile mask must depend on both the query and the key")
    lines.append(f"{out} = {text}")
    return lines
