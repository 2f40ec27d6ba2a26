"""Packed sequences (``cu_seqlens``) on every compiled kernel, and decoding sequences of different lengths.

``Kernel.__call__`` sends a call with ``cu_seqlens`` here. A causal gated linear spec (GLA and the like) runs
as one call over the whole row with the gate shut on each document's first token (the state restarts there;
chunks that straddle a border stay exact). Every other call is cut into its documents; documents of the
same length are stacked on the batch axis and run as one dense call of the kernel (so N short documents cost
a few batched launches, not N, and no token is padded); the outputs are put back in document order.
Gradients flow through the cuts (``torch.cat`` / ``narrow``) into whatever the dense call supports (the
Triton kernels' backward, the reference's autograd).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from lincomp.documents import TOKEN_AXIS, cat_states, check_cu_seqlens, document_tensors, split_initial_state

_CUT = tuple(TOKEN_AXIS)   # tensors cut per document and stacked; the rest are shared weights


def _stack(pieces: List[torch.Tensor]) -> torch.Tensor:
    """[1, ...] pieces -> [m, ...], always a fresh contiguous (and allocator-aligned) tensor, as kernels want."""
    return torch.cat(pieces, 0)


def length_groups(cu: List[int]) -> Dict[int, List[int]]:
    """Document indices by length, in order of first appearance."""
    groups: Dict[int, List[int]] = {}
    for d in range(len(cu) - 1):
        groups.setdefault(cu[d + 1] - cu[d], []).append(d)
    return groups


# The log gate put on every document's first token by the one-call path: exp(-64) = 1.6e-28 erases the state
# entering the document below fp32 / fp64 rounding of anything a document computes, while the kernels'
# in-chunk cumulative gates stay small enough (|G| ~ 64) to keep their decays accurate in fp32.
GATE_RESET = -64.0


def restarts_by_gate(spec, kwargs: dict, return_state: bool) -> bool:
    """True when one call over the whole row, with the gate shut at document starts, is the packed call: a
    causal gated linear branch alone, no per-document initial / final states, no padding mask."""
    lin = spec.linear
    return (lin is not None and lin.gate is not None and spec.causal and not spec.has_softmax and not spec.prefix
            and spec.combine is None and not return_state and kwargs.get("initial_state") is None
            and kwargs.get("key_padding_mask") is None and torch.is_tensor(kwargs.get("g")))


def shut_gate(g: torch.Tensor, cu: List[int]) -> torch.Tensor:
    """``g`` ``[1, H, L(, F)]`` with GATE_RESET on the first token of every document but the first (differentiable:
    those entries get no gradient, as the state they would decay is zero)."""
    out = g.clone()   # a copy and N - 1 writes (cheaper than a masked select over the whole gate)
    out[:, :, cu[1:-1]] = GATE_RESET
    return out


def run_packed(dense: Callable, spec, q, k, v, cu_seqlens, *, return_state: bool = False, **kwargs):
    """o ``[1, H, L, Dv]`` (and ``(S [N, H, F, Dv], z [N, H, F])`` with ``return_state``) of a packed row.

    ``dense(q, k, v, return_state=..., **kwargs)`` runs one unpacked call (``[m, H, n, D]``: m documents of
    n tokens each). ``initial_state`` has a leading axis N (one row per document).
    """
    cu = check_cu_seqlens(cu_seqlens, q, spec)
    N = len(cu) - 1
    if N == 1:   # one document: the plain call (an initial_state's N axis is its batch axis)
        return dense(q, k, v, **kwargs, **({"return_state": True} if return_state else {}))
    if restarts_by_gate(spec, kwargs, return_state):   # the chunked scan restarts at document starts itself
        return dense(q, k, v, **{**kwargs, "g": shut_gate(kwargs["g"], cu)})
    st = kwargs.pop("initial_state", None)
    S0, z0 = (None, None) if st is None else split_initial_state(st, N)
    whole = {"q": q, "k": k, "v": v, **{n: t for n, t in kwargs.items() if isinstance(t, torch.Tensor)}}
    scalars = {n: t for n, t in kwargs.items() if n not in whole}
    if return_state:
        scalars["return_state"] = True
    outs: List = [None] * N
    states: List = [None] * N
    for n, docs, batch in _groups(cu, whole):
        if S0 is not None:
            idx = torch.tensor(docs, device=S0.device)
            batch["initial_state"] = S0[idx] if z0 is None else (S0[idx], z0[idx])
        r = dense(**batch, **scalars)
        o, s = r if return_state else (r, None)
        for j, d in enumerate(docs):
            outs[d] = o[j:j + 1]
            if s is not None:
                states[d] = (s[0][j:j + 1], s[1][j:j + 1])
    o = torch.cat(outs, dim=2)
    return (o, cat_states(states)) if return_state else o


def _groups(cu: List[int], whole: dict):
    """(length, documents, batch) per document length: the per-token tensors of ``whole`` cut per document and
    stacked on the batch axis (``[m, ...]``), the other tensors shared."""
    for n, docs in length_groups(cu).items():
        per_doc = [document_tensors(whole, cu[d], cu[d] + n) for d in docs]
        yield n, docs, {name: _stack([p[name] for p in per_doc]) if name in _CUT else t for name, t in whole.items()}


def packed_backward(kernel, grad_o, q, k, v, cu_seqlens, **kwargs) -> Optional[dict]:
    """{name: gradient} (q, k, v and the float tensors of ``kwargs``; None where zero) of ``sum(grad_o * o)`` for
    a packed row, through ``kernel``'s own backward: per document length, the stacked documents' forward is run
    again with ``forward_saved`` and differentiated by ``backward_saved`` (a gated linear branch alone: one call
    over the row with the gate shut at document starts, as the forward). Gradients of per-token tensors are put
    back in document order, those of shared weights summed. None when a call saved nothing (it fell back to
    the reference): the caller then differentiates the reference. No ``initial_state`` / ``return_state``."""
    cu = check_cu_seqlens(cu_seqlens, q, kernel.spec)
    if restarts_by_gate(kernel.spec, kwargs, False):
        shut = {**kwargs, "g": shut_gate(kwargs["g"], cu)}
        o, saved = kernel.forward_saved(q, k, v, **shut)
        if saved is None:
            return None
        grads = kernel.backward_saved(grad_o, o, saved, q, k, v, **shut)
        if grads.get("g") is not None:   # the shut entries are constants
            grads["g"] = grads["g"].clone()
            grads["g"][:, :, cu[1:-1]] = 0
        return grads
    whole = {"q": q, "k": k, "v": v, **{n: t for n, t in kwargs.items() if isinstance(t, torch.Tensor)}}
    scalars = {n: t for n, t in kwargs.items() if n not in whole}
    out: dict = {}
    for n, docs, batch in _groups(cu, whole):
        go = _stack([grad_o.narrow(2, cu[d], n) for d in docs])
        o, saved = kernel.forward_saved(**batch, **scalars)
        if saved is None:
            return None
        grads = kernel.backward_saved(go, o, saved, **batch, **scalars)
        for name, d in grads.items():
            if d is None:
                continue
            axis = TOKEN_AXIS.get(name)
            if axis is None:            # a shared weight: the documents' contributions add up
                out[name] = d if out.get(name) is None else out[name] + d
                continue
            full = out.setdefault(name, torch.zeros_like(whole[name], dtype=d.dtype))
            for j, doc in enumerate(docs):
                full.narrow(axis, cu[doc], n).copy_(d[j:j + 1])
    return out


class VarlenDecoder:
    """Decodes N sequences of different lengths with no padding work: one decoder per sequence, each at
    its own position (the decoders share one ``t`` across their batch, so sequences of different lengths
    cannot share one).

    ``make()`` returns a fresh single-sequence decoder (``ReferenceDecoder``, ``TVMDecoder``,
    ``TritonDecoder``: anything with ``step(q, k, v, g)``; ``prefill`` is used where it exists).
    ``prefill(q, k, v, cu_seqlens, g=None)``: the N prompts packed in one row ``[1, H, L, D]`` -> o ``[1, H, L, Dv]``.
    ``step(q, k, v, g=None, active=None)``: one token for each sequence in ``active`` (default: all N, in
    order), q ``[len(active), H, 1, D]`` -> o ``[len(active), H, 1, Dv]``; finished sequences simply drop out.
    Costs one small launch per sequence and step (no batching across positions).
    """

    def __init__(self, make: Callable, spec=None):
        self.make, self.spec = make, spec
        self.decoders: list = []

    def prefill(self, q, k, v, cu_seqlens, g=None):
        cu = check_cu_seqlens(cu_seqlens, q, self.spec)
        self.decoders = [self.make() for _ in range(len(cu) - 1)]
        outs = []
        for dec, a, b in zip(self.decoders, cu, cu[1:]):
            cut = document_tensors({"q": q, "k": k, "v": v, "g": g}, a, b)
            if hasattr(dec, "prefill"):
                outs.append(dec.prefill(cut["q"], cut["k"], cut["v"], cut["g"]))
            else:
                outs.append(torch.cat([dec.step(*(None if t is None else t[:, :, i:i + 1] for t in
                                                  (cut["q"], cut["k"], cut["v"], cut["g"])))
                                       for i in range(b - a)], 2))
        return torch.cat(outs, 2)

    def step(self, q, k, v, g=None, active=None):
        active = range(len(self.decoders)) if active is None else list(active)
        if q.shape[0] != len(active):
            raise ValueError(f"step got {q.shape[0]} tokens (q's batch axis) for {len(active)} active sequences; "
                             "pass one token per active sequence, in the order of active")
        return torch.cat([self.decoders[d].step(q[i:i + 1], k[i:i + 1], v[i:i + 1], None if g is None else g[i:i + 1])
                          for i, d in enumerate(active)], 0)

    @property
    def positions(self) -> list:
        """Tokens seen so far by each sequence."""
        return [int(d.t) for d in self.decoders]


__all__ = ["run_packed", "packed_backward", "length_groups", "VarlenDecoder"]
