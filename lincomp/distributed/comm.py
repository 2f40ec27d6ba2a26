"""The collectives of distributed attention, as autograd Functions with exact backwards.

Gradient convention (as Megatron-LM's tensor parallelism): a *replicated* tensor (the prefix tokens,
weights, the initial state) holds the same value on every rank and gets the full gradient on every
rank; a *replicated output* (prefix rows, the final state) must receive the same upstream gradient
on every rank (the same downstream computation runs everywhere). :meth:`Comm.replicate` marks the
inputs (backward: all-reduce the partial gradients), :meth:`Comm.replicated_output` the outputs
(backward: divide by the world size, since every rank pushes the same gradient through the group).
Everything in between uses exact adjoints: all-reduce <-> all-reduce, broadcast <-> sum onto the root,
point-to-point (halo, state scan) <-> the gradients sent back the other way.

Every collective must run in the same order on every rank, in backward too: each one's input is tied
to the previous one's output (:meth:`Comm.tie`), so the backward visits them in exact reverse order,
and the final output is tied to the last, so even a rank whose halo feeds no local row joins in.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.autograd import Function

from lincomp.distributed.layout import box_size
from lincomp.distributed.plan import RankPlan


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One uint8 buffer holding the tensors' bytes, each padded to 8 bytes (keeps views aligned)."""
    parts = []
    for t in tensors:
        b = t.contiguous().view(-1).view(torch.uint8)
        parts.append(b)
        if b.numel() % 8:
            parts.append(b.new_zeros(8 - b.numel() % 8))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def _padded(n: int) -> int:
    return n + (-n) % 8


def _unpack(buf: torch.Tensor, like: Sequence[tuple]) -> List[torch.Tensor]:
    """Inverse of :func:`_pack` for (shape, dtype) pairs."""
    out, off = [], 0
    for shape, dtype in like:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        out.append(buf[off:off + n].view(dtype).view(shape))
        off += _padded(n)
    return out


def _token_shape(t: torch.Tensor, tokens: int) -> tuple:
    shape = list(t.shape)
    shape[2] = tokens
    return tuple(shape)


_NCCL_READY = set()     # groups whose NCCL communicator exists (a first P2P call needs every rank in it)


class Comm:
    """The process group of one call, the backward chain, and bytes sent by this rank (``stats``)."""

    def __init__(self, group=None, stats: Optional[Counter] = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group)).lower()
        self.stats = stats if stats is not None else Counter()
        self._last: Optional[torch.Tensor] = None
        if self.backend == "nccl" and id(group) not in _NCCL_READY:
            dist.all_reduce(torch.zeros(1, device="cuda"), group=group)   # once: every rank creates the communicator
            _NCCL_READY.add(id(group))

    def anchor(self, tensors: Sequence[Optional[torch.Tensor]]) -> None:
        """Start the backward chain at an input that needs a gradient (so a rank that only receives
        still records the collective, and its backward sends the gradient back)."""
        if torch.is_grad_enabled():
            self._last = next((t for t in tensors if t is not None and t.requires_grad), None)

    def peer(self, group_rank: int) -> int:
        """Global rank of a group rank (P2P ops address global ranks)."""
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def count(self, kind: str, nbytes: float) -> None:
        self.stats[kind] += int(nbytes)

    # -- the backward chain ---------------------------------------------------------------------
    def tie(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (unchanged) made to depend on the last collective, fixing the backward order."""
        last = self._last
        if last is None or not torch.is_grad_enabled() or not last.requires_grad:
            return x
        return _Tie.apply(x, last)

    def _done(self, out: torch.Tensor) -> torch.Tensor:
        if out.requires_grad:
            self._last = out
        return out

    # -- replicated values ------------------------------------------------------------------------
    def replicate(self, tensors: Sequence[Optional[torch.Tensor]], sync: bool = True) -> list:
        """Mark replicated inputs: identity forward; backward all-reduces (sums) their gradients."""
        present = [t for t in tensors if t is not None]
        if not present or not torch.is_grad_enabled() or not any(t.requires_grad for t in present):
            return list(tensors)
        outs = iter(_Replicate.apply(self, sync, *present))
        result = [None if t is None else next(outs) for t in tensors]
        self._done(next(t for t in result if t is not None))
        return result

    def replicated_output(self, x: torch.Tensor) -> torch.Tensor:
        """Mark a replicated output: identity forward; backward divides the gradient by the world size."""
        if not torch.is_grad_enabled() or not x.requires_grad:
            return x
        return _ScaleGrad.apply(x, 1.0 / self.world)

    # -- collectives ------------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """Differentiable sum over the group (backward: the sum of the gradients)."""
        return self._done(_AllReduce.apply(self, kind, self.tie(x)))

    def all_reduce_max(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """Elementwise max over the group, not differentiable (for softmax shifts, which cancel)."""
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.MAX, group=self.group)
        self.count(kind, _ring_all_reduce(_nbytes(y), self.world))
        return y

    def p2p(self, sends: Dict[int, torch.Tensor], recv: Dict[int, tuple], kind: str, device) -> Dict[int, torch.Tensor]:
        """Differentiable point-to-point: send ``sends[peer]`` to each peer, receive a ``(shape, dtype)``
        tensor from each peer of ``recv``. Backward sends the gradients the other way."""
        peers_out, peers_in = sorted(sends), sorted(recv)
        meta = (peers_out, [(p,) + tuple(recv[p]) for p in peers_in], torch.device(device))
        anchor = self._last if self._last is not None else torch.zeros((), device=device)
        token, *got = _P2P.apply(self, kind, meta, anchor, *(sends[p] for p in peers_out))
        self._done(token)
        return dict(zip(peers_in, got))

    def broadcast(self, x: torch.Tensor, src: int, kind: str) -> torch.Tensor:
        """Differentiable broadcast of rank ``src``'s ``x`` (backward: the gradients summed onto ``src``)."""
        return self._done(_Broadcast.apply(self, kind, src, self.tie(x)))

    def start_halo(self, plan: RankPlan, tensors: Sequence[torch.Tensor]) -> "_Pending":
        """Post the halo sends and receives of ``tensors`` (own box tokens on dim 2); returns at once."""
        pending = _Pending(plan, [(t.shape, t.dtype) for t in tensors])
        ops = []
        for peer in sorted(plan.send):
            idx = plan.index(f"send:{peer}", tensors[0].device)
            buf = _pack([t.detach().index_select(2, idx) for t in tensors])
            pending.keep.append(buf)
            self.count("halo", _nbytes(buf))
            ops.append(dist.P2POp(dist.isend, buf, self.peer(peer), self.group, _TAG_HALO))
        for peer in sorted(plan.recv):
            n = plan.index(f"recv:{peer}", tensors[0].device).numel()
            size = sum(_padded(torch.Size(_token_shape(t, n)).numel() * t.element_size()) for t in tensors)
            buf = torch.empty(size, dtype=torch.uint8, device=tensors[0].device)
            pending.recv[peer] = buf
            ops.append(dist.P2POp(dist.irecv, buf, self.peer(peer), self.group, _TAG_HALO))
        pending.works = dist.batch_isend_irecv(ops) if ops else []
        return pending

    def finish_halo(self, pending: "_Pending", tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Wait for the halo; return ``tensors`` extended to the rank's key box (``plan.ext``)."""
        tensors = [self.tie(t) for t in tensors]
        outs = list(_HaloWait.apply(self, pending, *tensors))
        self._done(outs[0])
        return outs

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Tie the final output to the last collective (every rank then runs every backward step)."""
        return self.tie(x)


def _ring_all_reduce(nbytes: int, world: int) -> float:
    return 2 * (world - 1) / world * nbytes


class _Pending:
    def __init__(self, plan: RankPlan, meta):
        self.plan, self.meta = plan, meta
        self.works, self.recv, self.keep = [], {}, []


_TAG_HALO, _TAG_HALO_GRAD, _TAG_P2P, _TAG_P2P_GRAD = 11, 12, 13, 14   # gloo matches (peer, tag) in order


def _exchange(comm: Comm, kind: str, tag: int, sends: dict, recv: dict, device) -> dict:
    """Blocking point-to-point exchange: ``sends`` {peer: tensor}; ``recv`` {peer: (shape, dtype)}."""
    ops, bufs = [], {}
    for peer in sorted(sends):
        comm.count(kind, _nbytes(sends[peer]))
        ops.append(dist.P2POp(dist.isend, sends[peer], comm.peer(peer), comm.group, tag))
    for peer in sorted(recv):
        shape, dtype = recv[peer]
        bufs[peer] = torch.empty(shape, dtype=dtype, device=device)
        ops.append(dist.P2POp(dist.irecv, bufs[peer], comm.peer(peer), comm.group, tag))
    for w in (dist.batch_isend_irecv(ops) if ops else []):
        w.wait()
    return bufs


# --------------------------------------------------------------------------- autograd Functions
class _Tie(Function):
    @staticmethod
    def forward(ctx, x, dep):
        ctx.dep_meta = (dep.shape, dep.dtype, dep.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.dep_meta
        return grad, torch.zeros((), dtype=dtype, device=device).expand(shape)


class _ScaleGrad(Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class _Replicate(Function):
    @staticmethod
    def forward(ctx, comm, sync, *tensors):
        ctx.comm, ctx.sync = comm, sync
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        comm = ctx.comm
        if not ctx.sync:
            return (None, None) + grads
        grads = [g.contiguous() for g in grads]
        out = list(grads)
        for dtype in sorted({g.dtype for g in grads}, key=str):   # one all-reduce per dtype
            which = [i for i, g in enumerate(grads) if g.dtype == dtype]
            flat = torch.cat([grads[i].reshape(-1) for i in which])
            dist.all_reduce(flat, group=comm.group)
            comm.count("replicated_grads", _ring_all_reduce(_nbytes(flat), comm.world))
            off = 0
            for i in which:
                n = grads[i].numel()
                out[i] = flat[off:off + n].view_as(grads[i])
                off += n
        return (None, None) + tuple(out)


class _AllReduce(Function):
    @staticmethod
    def forward(ctx, comm, kind, x):
        ctx.comm, ctx.kind = comm, kind
        y = x.contiguous().clone()
        dist.all_reduce(y, group=comm.group)
        comm.count(kind, _ring_all_reduce(_nbytes(y), comm.world))
        return y

    @staticmethod
    def backward(ctx, grad):
        g = grad.contiguous().clone()
        dist.all_reduce(g, group=ctx.comm.group)
        ctx.comm.count(ctx.kind + "_grad", _ring_all_reduce(_nbytes(g), ctx.comm.world))
        return None, None, g


class _P2P(Function):
    """Forward: send / receive whole tensors. ``anchor`` (the backward chain's last tensor) makes a rank that
    only receives record this step too, so its backward sends the gradient back."""

    @staticmethod
    def forward(ctx, comm, kind, meta, anchor, *sends):
        peers_out, recv_meta, device = meta
        ctx.comm, ctx.kind, ctx.meta = comm, kind, meta
        ctx.send_meta = [(t.shape, t.dtype) for t in sends]
        ctx.anchor_meta = (anchor.shape, anchor.dtype)
        bufs = _exchange(comm, kind, _TAG_P2P, {p: t.contiguous() for p, t in zip(peers_out, sends)},
                         {p: (shape, dtype) for p, shape, dtype in recv_meta}, device)
        return (torch.zeros((), device=device),) + tuple(bufs[p] for p, _, _ in recv_meta)

    @staticmethod
    def backward(ctx, _token_grad, *grads):
        peers_out, recv_meta, device = ctx.meta
        back = _exchange(ctx.comm, ctx.kind + "_grad", _TAG_P2P_GRAD,
                         {p: g.contiguous() for (p, _, _), g in zip(recv_meta, grads)},
                         dict(zip(peers_out, ctx.send_meta)), device)
        shape, dtype = ctx.anchor_meta
        zero = torch.zeros((), dtype=dtype, device=device).expand(shape)
        return (None, None, None, zero) + tuple(back[p] for p in peers_out)


class _Broadcast(Function):
    @staticmethod
    def forward(ctx, comm, kind, src, x):
        ctx.comm, ctx.kind, ctx.src = comm, kind, src
        y = x.contiguous().clone()
        dist.broadcast(y, comm.peer(src), group=comm.group)
        comm.count(kind, _nbytes(y))
        return y

    @staticmethod
    def backward(ctx, grad):
        comm = ctx.comm
        g = grad.contiguous().clone()
        dist.all_reduce(g, group=comm.group)        # gloo and NCCL both; only src keeps the sum
        comm.count(ctx.kind + "_grad", _ring_all_reduce(_nbytes(g), comm.world))
        return None, None, None, (g if comm.rank == ctx.src else torch.zeros_like(g))


class _HaloWait(Function):
    """Forward: wait for the posted halo and build the key-box tensors. Backward: send each peer the
    gradient of the tokens it lent us, add what peers send back to our own tokens' gradients."""

    @staticmethod
    def forward(ctx, comm, pending, *tensors):
        plan = pending.plan
        ctx.comm, ctx.plan, ctx.meta = comm, plan, pending.meta
        for w in pending.works:
            w.wait()
        dev = tensors[0].device
        n_ext = box_size(plan.ext)
        outs = []
        for t in tensors:
            o = t.new_zeros(_token_shape(t, n_ext))
            o.index_copy_(2, plan.index("own_in_ext", dev), t)
            outs.append(o)
        for peer, buf in pending.recv.items():
            idx = plan.index(f"recv:{peer}", dev)
            pieces = _unpack(buf, [(_token_shape(t, idx.numel()), t.dtype) for t in tensors])
            for o, piece in zip(outs, pieces):
                o.index_copy_(2, idx, piece)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        comm, plan = ctx.comm, ctx.plan
        dev = grads[0].device
        own = [g.index_select(2, plan.index("own_in_ext", dev)) for g in grads]
        sends = {p: _pack([g.index_select(2, plan.index(f"recv:{p}", dev)) for g in grads]) for p in plan.recv}
        sizes = {}
        for p in plan.send:
            n = plan.index(f"send:{p}", dev).numel()
            sizes[p] = ((sum(_padded(torch.Size(_token_shape(g, n)).numel() * g.element_size()) for g in own),),
                        torch.uint8)
        bufs = _exchange(comm, "halo_grad", _TAG_HALO_GRAD, sends, sizes, dev)
        for p, buf in bufs.items():
            idx = plan.index(f"send:{p}", dev)
            pieces = _unpack(buf, [(_token_shape(g, idx.numel()), g.dtype) for g in own])
            for g, piece in zip(own, pieces):
                g.index_add_(2, idx, piece)
        return (None, None) + tuple(own)
