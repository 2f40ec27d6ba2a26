"""Packed sequences: ``cu_seqlens`` checking and cutting a packed call into its documents.

A packed row holds ``N`` documents back to back: ``q, k, v`` are ``[1, H, L, D]`` and ``cu_seqlens`` is an
int32 / int64 tensor ``[N + 1]`` of boundaries ``0 = c_0 < c_1 < ... < c_N = L``. Document ``d`` is the tokens
``c_d .. c_{d+1} - 1`` and is attended exactly as its own sequence (window rules, prefix tokens and grids
counted from its start, the linear state starting from zero or from row ``d`` of an ``initial_state``
whose leading axis is ``N``). Shared by the reference (which runs the documents one by one) and the
runtime dispatch of every backend (:mod:`lincomp.runtime.varlen`).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from lincomp.spec import AttentionSpec

# Per-token tensors, cut along the token axis (dim 2 of [B, H, L, D] and [B, H, L(, F)], dim 1 of [B, L]).
TOKEN_AXIS = {"q": 2, "k": 2, "v": 2, "g": 2, "key_padding_mask": 1}


def check_cu_seqlens(cu_seqlens, q: torch.Tensor, spec: Optional[AttentionSpec] = None) -> List[int]:
    """The boundaries ``[c_0, ..., c_N]`` as Python ints, after checking them against q ``[B, H, L, D]``.

    Raises TypeError / ValueError naming ``cu_seqlens`` and the fix (reads the tensor once on the host).
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor of document boundaries, got {type(cu_seqlens).__name__}; "
                        "pass torch.tensor([0, len_0, len_0 + len_1, ..., L], dtype=torch.int32)")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}; cast it with .int()")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [N + 1] with N >= 1 documents, got shape {list(cu_seqlens.shape)}")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError("q must be [B, H, L, D] (the scaled_dot_product_attention layout)")
    B, L = q.shape[0], q.shape[2]
    if B != 1:
        raise ValueError(f"cu_seqlens packs documents into one row, so the batch size must be 1, got B={B}; "
                         "concatenate the batch along L (q.transpose(0, 2).reshape(...)) or drop cu_seqlens")
    cu = [int(c) for c in cu_seqlens.tolist()]
    if cu[0] != 0 or cu[-1] != L:
        raise ValueError(f"cu_seqlens must start at 0 and end at the sequence length L={L}, got {cu[0]} .. {cu[-1]}")
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    if min(lengths) <= 0:
        d = min(range(len(lengths)), key=lengths.__getitem__)
        raise ValueError(f"cu_seqlens must be strictly increasing (every document non-empty); document {d} spans "
                         f"{cu[d]} .. {cu[d + 1]}")
    want = None if spec is None else spec.expected_length()
    if want is not None and any(n != want for n in lengths):
        bad = next(n for n in lengths if n != want)
        raise ValueError(f"cu_seqlens has a document of {bad} tokens but the spec's grid {list(spec.window.grid)} "
                         f"with prefix {spec.prefix} needs every document to hold prefix + "
                         f"{'*'.join(map(str, spec.window.grid))} = {want} tokens; pack only documents of that "
                         "size, or run them separately with spec.with_grid(...) per size")
    return cu


def state_pair(initial_state) -> tuple:
    """``initial_state`` given as ``S0`` or ``(S0, z0)`` -> ``(S0, z0 or None)`` (shapes unchecked)."""
    if isinstance(initial_state, (tuple, list)):
        if len(initial_state) != 2:
            raise ValueError("initial_state must be S0 or a pair (S0, z0)")
        return tuple(initial_state)
    return initial_state, None


def split_initial_state(initial_state, N: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``initial_state`` (``S0 [N, H, F, Dv]`` or ``(S0, z0 [N, H, F])``) as ``(S0, z0 | None)``; checks the N axis."""
    S0, z0 = state_pair(initial_state)
    for name, t in (("S0", S0), ("z0", z0)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != N):
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"with cu_seqlens, initial_state {name} needs one row per document on its leading "
                             f"axis (N={N}), got {got}; stack the documents' states: S0 [N, H, F, Dv], z0 [N, H, F]")
    return S0, z0


def document_tensors(tensors: dict, a: int, b: int) -> dict:
    """The call's keyword tensors for tokens ``a .. b-1``: per-token ones cut, weights shared (views)."""
    out = {}
    for name, t in tensors.items():
        axis = TOKEN_AXIS.get(name)
        out[name] = t if (axis is None or t is None) else t.narrow(axis, a, b - a)
    return out


def cat_states(states: list) -> tuple:
    """Per-document final states ``(S [1, H, F, Dv], z [1, H, F])``, in document order, stacked:
    ``(S [N, H, F, Dv], z [N, H, F])``."""
    return torch.cat([s for s, _ in states], 0), torch.cat([z for _, z in states], 0)


def document_ids(cu_seqlens: torch.Tensor, L: int, device=None) -> torch.Tensor:
    """[L] long: the document of every token (for masks that compare documents)."""
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts, output_size=L)


def cu_seqlens_of(lengths, device=None) -> torch.Tensor:
    """``cu_seqlens`` (int32) for documents of these lengths."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device)


__all__ = ["check_cu_seqlens", "split_initial_state", "document_tensors", "cat_states", "document_ids", "cu_seqlens_of"]
