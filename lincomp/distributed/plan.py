"""What each rank computes and exchanges for a spec on a layout (pure Python; cached per spec+layout).

The local-compute trick: a window rule depends only on coordinate differences (apart from border
truncation), so rank r computes its rows on the sub-sequence of the keys they reach, the *key box*
(its box grown by the window's reach per axis, clipped to the grid), then keeps its own rows. Border
truncation at the key box edge is either the real border or beyond the reach. Terraced windows grow
to a block boundary so blocks stay aligned; causal masks survive because row-major order inside a
box is the global order restricted to it.

With ``overlap``, the own box is cut into an *interior* box (rows whose keys are all local, computed
while the halo is in flight) and up to ``2 * ndim`` border boxes (computed once the halo is there).
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch

from lincomp.distributed.layout import Box, Layout, box_shape, box_size, contiguous_range, flat_index
from lincomp.ir.lowered import lower
from lincomp.spec import AttentionSpec, GridWindow, TerracedWindow, Window1D


# ---------------------------------------------------------------------------------- geometry
def _axis_keys(spec: AttentionSpec, shape: tuple, axis: int, lo: int, hi: int) -> Tuple[int, int]:
    """Key range [klo, khi) on ``axis`` that rows [lo, hi) of that axis can see."""
    w, n = spec.window, shape[axis]
    if isinstance(w, Window1D):
        return max(0, lo - w.left), min(n, hi + (0 if spec.causal else w.right))
    if isinstance(w, TerracedWindow):
        return max(0, (lo // w.block - 1) * w.block), hi      # block aligned; j <= i always
    if isinstance(w, GridWindow):
        r = lower(spec).axis_reach[axis]
        return max(0, lo - r), min(n, hi + (0 if spec.causal and axis == 0 else r))
    return 0, (hi if spec.causal else n)                       # dense softmax: every earlier key


def key_box(spec: AttentionSpec, shape: tuple, box: Box) -> Box:
    """The keys (positions after the prefix) rows ``box`` can see through the window."""
    return tuple(_axis_keys(spec, shape, a, lo, hi) for a, (lo, hi) in enumerate(box))


def _interior(spec: AttentionSpec, shape: tuple, box: Box) -> Optional[Box]:
    """The rows of ``box`` whose keys all lie inside ``box``; None if there are none."""
    out = []
    for a, (lo, hi) in enumerate(box):
        rows = range(lo, hi)
        ilo = lo + bisect.bisect_left(rows, True, key=lambda p: _axis_keys(spec, shape, a, p, p + 1)[0] >= lo)
        ihi = lo + bisect.bisect_left(rows, True, key=lambda p: _axis_keys(spec, shape, a, p, p + 1)[1] > hi)
        if ilo >= ihi:
            return None
        out.append((ilo, ihi))
    return tuple(out)


def _frame(box: Box, inner: Box) -> List[Box]:
    """``box`` minus ``inner`` as disjoint boxes (slabs below/above ``inner`` along each axis)."""
    pieces = []
    for a in range(len(box)):
        head, tail = inner[:a], box[a + 1:]
        for lo, hi in ((box[a][0], inner[a][0]), (inner[a][1], box[a][1])):
            if lo < hi:
                pieces.append(head + ((lo, hi),) + tail)
    return pieces


def _intersect(a: Box, b: Box) -> Optional[Box]:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return None if any(lo >= hi for lo, hi in out) else out


def _inside(a: Box, b: Box) -> bool:
    return all(y0 <= x0 and x1 <= y1 for (x0, x1), (y0, y1) in zip(a, b))


# -------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Task:
    """One kernel call: the sub-sequence ``prefix + keys``; keep the outputs of ``rows``."""

    rows: Box
    keys: Box
    from_halo: bool          # keys reach outside the own box: read them from the halo-extended tensors
    state_at: Optional[int]  # flat position (after the prefix) of the linear state entering ``keys``


@dataclass
class RankPlan:
    rank: int
    own: Box
    ext: Box                               # own box + halo (the key box of the own box)
    tasks: List[Task]                      # window (or fused hybrid) tasks
    send: Dict[int, Box]                   # peer -> my tokens that peer needs
    recv: Dict[int, Box]                   # peer -> peer's tokens I need
    own_range: Optional[Tuple[int, int]]   # flat range of the own box (None if not contiguous)
    _index: Dict = field(default_factory=dict, repr=False)

    def index(self, name: str, device) -> torch.Tensor:
        """Cached index tensors: 'own_in_ext', 'send:<peer>', 'recv:<peer>', 'keys:<i>', 'rows:<i>', 'place'."""
        key = (name, str(device))
        if key not in self._index:
            self._index[key] = self._build(name).to(device)
        return self._index[key]

    def _build(self, name: str) -> torch.Tensor:
        kind, _, arg = name.partition(":")
        if kind == "own_in_ext":
            return flat_index(self.own, self.ext)
        if kind == "send":
            return flat_index(self.send[int(arg)], self.own)
        if kind == "recv":
            return flat_index(self.recv[int(arg)], self.ext)
        if kind in ("keys", "rows"):
            t = self.tasks[int(arg)]
            if kind == "rows":
                return flat_index(t.rows, t.keys)
            return flat_index(t.keys, self.ext if t.from_halo else self.own)
        if kind == "place":   # where the concatenated task rows go in own-box order
            order = torch.cat([flat_index(t.rows, self.own) for t in self.tasks])
            return torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel()))
        raise KeyError(name)


@dataclass(frozen=True)
class Branches:
    """How the spec's branches are computed: which sub-spec the window tasks run, and the linear part.

    ``task_spec``: spec of the window tasks (the full spec when ``fused``), None without a window.
    ``linear``: None, "scan" (causal: own rows with the incoming state) or "global" (non-causal sums).
    ``state_keys_prefix``: whether prefix keys enter the linear state (not in ``shared``: they are in every window).
    """

    task_spec: Optional[AttentionSpec]
    fused: bool
    linear: Optional[str]
    linear_spec: Optional[AttentionSpec]
    state_keys_prefix: bool
    exchange_gate: bool


def branches(spec: AttentionSpec) -> Branches:
    lin = spec.linear
    if lin is None:
        return Branches(spec, False, None, None, False, False)
    lin_spec = AttentionSpec(causal=spec.causal, linear=lin)
    if spec.window is None:
        return Branches(None, False, "scan" if spec.causal else "global", lin_spec, True, False)
    if spec.combine == "shared":
        if not spec.causal:
            raise NotImplementedError(
                "lincomp.distributed: combine='shared' with causal=false is not supported (its normaliser mixes "
                "window terms with a global linear sum no kernel returns separately); LoLCATs is causal: "
                "set causal=true, or use combine='sum'")
        return Branches(spec, True, None, None, False, lin.gate is not None)
    if spec.causal and spec.prefix == 0:          # Lizard: one fused call per task, state entering its keys
        return Branches(spec, True, None, None, True, lin.gate is not None)
    window_only = replace(spec, linear=None, combine=None, name=None)
    return Branches(window_only, False, "scan" if spec.causal else "global", lin_spec, True, False)


@dataclass
class GlobalPlan:
    spec: AttentionSpec
    layout: Layout
    parts: Branches
    ranks: List[RankPlan]
    exchange: bool                          # some rank needs a halo
    # Causal linear branch (empty otherwise). Rank r's slice is [start_r, stop_r) in row-major order, in rank
    # order; the scan gives each rank the state entering its slice; a state entering another position p
    # is made by the rank whose slice holds p and sent to whoever needs it.
    needs: Dict[int, List[int]]             # rank -> flat positions whose entering state it needs
    produce: Dict[int, List[int]]           # rank -> positions in its slice whose state it makes
    deliveries: Dict[Tuple[int, int], List[int]]   # (maker, user) -> positions sent from maker to user

    @property
    def has_states(self) -> bool:
        return bool(self.needs)

    def scan_rounds(self) -> List[int]:
        """Strides of the log-step (Kogge-Stone) rounds after the first shift by one rank."""
        world, out, s = self.layout.world_size, [], 1
        while s <= world - 2:
            out.append(s)
            s *= 2
        return out


def _task_spec(spec: AttentionSpec, keys: Box) -> AttentionSpec:
    return spec.with_grid(box_shape(keys)) if isinstance(spec.window, GridWindow) else spec


@functools.lru_cache(maxsize=256)
def global_plan(spec: AttentionSpec, layout: Layout, overlap: bool) -> GlobalPlan:
    """Every rank's tasks, halo boxes and state checkpoints (identical on every rank: no communication)."""
    w = spec.window
    if isinstance(w, GridWindow) and w.shape == "tile":
        # Each rank computes its rows on a sub-grid, which needs a window that only depends on coordinate
        # differences; a sliding tile's window depends on where its tile sits (it shifts at borders).
        raise ValueError("lincomp.distributed splits windows that are the same at every grid position; "
                         "window.shape 'tile' shifts at the grid borders: run it on one device "
                         "(lincomp.compile) or use shape 'square' / 'circle'")
    parts = branches(spec)
    shape = layout.shape
    need_state = parts.fused and spec.linear is not None
    scan = need_state or parts.linear == "scan"
    ranks = []
    for r in range(layout.world_size):
        own = layout.box(r)
        own_range = layout.flat_range(r)
        if scan and own_range is None:
            raise ValueError(f"a causal linear branch scans tokens in row-major order, but rank {r}'s patch "
                             f"{own} is not contiguous; split only axis 0 (mesh=({layout.world_size}, 1, ...))")
        tasks = []
        ext = own
        if parts.task_spec is not None:
            ext = key_box(parts.task_spec, shape, own)
            inner = _interior(parts.task_spec, shape, own) if overlap else None
            if inner is None or inner == own:
                boxes = [own]
            else:
                boxes = [inner] + _frame(own, inner)
            for rows in boxes:
                keys = key_box(parts.task_spec, shape, rows)
                start = contiguous_range(shape, keys)[0] if need_state else None
                tasks.append(Task(rows, keys, not _inside(keys, own), start))
        ranks.append(RankPlan(r, own, ext, tasks, {}, {}, own_range))
    for rp in ranks:                   # halo boxes: the part of every other box inside my key box
        for peer in ranks:
            if peer.rank != rp.rank:
                inter = _intersect(peer.own, rp.ext)
                if inter is not None:
                    rp.recv[peer.rank] = inter
                    peer.send[rp.rank] = inter
    exchange = any(rp.recv for rp in ranks)
    needs, produce, deliveries = {}, {}, {}
    if scan:
        starts = [rp.own_range[0] for rp in ranks]
        if starts != sorted(starts):
            raise ValueError(f"a causal linear branch needs the ranks' slices in sequence order, got starts {starts}")
        for rp in ranks:
            needs[rp.rank] = sorted({t.state_at for t in rp.tasks} if need_state else {rp.own_range[0]})
            produce[rp.rank] = set()
        for user, positions in needs.items():
            for p in positions:
                if p == 0:                   # the state after the prefix: every rank makes it locally
                    continue
                maker = bisect.bisect_right(starts, p) - 1
                produce[maker].add(p)
                if maker != user:
                    deliveries.setdefault((maker, user), []).append(p)
        produce = {r: sorted(ps) for r, ps in produce.items()}
    return GlobalPlan(spec, layout, parts, ranks, exchange, needs, produce, deliveries)


def halo_tokens(plan: GlobalPlan, rank: int) -> int:
    """How many tokens ``rank`` receives from its peers."""
    return sum(box_size(b) for b in plan.ranks[rank].recv.values())


def traffic(plan: GlobalPlan, rank: int, *, B: int, H: int, D: int, Hkv: Optional[int] = None,
            Dv: Optional[int] = None, F: Optional[int] = None, itemsize: int = 2, gate_itemsize: int = 4,
            state_itemsize: int = 4, prefix_mode: str = "exact", return_state: bool = False) -> Dict[str, int]:
    """Bytes ``rank`` sends in one forward call, by kind, as :class:`Comm` counts them (ring collectives).

    ``itemsize``: bytes per q/k/v element; ``F``: feature width of the linear branch (default ``D``);
    ``state_itemsize``: the accumulation dtype's (fp32: 4).
    """
    spec, parts, world = plan.spec, plan.parts, plan.layout.world_size
    Hkv, Dv = Hkv or H, Dv or D
    F = F or D
    pad = (lambda nbytes: nbytes + (-nbytes) % 8)
    ring = (lambda nbytes: int(2 * (world - 1) / world * nbytes))
    out = {"halo": 0, "state": 0, "prefix": 0}
    gate = spec.linear.gate if spec.linear is not None else None
    for box in plan.ranks[rank].send.values():
        t = box_size(box)
        out["halo"] += pad(t * B * Hkv * D * itemsize) + pad(t * B * Hkv * Dv * itemsize)
        if parts.exchange_gate:
            out["halo"] += pad(t * B * H * (F if gate == "vector" else 1) * gate_itemsize)
    per_state = B * H * (F * Dv + F) * state_itemsize
    if plan.has_states:
        contrib = per_state + B * H * (F if gate == "vector" else 1) * state_itemsize   # (log decay, S, z)
        sends = int(rank + 1 < world) + sum(1 <= rank and rank + s <= world - 1 for s in plan.scan_rounds())
        out["state"] = sends * contrib + sum(len(ps) * per_state for (maker, _), ps in plan.deliveries.items()
                                             if maker == rank)
        if return_state:
            out["state"] += per_state
    elif parts.linear == "global":
        out["state"] = ring(per_state)
    n = spec.prefix
    if n and not spec.causal and spec.has_softmax:
        if prefix_mode == "exact":
            out["prefix"] = ring(B * H * n * state_itemsize) + ring(B * H * n * (Dv + 1) * state_itemsize)
        else:
            out["prefix"] = ring(B * H * n * Dv * state_itemsize)
    return out
