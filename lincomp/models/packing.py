"""transformers' packed-sequence calls as ``cu_seqlens``.

Packed training in transformers (``DataCollatorWithFlattening``: all documents in one row, B = 1) reaches an
attention function in one of two forms: the flash-attention kwargs ``cu_seq_lens_q`` / ``cu_seq_lens_k``
(``return_flash_attn_kwargs=True``), or ``position_ids`` restarting at every document (a new document starts
wherever the position does not grow by exactly 1, transformers' own rule); for SDPA-style implementations
transformers then also builds a block-diagonal 4D mask. lincomp turns either into ``cu_seqlens`` and checks
that such a mask is exactly the documents' block-diagonal pattern (anything else raises). Under torch.compile
only ``cu_seq_lens_q/k`` are read (no data-dependent control flow in the graph).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """int32 ``[N + 1]`` boundaries of a ``[1, L]`` (or ``[L]``) position_ids row; None for one plain document."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos[1:] - pos[:-1] != 1).reshape(-1) + 1
    if starts.numel() == 0:
        return None
    edge = torch.tensor([0, pos.numel()], dtype=starts.dtype, device=starts.device)
    return torch.cat([edge[:1], starts, edge[1:]]).to(torch.int32)


def packed_cu_seqlens(batch_size: int, kwargs: dict) -> Optional[torch.Tensor]:
    """``cu_seqlens`` of a transformers attention call (from its kwargs), or None when it is not packed."""
    compiling = torch.compiler.is_compiling()
    cq, ck = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cq is not None or ck is not None:
        if cq is None or ck is None or cq.shape != ck.shape or (not compiling and not bool((cq == ck).all())):
            raise ValueError("lincomp attention got cu_seq_lens_q != cu_seq_lens_k; packed self-attention needs the "
                             "same document boundaries for queries and keys (pass the same cu_seqlens for both)")
        return cq.to(torch.int32)
    pos = kwargs.get("position_ids")
    # Under torch.compile the boundaries' count is data-dependent (a graph break on every call, packed or
    # not): compiled models pass cu_seq_lens_q/k instead. A packed row then still cannot pass silently: its
    # block-diagonal mask fails the key-padding check of torch.ops.lincomp.key_padding_mask.
    if pos is None or batch_size != 1 or pos.shape[-1] < 2 or compiling:
        return None
    return cu_seqlens_from_position_ids(pos[:1])


def check_packed_mask(mask: Optional[torch.Tensor], cu_seqlens: torch.Tensor, causal: bool) -> None:
    """Raise unless ``mask`` (None, a ``[1, L]`` padding mask, or an SDPA ``[1, H|1, L, L]`` mask) says no more than
    "each document attends to itself" (causally for a causal spec): a packed row has no padding or bias."""
    if mask is None or torch.compiler.is_compiling():   # data-dependent; checked in eager runs
        return
    from lincomp.backends.ops import _attend
    attend = _attend(mask)
    if mask.dim() == 2:
        if not bool(attend.all()):
            raise ValueError("a packed row (cu_seqlens / restarting position_ids) cannot also have padding: "
                             "drop the padded tokens from the row, or do not pack")
        return
    from lincomp.documents import document_ids
    L = mask.shape[-1]
    doc = document_ids(cu_seqlens, L, mask.device)
    want = doc[:, None] == doc[None, :]
    if causal:
        want = want & torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()
    if not bool((attend == want).all()):
        raise ValueError(f"lincomp: the attention mask of a packed row is not the documents' block-diagonal "
                         f"{'causal ' if causal else ''}pattern; a spec defines the pattern within each document, "
                         "so only that mask (or none) can be combined with cu_seqlens / restarting position_ids")


def pack_lengths(lengths: Sequence[int], length: int) -> List[List[int]]:
    """Greedy, in-order packing: the indices of ``lengths`` (each ``<= length``) grouped into rows of at most
    ``length`` tokens (a piece that does not fit starts a new row)."""
    rows: List[List[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if rows and used + n <= length:
            rows[-1].append(i)
            used += n
        else:
            rows.append([i])
            used = n
    return rows


def packed_row(documents: Sequence[torch.Tensor]) -> dict:
    """One causal-LM batch of token-id documents laid end to end: ``input_ids`` ``[1, n]``, ``position_ids``
    restarting at every document (linearize turns them into ``cu_seqlens``) and ``labels`` with -100 at each
    document's first token (it is not predicted from the previous document)."""
    ids = torch.cat(list(documents))
    pos = torch.cat([torch.arange(p.numel()) for p in documents])
    labels = ids.clone()
    labels[pos == 0] = -100
    return {"input_ids": ids[None], "position_ids": pos[None], "labels": labels[None]}


def pack_documents(documents: Sequence[torch.Tensor], length: int) -> List[dict]:
    """Token-id documents (1-D tensors) packed greedily, in order, into rows of at most ``length`` tokens, as
    batches for a causal LM (``lincomp.distill``, or any training loop; see :func:`packed_row`). A document
    longer than ``length`` is cut into pieces of ``length``, each a document of its own. No padding."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    pieces = [d[i:i + length] for d in documents for i in range(0, d.numel(), length) if d.numel()]
    return [packed_row([pieces[i] for i in row]) for row in pack_lengths([p.numel() for p in pieces], length)]


__all__ = ["cu_seqlens_from_position_ids", "packed_cu_seqlens", "check_packed_mask", "pack_lengths", "packed_row",
           "pack_documents"]
