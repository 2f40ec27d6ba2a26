"""How a sequence (1D) or a token grid (2D/3D) is split over the ranks of a process group.

The ``prefix`` tokens (CLEAR's text tokens, a 1D spec's global tokens) are **replicated**: every rank
holds all of them, with the same values, at the front of its local tensors. The tokens after the
prefix are split into one box per rank: a contiguous slice of a sequence, or a patch of a grid
(row-major inside the patch). A rank's local tensors are ``[B, H, prefix + box_tokens, D]``.

Ranks are laid out row-major over a ``mesh`` (one entry per axis; ``prod(mesh)`` = world size).
Nothing here talks to ``torch.distributed``; :func:`gather` is the one helper that does.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

Box = Tuple[Tuple[int, int], ...]   # one (lo, hi) per axis, hi exclusive


def _even(total: int, parts: int) -> list:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _cuts(sizes: Sequence[int], total: int, what: str) -> tuple:
    sizes = list(sizes)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"{what} must be positive ints (every rank owns at least one token), got {sizes}")
    if sum(sizes) != total:
        raise ValueError(f"{what} {sizes} sum to {sum(sizes)}, but there are {total} tokens to split")
    return tuple(itertools.accumulate([0] + sizes))


def flat_index(box: Box, within: Box) -> torch.Tensor:
    """Row-major positions inside ``within`` of the tokens of ``box`` (box row-major). -> LongTensor."""
    strides = [math.prod(hi - lo for lo, hi in within[a + 1:]) for a in range(len(within))]
    idx = torch.zeros((), dtype=torch.long)
    for (lo, hi), (wlo, _), st in zip(box, within, strides):
        idx = idx[..., None] + (torch.arange(lo, hi) - wlo) * st
    return idx.reshape(-1)


def contiguous_range(shape: tuple, box: Box) -> Optional[tuple]:
    """(start, stop) of ``box`` in the row-major order of ``shape``, or None if it is not contiguous there."""
    lead = next((a for a, (lo, hi) in enumerate(box) if hi - lo > 1), len(box) - 1)
    if any(box[a] != (0, shape[a]) for a in range(lead + 1, len(box))):
        return None
    start = int(flat_index(tuple((lo, lo + 1) for lo, _ in box), tuple((0, n) for n in shape))[0])
    return start, start + box_size(box)


def box_size(box: Box) -> int:
    return math.prod(hi - lo for lo, hi in box)


def box_shape(box: Box) -> tuple:
    return tuple(hi - lo for lo, hi in box)


@dataclass(frozen=True)
class Layout:
    """Where every token lives. Build with :meth:`sequence`, :meth:`grid` or :meth:`for_spec`.

    ``shape``: tokens after the prefix per axis, ``(N,)`` or the grid; ``cuts``: per axis the split
    points ``0 = c_0 < ... < c_m = shape[axis]``; ``prefix``: replicated tokens in front.
    """

    shape: Tuple[int, ...]
    cuts: Tuple[Tuple[int, ...], ...]
    prefix: int = 0

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "cuts", tuple(tuple(int(c) for c in cut) for cut in self.cuts))
        if len(self.cuts) != len(self.shape) or not 1 <= len(self.shape) <= 3:
            raise ValueError(f"layout: shape {self.shape} and cuts {self.cuts} need 1 to 3 axes each")
        for a, (cut, n) in enumerate(zip(self.cuts, self.shape)):
            if cut[0] != 0 or cut[-1] != n or any(x >= y for x, y in zip(cut, cut[1:])):
                raise ValueError(f"layout.cuts[{a}] = {list(cut)} must rise strictly from 0 to {n} "
                                 "(every rank owns at least one token on every axis)")
        if self.prefix < 0:
            raise ValueError(f"layout.prefix must be >= 0, got {self.prefix}")

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def sequence(cls, length: int, world_size: int, prefix: int = 0,
                 sizes: Optional[Sequence[int]] = None) -> "Layout":
        """A sequence of ``length`` tokens (prefix included) in contiguous slices, rank order.

        ``sizes``: tokens per rank after the prefix (default: as even as possible, earlier ranks +1).
        """
        n = length - prefix
        if n < world_size:
            raise ValueError(f"length - prefix = {n} tokens cannot give each of {world_size} ranks one token; "
                             "use fewer ranks or a longer sequence")
        return cls((n,), (_cuts(sizes if sizes is not None else _even(n, world_size), n, "sizes"),), prefix)

    @classmethod
    def grid(cls, grid: Sequence[int], world_size: int, prefix: int = 0, mesh: Optional[Sequence[int]] = None,
             sizes: Optional[Sequence[Sequence[int]]] = None, reach: Optional[Sequence[int]] = None,
             contiguous: bool = False) -> "Layout":
        """Patches of a 2D/3D ``grid``: ranks row-major over ``mesh`` (default: the mesh whose largest
        patch has the fewest halo tokens for per-axis ``reach``; ``contiguous``: only split axis 0).

        ``sizes``: per axis, the patch sizes along it (overrides ``mesh``).
        """
        grid = tuple(grid)
        if sizes is not None:
            if len(sizes) != len(grid):
                raise ValueError(f"sizes needs one list per grid axis ({len(grid)}), got {len(sizes)}")
            cuts = tuple(_cuts(s, g, f"sizes[{a}]") for a, (s, g) in enumerate(zip(sizes, grid)))
            lay = cls(grid, cuts, prefix)
            if lay.world_size != world_size:
                raise ValueError(f"sizes make a {list(lay.mesh)} mesh of {lay.world_size} ranks, "
                                 f"but the group has {world_size}")
            return lay
        if mesh is None:
            mesh = _best_mesh(grid, world_size, reach or (1,) * len(grid), contiguous)
        mesh = tuple(mesh)
        if len(mesh) != len(grid) or math.prod(mesh) != world_size:
            raise ValueError(f"mesh {list(mesh)} must have one entry per grid axis {list(grid)} and a product "
                             f"equal to the world size {world_size}")
        for a, (m, g) in enumerate(zip(mesh, grid)):
            if m > g:
                raise ValueError(f"mesh[{a}] = {m} parts but grid axis {a} has only {g} tokens; pick another mesh")
        return cls(grid, tuple(_cuts(_even(g, m), g, "sizes") for g, m in zip(grid, mesh)), prefix)

    @classmethod
    def for_spec(cls, spec, world_size: int, length: Optional[int] = None, **kwargs) -> "Layout":
        """The default layout of ``spec``: grid patches for 2D/3D windows, contiguous slices otherwise.

        A causal linear branch on a grid needs row-major contiguous patches: only axis 0 is split then.
        """
        from lincomp.ir.lowered import lower
        from lincomp.spec import AttentionSpec, GridWindow
        spec = AttentionSpec.coerce(spec)
        w = spec.window
        if isinstance(w, GridWindow):
            contiguous = spec.linear is not None and spec.causal
            kwargs.setdefault("reach", lower(spec).axis_reach)
            kwargs.setdefault("contiguous", contiguous)
            return cls.grid(w.grid, world_size, prefix=spec.prefix, **kwargs)
        if length is None:
            raise ValueError("length is required for a spec without a grid window (the global sequence length, "
                             "prefix included)")
        return cls.sequence(length, world_size, prefix=spec.prefix, **kwargs)

    # -- facts ------------------------------------------------------------------------------------
    @property
    def mesh(self) -> tuple:
        return tuple(len(c) - 1 for c in self.cuts)

    @property
    def world_size(self) -> int:
        return math.prod(self.mesh)

    @property
    def tokens(self) -> int:
        """Tokens after the prefix."""
        return math.prod(self.shape)

    @property
    def length(self) -> int:
        """The global sequence length, prefix included."""
        return self.prefix + self.tokens

    @property
    def whole(self) -> Box:
        return tuple((0, n) for n in self.shape)

    def coords(self, rank: int) -> tuple:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside this layout's {self.world_size} ranks")
        out = []
        for m in reversed(self.mesh):
            out.append(rank % m)
            rank //= m
        return tuple(reversed(out))

    def box(self, rank: int) -> Box:
        """The tokens rank owns: one (lo, hi) per axis, positions counted after the prefix."""
        return tuple((cut[c], cut[c + 1]) for cut, c in zip(self.cuts, self.coords(rank)))

    def local_length(self, rank: int) -> int:
        return self.prefix + box_size(self.box(rank))

    def flat_range(self, rank: int) -> Optional[tuple]:
        """(start, stop) of rank's tokens in row-major order after the prefix, or None if not contiguous."""
        return contiguous_range(self.shape, self.box(rank))

    def indices(self, rank: int) -> torch.Tensor:
        """Global positions (prefix included) of rank's local tokens, in local order. -> LongTensor."""
        own = flat_index(self.box(rank), self.whole) + self.prefix
        return torch.cat([torch.arange(self.prefix), own])

    def __repr__(self) -> str:
        return f"Layout(shape={self.shape}, mesh={self.mesh}, prefix={self.prefix})"


def _best_mesh(grid: tuple, world: int, reach: Sequence[int], contiguous: bool) -> tuple:
    """The factorisation of ``world`` over the grid axes with the fewest halo tokens per patch."""
    def factorisations(n, k):
        if k == 1:
            yield (n,)
            return
        for d in range(1, n + 1):
            if n % d == 0:
                for rest in factorisations(n // d, k - 1):
                    yield (d,) + rest

    best = None
    for mesh in factorisations(world, len(grid)):
        if any(m > g for m, g in zip(mesh, grid)) or (contiguous and any(m > 1 for m in mesh[1:])):
            continue
        lay = Layout(grid, tuple(_cuts(_even(g, m), g, "sizes") for g, m in zip(grid, mesh)))
        halo = 0
        for r in range(world):
            box = lay.box(r)
            ext = tuple((max(0, lo - d), min(n, hi + d)) for (lo, hi), d, n in zip(box, reach, grid))
            halo = max(halo, box_size(ext) - box_size(box))
        cost = (halo, tuple(-m for m in mesh))          # ties: split leading axes first
        if best is None or cost < best[0]:
            best = (cost, mesh)
    if best is None:
        raise ValueError(f"no mesh splits grid {list(grid)} over {world} ranks"
                         f"{' along axis 0 only (a causal linear branch needs contiguous patches)' if contiguous else ''}; "
                         "use fewer ranks")
    return best[1]


# ------------------------------------------------------------------------------ shard / unshard
def shard(x: torch.Tensor, layout: Layout, rank: int, dim: int = 2) -> torch.Tensor:
    """Rank's local part of a global tensor (tokens on ``dim``): the prefix, then its box row-major."""
    if x.shape[dim] != layout.length:
        raise ValueError(f"tensor has {x.shape[dim]} tokens on dim {dim}, the layout expects {layout.length}")
    return x.index_select(dim, layout.indices(rank).to(x.device))


def unshard(pieces: Sequence[torch.Tensor], layout: Layout, dim: int = 2) -> torch.Tensor:
    """The global tensor from every rank's local tensor (rank order); the prefix is taken from rank 0."""
    if len(pieces) != layout.world_size:
        raise ValueError(f"got {len(pieces)} pieces for a layout of {layout.world_size} ranks")
    first = pieces[0]
    shape = list(first.shape)
    shape[dim] = layout.length
    out = first.new_empty(shape)
    for r, piece in enumerate(pieces):
        if piece.shape[dim] != layout.local_length(r):
            raise ValueError(f"piece {r} has {piece.shape[dim]} tokens on dim {dim}, rank {r} owns "
                             f"{layout.local_length(r)} (prefix included)")
        out.index_copy_(dim, layout.indices(r).to(piece.device), piece)
    return out


def gather(x: torch.Tensor, layout: Layout, group=None, dim: int = 2) -> torch.Tensor:
    """All-gather every rank's local tensor and return the global one on every rank (not differentiable)."""
    import torch.distributed as dist
    world = dist.get_world_size(group)
    longest = max(layout.local_length(r) for r in range(world))
    pad = list(x.shape)
    pad[dim] = longest - x.shape[dim]
    padded = torch.cat([x.detach(), x.new_zeros(pad)], dim).contiguous()
    bufs = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded, group=group)
    return unshard([b.narrow(dim, 0, layout.local_length(r)) for r, b in enumerate(bufs)], layout, dim)
