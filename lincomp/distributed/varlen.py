"""Packed rows (``cu_seqlens``) split over ranks in contiguous slices.

``cu_seqlens`` holds the whole row's boundaries (global token offsets), the same on every rank. Two cases:

- every rank border falls on a document border: each rank runs its own whole documents through the local
  kernel with no communication in the forward pass (:func:`packed_attention`);
- a document crosses one or more rank borders: the engine runs its usual plan (halo exchange, linear state
  scan) with :class:`Documents` telling it where documents start. Every local kernel call gets the
  boundaries of the documents its token range overlaps (a document that began on an earlier rank starts
  at the range's first token: the window reach guarantees no row needs an earlier key), the linear state
  carried across a border restarts at every document start (a slice holding a document start passes on
  only that document's state: its log decay is -inf), and the non-causal sums are kept per document.

1D sequences without prefix tokens only (a prefix or a grid belongs to each document, which the layout
would split); terraced windows count their blocks from each document's start, which a halo cut in the
middle of a document cannot see, so they need rank borders on document borders.
"""

from __future__ import annotations

import bisect
from typing import Callable, List, Optional, Tuple

import torch

from lincomp.documents import TOKEN_AXIS, check_cu_seqlens, split_initial_state
from lincomp.spec import AttentionSpec, GridWindow, TerracedWindow


class Documents:
    """A packed row's global boundaries ``cu`` (``[c_0 = 0, ..., c_N = L]``), cut to any token range."""

    def __init__(self, cu: List[int]):
        self.cu = cu
        self.N = len(cu) - 1

    def doc_of(self, p: int) -> int:
        """The document holding token ``p``."""
        return min(bisect.bisect_right(self.cu, p) - 1, self.N - 1)

    def local(self, lo: int, hi: int) -> Tuple[int, torch.Tensor]:
        """(first document, int32 ``cu_seqlens`` of tokens ``lo .. hi - 1`` counted from ``lo``)."""
        first = self.doc_of(lo)
        inner = [c - lo for c in self.cu[first + 1:] if c < hi]
        return first, torch.tensor([0] + inner + [hi - lo], dtype=torch.int32)

    def last_start(self, lo: int, hi: int) -> Optional[Tuple[int, int]]:
        """(position, document) of the last document start ``c`` with ``lo < c <= hi``, or None."""
        d = self.doc_of(hi)
        return (self.cu[d], d) if self.cu[d] > lo else None

    def borders_on_documents(self, layout) -> bool:
        """Whether every rank border is a document border."""
        starts = set(self.cu)
        return all(layout.flat_range(r)[0] in starts for r in range(layout.world_size))


def documents(spec: AttentionSpec, layout, cu_seqlens, return_state: bool) -> Documents:
    """The checked boundaries of a distributed packed call; raises for what packed rows over ranks lack."""
    if isinstance(spec.window, GridWindow) or spec.prefix:
        raise ValueError("cu_seqlens with lincomp.distributed supports 1D sequences without prefix tokens (each "
                         "document's prefix / grid would be split by the layout); run such packed rows per rank")
    if return_state:
        raise ValueError("return_state=True with cu_seqlens across ranks is not supported (each rank holds other "
                         "documents' states); call without return_state, or run the row on one rank")
    docs = Documents(check_cu_seqlens(cu_seqlens, torch.empty(1, 1, layout.length, 1, device="meta"), spec))
    if isinstance(spec.window, TerracedWindow) and not docs.borders_on_documents(layout):
        edge = next(a for a, _ in map(layout.flat_range, range(layout.world_size)) if a not in set(docs.cu))
        raise ValueError(f"cu_seqlens: a document crosses the rank border at token {edge}, and a terraced window "
                         "counts its blocks from the document's start; shard with Layout.sequence(L, world, "
                         "sizes=...) whose slices end where documents end")
    return docs


def packed_attention(spec: AttentionSpec, q, k, v, *, kernel: Callable, layout, comm, docs: Documents,
                     sync_grads: bool, **kwargs):
    """This rank's ``o [1, H, own_tokens, Dv]`` when every rank border is a document border: the rank's own
    documents through the local kernel; ``initial_state`` rows: one per document, all N on every rank."""
    a, b = layout.flat_range(comm.rank)
    first, local = docs.local(a, b)
    last = first + len(local) - 2
    st = kwargs.pop("initial_state", None)
    if st is not None:
        S0, z0 = split_initial_state(st, docs.N)
        S0, z0 = comm.replicate([S0, z0], sync=sync_grads)
        kwargs["initial_state"] = S0[first:last + 1] if z0 is None else (S0[first:last + 1], z0[first:last + 1])
    shared = [n for n, t in kwargs.items() if torch.is_tensor(t) and n not in TOKEN_AXIS]
    for n, t in zip(shared, comm.replicate([kwargs[n] for n in shared], sync=sync_grads)):
        kwargs[n] = t
    return kernel(q, k, v, cu_seqlens=local, **kwargs)


__all__ = ["Documents", "documents", "packed_attention"]
