"""Packed rows (``cu_seqlens``) split over ranks in slices: every rank border must be a document border.

When each rank's slice holds whole documents, no query needs a key of another rank and no state crosses a
rank: each rank runs its own documents through the local kernel with no communication in the forward pass
(the backward all-reduces the gradients of replicated weights, as the engine does). A document that crosses
a rank border raises ValueError naming the border and the fix (choose the slice sizes at document ends).
"""

from __future__ import annotations

from typing import Callable

import torch

from lincomp.documents import TOKEN_AXIS, check_cu_seqlens, split_initial_state
from lincomp.spec import AttentionSpec, GridWindow


def packed_attention(spec: AttentionSpec, q, k, v, *, kernel: Callable, layout, comm, sync_grads: bool,
                     return_state: bool = False, cu_seqlens=None, **kwargs):
    """This rank's ``o [1, H, own_tokens, Dv]`` for a packed row whose global boundaries are ``cu_seqlens``
    ``[N + 1]`` (the same on every rank); ``initial_state`` rows: one per document, all N on every rank."""
    if isinstance(spec.window, GridWindow) or spec.prefix:
        raise ValueError("cu_seqlens with lincomp.distributed supports 1D sequences without prefix tokens (each "
                         "document's prefix / grid would be split by the layout); run such packed rows per rank")
    if return_state:
        raise ValueError("return_state=True with cu_seqlens across ranks is not supported (each rank holds other "
                         "documents' states); call without return_state, or run the row on one rank")
    a, b = layout.flat_range(comm.rank)
    cu = check_cu_seqlens(cu_seqlens, torch.empty(q.shape[0], 1, layout.length, 1, device="meta"), spec)
    for edge in sorted({a, b} - set(cu)):
        raise ValueError(f"cu_seqlens: a document crosses the rank border at token {edge} (rank {comm.rank} holds "
                         f"tokens {a} .. {b - 1}); lincomp.distributed needs every rank border on a document border: "
                         "shard with Layout.sequence(L, world, sizes=...) whose slices end where documents end")
    docs = [d for d in range(len(cu) - 1) if a <= cu[d] < b]
    local = torch.tensor([cu[d] - a for d in docs] + [b - a], dtype=torch.int32)
    st = kwargs.pop("initial_state", None)
    if st is not None:
        S0, z0 = split_initial_state(st, len(cu) - 1)
        S0, z0 = comm.replicate([S0, z0], sync=sync_grads)
        kwargs["initial_state"] = S0[docs[0]:docs[-1] + 1] if z0 is None else (S0[docs[0]:docs[-1] + 1],
                                                                              z0[docs[0]:docs[-1] + 1])
    shared = [n for n, t in kwargs.items() if torch.is_tensor(t) and n not in TOKEN_AXIS]
    for n, t in zip(shared, comm.replicate([kwargs[n] for n in shared], sync=sync_grads)):
        kwargs[n] = t
    return kernel(q, k, v, cu_seqlens=local, **kwargs)


__all__ = ["packed_attention"]
