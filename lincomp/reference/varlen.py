"""The reference for packed sequences (``cu_seqlens``): each document run on its own, one by one.

Deliberately the plainest form of the definition (a loop over documents calling the dense oracle), so
that the grouped dispatch the kernels use (:mod:`lincomp.runtime.varlen`) is checked against it.
"""

from __future__ import annotations

import torch

from lincomp.documents import cat_states, check_cu_seqlens, document_tensors, split_initial_state
from lincomp.spec import AttentionSpec


def reference_packed(dense, spec, q, k, v, cu_seqlens, *, return_state: bool = False, **kwargs):
    """o ``[1, H, L, Dv]`` (and ``(S [N, H, F, Dv], z [N, H, F])``) for a packed row: ``dense(spec, q, k, v,
    **kwargs)`` per document on views of q, k, v and the per-token tensors."""
    spec = AttentionSpec.coerce(spec)
    cu = check_cu_seqlens(cu_seqlens, q, spec)
    N = len(cu) - 1
    st = kwargs.pop("initial_state", None)
    S0, z0 = (None, None) if st is None else split_initial_state(st, N)
    outs, states = [], []
    for d in range(N):
        a, b = cu[d], cu[d + 1]
        kw = document_tensors(kwargs, a, b)
        if S0 is not None:
            kw["initial_state"] = S0[d:d + 1] if z0 is None else (S0[d:d + 1], z0[d:d + 1])
        r = dense(spec, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], return_state=return_state, **kw)
        if return_state:
            r, s = r
            states.append(s)
        outs.append(r)
    o = torch.cat(outs, dim=2)
    return (o, cat_states(states)) if return_state else o
