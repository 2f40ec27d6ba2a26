"""``lincomp.distributed.attention(...)``: one attention call over a sequence split across processes.

Per rank, for the tokens after the prefix:
- window branch: halo exchange of the keys/values its windows reach (point-to-point, posted first),
  interior rows computed while the halo is in flight, border rows once it lands (plan.py);
- causal linear branch: each rank's state contribution (decay = product of its gates), an exclusive
  scan over ranks (a shift by one rank, then log2(R) point-to-point rounds) gives the state entering its
  slice; then local outputs with that initial state;
- non-causal linear branch: one all-reduce of (S, z);
- pooled keys (``window.pool``): each rank pools its own cells, one all-reduce shares them (pool.py);
- prefix rows: causal -> computed locally (they see only the prefix); non-causal -> exact (an
  all-reduce of shifted softmax sums over every rank's keys) or CLEAR's approximate mode (each rank
  attends to the prefix and its own patch; outputs averaged).
- packed rows (``cu_seqlens``, global offsets): the same steps, every local call cut at document borders,
  the state restarting at document starts, non-causal sums per document (lincomp.distributed.varlen).
Local compute goes through ``lincomp.compile(sub_spec, target)`` kernels; the rest is plain torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Optional

import torch
import torch.distributed as dist

from lincomp.distributed.comm import Comm
from lincomp.distributed.layout import Layout, box_shape
from lincomp.distributed.plan import GlobalPlan, branches, global_plan
from lincomp.distributed.pool import gather_pooled
from lincomp.distributed.varlen import Documents, documents, packed_attention
from lincomp.inputs import bind, unpack_initial_state
from lincomp.reference.features import feature_map
from lincomp.reference.linear import log_gates, safe_divide
from lincomp.runtime.pool import window_only
from lincomp.spec import AttentionSpec, GridWindow, Window1D

PREFIX_MODES = ("exact", "approximate")
_WEIGHTS = ("feature_weight_q", "feature_weight_k", "sink_logits", "window_gamma", "alpha", "pool_weight")


_KERNELS: dict = {}     # (sub-spec, target) -> Kernel: one build per sub-spec (task shapes repeat every call)


def _kernel(spec: AttentionSpec, target):
    key = (spec, target)
    if key not in _KERNELS:
        if callable(target):
            _KERNELS[key] = target(spec)
        else:
            from lincomp.compiler import compile as compile_spec
            _KERNELS[key] = compile_spec(spec, target=target)
    return _KERNELS[key]


def kernel_targets() -> set:
    """The targets of the local kernels built so far in this process ("auto" resolved per device)."""
    out = set()
    for kernel in _KERNELS.values():
        inner = getattr(kernel, "_kernels", None)
        out |= {k.target for k in inner.values()} if inner is not None else {kernel.target}
    return out


def _heads(t: torch.Tensor, H: int) -> torch.Tensor:
    """[B, Hkv, L, ...] -> [B, H, L, ...] (grouped-query attention)."""
    return t if t.shape[1] == H else t.repeat_interleave(H // t.shape[1], dim=1)


def _then(a: torch.Tensor, b: torch.Tensor, sizes, apply: bool = False) -> torch.Tensor:
    """Compose linear-state pieces, packed ``[..., Fg | F*Dv | F]`` = (log decay, S, z): ``b`` then ``a``.

    ``a`` covers tokens after those of ``b``: S = exp(log_a) S_b + S_a (z alike). With ``apply``, ``b`` is a
    state without a decay part (packed ``[F*Dv | F]``) and so is the result.
    """
    Fg, FD, F = sizes
    la, Sa, za = a.split(sizes, -1)
    if apply:
        Sb, zb = b.split([FD, F], -1)
    else:
        lb, Sb, zb = b.split(sizes, -1)
    decay = la.exp()
    S = (decay[..., None] * Sb.unflatten(-1, (F, -1))).flatten(-2) + Sa
    z = decay * zb + za
    return torch.cat([S, z], -1) if apply else torch.cat([la + lb, S, z], -1)


def _kernel_tensors(sub: AttentionSpec, weights: dict, g=None, state=None) -> dict:
    """The keyword tensors ``sub`` takes (a kernel rejects any it does not use)."""
    out = {}
    lin = sub.linear
    if lin is not None:
        if lin.gate is not None:
            out["g"] = g
        if lin.has_weights:
            out["feature_weight_q"] = weights["feature_weight_q"]
            out["feature_weight_k"] = weights["feature_weight_k"]
        if state is not None and sub.causal:
            out["initial_state"] = state
    if sub.sinks:
        out["sink_logits"] = weights["sink_logits"]
    if sub.combine == "shared":
        out["window_gamma"] = weights["window_gamma"]
    if sub.combine == "sum":
        out["alpha"] = weights["alpha"]
    return out


def attention(spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: Optional[Layout] = None,
              group=None, prefix_mode: str = "exact", overlap: bool = True, target: str = "auto",
              sync_grads: bool = True, scale: Optional[float] = None, linear_scale: Optional[float] = None,
              return_state: bool = False, stats: Optional[Counter] = None, **tensors):
    """Attention of ``spec`` over a sequence split across the ranks of ``group``.

    ``q, k, v``: this rank's ``[B, H|Hkv, prefix + own_tokens, D]`` (``layout.shard`` makes them): the
    prefix tokens (replicated, identical on every rank) then the rank's slice or patch, row-major.
    Per-token tensors (``g``) are sharded the same way; weights and ``initial_state`` are replicated.
    ``cu_seqlens`` (the whole row's document boundaries as global offsets, on every rank; 1D, no prefix): each
    document is attended as its own sequence, also one that crosses rank borders (the halo and the linear
    state are carried across the border and restart at document starts); ``initial_state`` then has one
    row per document (``lincomp.distributed.varlen``).
    ``layout``: a :class:`Layout` (default: ``Layout.for_spec``; for 1D specs the local lengths are
    all-gathered once). ``prefix_mode``: "exact" or "approximate" (CLEAR: prefix queries attend to the
    prefix and the local patch, outputs averaged over ranks; non-causal specs only differ).
    ``overlap``: compute interior rows while the halo is in flight. ``target``: the local kernels'
    ``lincomp.compile`` target, or a callable ``sub_spec -> kernel`` (any callable with the reference's
    signature). ``sync_grads``: all-reduce the gradients of replicated inputs (set
    False if something else, e.g. DDP over the same group, sums them). ``stats``: a Counter that
    receives the bytes this rank sends, by kind.

    Returns this rank's ``o [B, H, prefix + own_tokens, Dv]`` (prefix rows replicated), and with
    ``return_state`` the final ``(S, z)`` of the whole sequence, replicated. Every rank must call this
    (and run backward through its output) in the same order: it is a collective.

    Gradients (Megatron's convention): own tokens get their slice of the single-process gradient;
    replicated inputs (prefix tokens, weights, ``initial_state``) get the full gradient on every rank;
    replicated outputs (prefix rows, final state) must receive the same upstream gradient on every rank.
    """
    spec = AttentionSpec.coerce(spec)
    if prefix_mode not in PREFIX_MODES:
        raise ValueError(f"prefix_mode must be one of {list(PREFIX_MODES)}, got {prefix_mode!r}")
    if tensors.get("key_padding_mask") is not None:
        raise ValueError("key_padding_mask is not supported by lincomp.distributed; drop it or run single-process")
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        if layout is not None and layout.world_size != 1:
            raise ValueError(f"layout has {layout.world_size} ranks but no process group of that size is running; "
                             "call torch.distributed.init_process_group first")
        return _kernel(spec, target)(q, k, v, scale=scale, linear_scale=linear_scale, return_state=return_state,
                                     **tensors)
    comm = Comm(group, stats)
    layout = _resolve_layout(spec, layout, comm, q)
    docs, doc_states = None, None
    if tensors.get("cu_seqlens") is not None:   # a packed row (lincomp.distributed.varlen)
        docs = documents(spec, layout, tensors.pop("cu_seqlens"), return_state)
        if docs.borders_on_documents(layout):   # each rank runs its own whole documents
            return packed_attention(spec, q, k, v, kernel=_kernel(spec, target), layout=layout, comm=comm, docs=docs,
                                    sync_grads=sync_grads, scale=scale, linear_scale=linear_scale, **tensors)
        doc_states = tensors.pop("initial_state", None)   # one row per document, bound below
    local_spec = spec.with_grid(box_shape(layout.box(comm.rank))) if isinstance(spec.window, GridWindow) else spec
    call = bind(local_spec, q, k, v, scale=scale, linear_scale=linear_scale, return_state=return_state, **tensors)
    if doc_states is not None:
        if spec.linear is None or not spec.causal:
            raise ValueError("initial_state needs a causal linear branch")
        call.S0, call.z0 = unpack_initial_state(doc_states, docs.N, call.H, call.F, call.Dv, device=q.device)
    plan = global_plan(window_only(spec), layout, bool(overlap))   # pooled keys: see lincomp.distributed.pool
    return _Run(plan, comm, call, target, prefix_mode, sync_grads, (spec, layout) if spec.pool else None,
                docs).run()


def _resolve_layout(spec: AttentionSpec, layout: Optional[Layout], comm: Comm, q: torch.Tensor) -> Layout:
    n = spec.prefix
    if layout is None:
        if isinstance(spec.window, GridWindow):
            layout = Layout.for_spec(spec, comm.world)
        else:
            mine = torch.tensor([q.shape[2] - n], dtype=torch.long, device=q.device)
            sizes = [torch.zeros_like(mine) for _ in range(comm.world)]
            dist.all_gather(sizes, mine, group=comm.group)
            sizes = [int(s) for s in sizes]
            if min(sizes) < 1:
                raise ValueError(f"every rank needs at least one token after the {n} prefix tokens; local sizes "
                                 f"are {sizes}")
            layout = Layout.sequence(n + sum(sizes), comm.world, prefix=n, sizes=sizes)
    if layout.world_size != comm.world:
        raise ValueError(f"layout has {layout.world_size} ranks but the group has {comm.world}; "
                         f"build it with world_size={comm.world}")
    if layout.prefix != n:
        raise ValueError(f"layout.prefix = {layout.prefix} but spec.prefix = {n}; build the layout from the spec "
                         "(Layout.for_spec)")
    w = spec.window
    if isinstance(w, GridWindow) and layout.shape != w.grid:
        raise ValueError(f"layout splits a {list(layout.shape)} grid but window.grid is {list(w.grid)}; "
                         "use Layout.for_spec(spec, world_size)")
    if not isinstance(w, GridWindow) and len(layout.shape) != 1:
        raise ValueError(f"a {list(layout.shape)} grid layout needs a 2d/3d window; use Layout.sequence")
    want = layout.local_length(comm.rank)
    if q.shape[2] != want:
        raise ValueError(f"rank {comm.rank}: q has {q.shape[2]} tokens, the layout gives it {want} "
                         f"({n} prefix + {want - n} own); shard inputs with lincomp.distributed.shard")
    return layout


class _Run:
    """One call's data on this rank: replicated and own parts of every tensor, and the steps."""

    def __init__(self, plan: GlobalPlan, comm: Comm, call, target: str, prefix_mode: str, sync_grads: bool,
                 pooled=None, docs: Optional[Documents] = None):
        self.plan, self.comm, self.call, self.target, self.mode = plan, comm, call, target, prefix_mode
        self.pooled = pooled      # (pooled spec, layout) when window.pool is set
        self.docs = docs          # a packed row's boundaries (then S0, z0 hold one row per document)
        self.kvp = None
        self.spec, self.parts = plan.spec, plan.parts
        self.rp = plan.ranks[comm.rank]
        self.n = n = self.spec.prefix
        self.cd = torch.float64 if call.q.dtype == torch.float64 else torch.float32
        self.H = call.H
        q, k, v, g = call.q, call.k, call.v, call.g
        cut = (lambda t: None if t is None or n == 0 else t[:, :, :n])
        comm.anchor([q, k, v, g, *(getattr(call, w) for w in _WEIGHTS), call.S0, call.z0])
        reps = comm.replicate([cut(q), cut(k), cut(v), cut(g), *(getattr(call, w) for w in _WEIGHTS),
                               call.S0, call.z0], sync=sync_grads)
        self.q_p, self.k_p, self.v_p, self.g_p = reps[:4]
        nw = len(_WEIGHTS)
        self.w = dict(zip(_WEIGHTS, reps[4:4 + nw]))
        self.S0 = None if reps[4 + nw] is None else (reps[4 + nw], reps[5 + nw])
        own = (lambda t: None if t is None else (t if n == 0 else t[:, :, n:]))
        self.q_o, self.k_o, self.v_o, self.g_o = own(q), own(k), own(v), own(g)

    # -- top level ------------------------------------------------------------------------------
    def run(self):
        plan, rp, comm = self.plan, self.rp, self.comm
        halo = [self.k_o, self.v_o] + ([self.g_o] if self.parts.exchange_gate else [])
        pending = comm.start_halo(rp, halo) if plan.exchange else None
        if self.pooled is not None:
            self.kvp = gather_pooled(comm, *self.pooled, self.k_o, self.v_o, self.w["pool_weight"])
        states, final = self._states() if plan.has_states else ({}, None)
        outs, ext = [None] * len(rp.tasks), None
        for i in sorted(range(len(rp.tasks)), key=lambda i: rp.tasks[i].from_halo):   # interior first
            if rp.tasks[i].from_halo and ext is None:
                ext = self._halo(pending, halo)
            outs[i] = self._task(i, ext, states)
        if pending is not None and ext is None:       # lend our tokens even if no local row needs a halo
            ext = self._halo(pending, halo)
        o_win = torch.cat(outs, 2).index_select(2, rp.index("place", self.q_o.device)) if outs else None
        total = self._global_state() if self.parts.linear == "global" else None
        o_own = self._combine(o_win, self._own_linear(states, total)).to(self.call.q.dtype)
        o = o_own if self.n == 0 else torch.cat([self._prefix_rows(total), o_own], 2)
        o = comm.finish(o)
        if self.call.return_state:
            return o, tuple(comm.replicated_output(t) for t in final)
        return o

    def _combine(self, o_win, o_lin):
        if o_lin is None:
            return o_win
        if o_win is None:
            return o_lin
        alpha = self.w["alpha"].to(self.cd)[None, :, None, None]
        return (o_lin.to(self.cd) + alpha * o_win.to(self.cd)).to(self.call.q.dtype)

    # -- window (or fused hybrid) tasks -----------------------------------------------------------
    def _halo(self, pending, halo):
        k, v, *g = self.comm.finish_halo(pending, halo)
        dev = self.q_o.device
        q = self.q_o.new_zeros(k.shape[:1] + self.q_o.shape[1:2] + k.shape[2:3] + self.q_o.shape[3:])
        q = q.index_copy(2, self.rp.index("own_in_ext", dev), self.q_o)
        return {"q": q, "k": k, "v": v, "g": g[0] if g else None}

    def _task(self, i: int, ext, states):
        task, rp, n, call = self.rp.tasks[i], self.rp, self.n, self.call
        sub = self.parts.task_spec
        sub = sub.with_grid(box_shape(task.keys)) if isinstance(sub.window, GridWindow) else sub
        src = ext if task.from_halo else {"q": self.q_o, "k": self.k_o, "v": self.v_o, "g": self.g_o}
        idx = rp.index(f"keys:{i}", self.q_o.device)
        q, k, v = (src[x].index_select(2, idx) for x in "qkv")
        g = None
        if sub.linear is not None and sub.linear.gate is not None:
            g = src["g"].index_select(2, idx)
            if n:   # fused tasks: the decay over the prefix is already in the entering state
                g = torch.cat([torch.zeros_like(self.g_p), g], 2)
        if n:
            q, k, v = torch.cat([self.q_p, q], 2), torch.cat([self.k_p, k], 2), torch.cat([self.v_p, v], 2)
        if self.kvp is not None:   # the pooled keys join as extra prefix keys; their rows are dropped
            kp, vp = self.kvp
            q = torch.cat([q.new_zeros(*q.shape[:2], kp.shape[2], q.shape[3]), q], 2)
            k, v = torch.cat([kp.to(k.dtype), k], 2), torch.cat([vp.to(v.dtype), v], 2)
            sub, n = replace(sub, prefix=n + kp.shape[2]), n + kp.shape[2]
        state = states.get(task.state_at) if task.state_at is not None else None
        packed = {}
        if self.docs is not None:
            (lo, hi), = task.keys
            state, packed = self._packed(lo, hi, state)
        o = _kernel(sub, self.target)(q, k, v, scale=call.scale, linear_scale=call.linear_scale,
                                      **_kernel_tensors(sub, self.w, g, state), **packed)
        return o.index_select(2, rp.index(f"rows:{i}", o.device) + n)

    # -- packed rows ------------------------------------------------------------------------------
    def _initial(self, d: Optional[int] = None) -> tuple:
        """(S [B, H, F, Dv], z [B, H, F]) entering document ``d`` (the sequence when None): zeros or initial_state's."""
        if self.S0 is not None:
            S, z = self.S0 if d is None else (self.S0[0][d:d + 1], self.S0[1][d:d + 1])
            return S.to(self.cd), z.to(self.cd)
        B, H, F, Dv = self.q_o.shape[0], self.H, self.call.F, self.call.Dv
        return self.q_o.new_zeros(B, H, F, Dv, dtype=self.cd), self.q_o.new_zeros(B, H, F, dtype=self.cd)

    def _packed(self, lo: int, hi: int, entering=None):
        """A kernel call over tokens ``lo .. hi - 1`` of a packed row: its ``cu_seqlens`` and, given the state
        ``entering`` its first token's document at ``lo``, the initial state of every document it overlaps."""
        first, cu = self.docs.local(lo, hi)
        if entering is None:
            return None, {"cu_seqlens": cu}
        rows = [entering] + [self._initial(d) for d in range(first + 1, first + len(cu) - 1)]
        return (torch.cat([S for S, _ in rows]), torch.cat([z for _, z in rows])), {"cu_seqlens": cu}

    def _carry(self, fk, v, G, m: int) -> torch.Tensor:
        """Packed (log decay, S, z) taking the state entering this rank's slice to the state entering its token
        ``m``. In a packed row, a document starting at a token in ``1 .. m`` cuts the carry: the map forgets
        its input (log decay -inf) and gives that document's initial state plus its tokens before ``m``."""
        start = self.rp.own_range[0]
        cut = None if self.docs is None else self.docs.last_start(start, start + m)
        if cut is None:
            return self._contrib(fk, v, G, m)
        p, d = cut[0] - start, cut[1]
        S0, z0 = self._initial(d)
        if p < m:
            rest = self._contrib(fk[:, :, p:], v[:, :, p:], G[:, :, p:] - G[:, :, p - 1:p], m - p)
            decay = rest[..., :G.shape[-1]].exp()
            S = (decay[..., None] * S0).flatten(-2) + rest[..., G.shape[-1]:-z0.shape[-1]]
            z = decay * z0 + rest[..., -z0.shape[-1]:]
        else:     # token m starts a document: its initial state
            S, z = S0.flatten(-2), z0
        return torch.cat([torch.full_like(G[:, :, 0], float("-inf")), S, z], -1)

    # -- linear branch ----------------------------------------------------------------------------
    def _features(self, which: str, x: torch.Tensor) -> torch.Tensor:
        w = self.w[f"feature_weight_{which}"]
        return feature_map(self.spec.linear.feature_map, _heads(x, self.H).to(self.cd),
                           None if w is None else w.to(self.cd))

    def _states(self):
        """The states entering the positions this rank needs ({flat position: (S, z)}), and the final state.

        Each rank's slice contributes x_r = (log decay, S, z) (its keys decayed to its end). The state entering
        slice r is the prefix state carried through x_0 o ... o x_{r-1}: an exclusive scan, done as a shift
        by one rank and log2(R) point-to-point rounds (Kogge-Stone). States entering other positions (a
        fused task's key box may start in a neighbour's slice) are made by that slice's rank and sent.
        """
        plan, comm, cd, rp = self.plan, self.comm, self.cd, self.rp
        r, R, dev = comm.rank, comm.world, self.q_o.device
        B, H = self.q_o.shape[:2]
        fk = self._features("k", self.k_o)
        v = _heads(self.v_o, H).to(cd)
        G = log_gates(None if self.g_o is None else self.g_o.to(cd), fk).cumsum(2)   # [B, H, L_own, Fg]
        F, Dv, Fg = fk.shape[-1], v.shape[-1], G.shape[-1]
        sizes = [Fg, F * Dv, F]
        start, stop = rp.own_range
        x = self._carry(fk, v, G, stop - start)                                       # [B, H, Fg + F*Dv + F]
        like = (tuple(x.shape), x.dtype)
        y = comm.p2p({r + 1: x} if r + 1 < R else {}, {r - 1: like} if r else {}, "state", dev).get(r - 1)
        for s in plan.scan_rounds():
            got = comm.p2p({r + s: y} if 1 <= r and r + s <= R - 1 else {},
                           {r - s: like} if r - s >= 1 else {}, "state", dev)
            if r - s >= 1:
                y = _then(y, got[r - s], sizes)
        prefix = self._prefix_state(B, H, F, Dv)                                      # packed (S, z)
        entering = prefix if y is None else _then(y, prefix, sizes, apply=True)
        made = {p: entering if p == start else _then(self._carry(fk, v, G, p - start), entering, sizes, apply=True)
                for p in plan.produce[r]}
        pk = prefix.shape[-1]
        sends = {user: torch.stack([made[p] for p in ps]) for (maker, user), ps in plan.deliveries.items()
                 if maker == r}
        recv = {maker: ((len(ps),) + prefix.shape, prefix.dtype) for (maker, user), ps in plan.deliveries.items()
                if user == r}
        got = comm.p2p(sends, recv, "state", dev) if plan.deliveries else {}
        states = {0: prefix, **made}
        for (maker, user), ps in plan.deliveries.items():
            if user == r:
                states.update(zip(ps, got[maker].unbind(0)))
        unpack = (lambda t: (t[..., :pk - F].view(B, H, F, Dv), t[..., pk - F:]))
        states = {p: unpack(states[p]) for p in plan.needs[r]}
        final = None
        if self.call.return_state:
            last = _then(x, entering, sizes, apply=True) if r == R - 1 else torch.zeros_like(prefix)
            final = unpack(comm.broadcast(last, R - 1, "state"))
        return states, final

    @staticmethod
    def _contrib(fk, v, G, m: int) -> torch.Tensor:
        """Packed (log decay, S, z) of the first ``m`` local tokens, decayed to the end of them."""
        last = G[:, :, m - 1:m]
        w = fk[:, :, :m] * (last - G[:, :, :m]).exp()
        S = w.transpose(-1, -2) @ v[:, :, :m]
        return torch.cat([last[:, :, 0], S.flatten(-2), w.sum(2)], -1)

    def _prefix_state(self, B, H, F, Dv) -> torch.Tensor:
        """Packed (S, z) after the prefix: the initial state decayed over it (+ its keys, except in 'shared')."""
        S, z = self._initial(None if self.docs is None else 0)
        state = torch.cat([S.flatten(-2), z], -1)
        if self.n == 0:
            return state
        cd = self.cd
        fk = self._features("k", self.k_p)
        G = log_gates(None if self.g_p is None else self.g_p.to(cd), fk).cumsum(2)
        contrib = self._contrib(fk, _heads(self.v_p, H).to(cd), G, self.n)
        if not self.parts.state_keys_prefix:            # keep only the decay
            contrib = torch.cat([contrib[..., :G.shape[-1]], torch.zeros_like(state)], -1)
        return _then(contrib, state, [G.shape[-1], F * Dv, F], apply=True)

    def _global_state(self):
        """Non-causal: (S, z) summed over every token of every rank (one all-reduce); in a packed row, one
        sum per document (``S [N, H, F, Dv]``, each rank adding the pieces of the documents it holds)."""
        def local(k, v):
            fk = self._features("k", k)
            return fk.transpose(-1, -2) @ _heads(v, self.H).to(self.cd), fk.sum(2)

        if self.docs is None:
            S, z = local(self.k_o, self.v_o)
            mine = torch.cat([S.flatten(-2), z], -1)
        else:
            first, cu = self._own_documents()
            pieces = [local(self.k_o[:, :, a:b], self.v_o[:, :, a:b]) for a, b in zip(cu, cu[1:])]
            S, z = pieces[0]
            own = torch.cat([torch.cat([Sd.flatten(-2), zd], -1) for Sd, zd in pieces])       # [n, H, F*Dv + F]
            mine = own.new_zeros((self.docs.N,) + own.shape[1:]).index_copy(
                0, torch.arange(first, first + len(pieces), device=own.device), own)
        F = z.shape[-1]
        tot = self.comm.all_reduce(mine, "state")
        S, z = tot.split([tot.shape[-1] - F, F], -1)
        S = S.view(z.shape + (-1,))
        if self.n:
            Sp, zp = local(self.k_p, self.v_p)
            S, z = S + Sp, z + zp
        return S, z

    def _linear_out(self, q: torch.Tensor, total) -> torch.Tensor:
        S, z = total
        fq = self._features("q", q)
        num = fq @ S
        if self.spec.linear.normalize:
            return safe_divide(num, (fq * z[:, :, None, :]).sum(-1))
        return self.call.linear_scale * num

    def _own_documents(self):
        """(first document, [0, ..., own tokens] boundaries as ints) of this rank's slice of a packed row."""
        first, cu = self.docs.local(*self.rp.own_range)
        return first, cu.tolist()

    def _own_linear(self, states, total):
        if self.parts.linear is None:
            return None
        if self.parts.linear == "global":
            if self.docs is None:
                return self._linear_out(self.q_o, total)
            first, cu = self._own_documents()
            S, z = total       # [N, H, F, Dv], [N, H, F]: one row per document
            return torch.cat([self._linear_out(self.q_o[:, :, a:b], (S[d:d + 1], z[d:d + 1]))
                              for d, a, b in zip(range(first, first + len(cu) - 1), cu, cu[1:])], 2)
        sub, call = self.parts.linear_spec, self.call
        state, packed = states[self.rp.own_range[0]], {}
        if self.docs is not None:
            state, packed = self._packed(*self.rp.own_range, state)
        return _kernel(sub, self.target)(self.q_o, self.k_o, self.v_o, scale=call.scale,
                                         linear_scale=call.linear_scale,
                                         **_kernel_tensors(sub, self.w, self.g_o, state), **packed)

    # -- prefix rows ------------------------------------------------------------------------------
    def _prefix_rows(self, total) -> torch.Tensor:
        spec, call = self.spec, self.call
        if spec.causal:         # prefix rows see only prefix keys: one local call, replicated
            window = None if spec.window is None else Window1D(self.n - 1, 0)
            sub = replace(spec, window=window, prefix=0, name=None)
            o = _kernel(sub, self.target)(self.q_p, self.k_p, self.v_p, scale=call.scale,
                                          linear_scale=call.linear_scale,
                                          **_kernel_tensors(sub, self.w, self.g_p, self.S0))
        else:
            o_win = self._prefix_softmax() if spec.has_softmax else None
            o_lin = self._linear_out(self.q_p, total) if spec.linear is not None else None
            o = self._combine(o_win, o_lin)
        return self.comm.replicated_output(o.to(call.q.dtype))

    def _prefix_softmax(self) -> torch.Tensor:
        """Non-causal prefix rows over every key: exact (global shift and sums) or approximate (local, averaged)."""
        cd, H, comm = self.cd, self.H, self.comm
        q = self.q_p.to(cd) * self.call.scale
        s_p = q @ _heads(self.k_p, H).to(cd).transpose(-1, -2)            # [B, H, n, n]
        s_o = q @ _heads(self.k_o, H).to(cd).transpose(-1, -2)            # [B, H, n, L_own]
        sinks = None
        m = torch.maximum(s_p.amax(-1), s_o.amax(-1))
        if self.spec.sinks:
            sinks = self.w["sink_logits"].to(cd)[None, :, None, :]
            m = torch.maximum(m, sinks.amax(-1))
        m = m.detach()
        if self.mode == "exact":
            m = comm.all_reduce_max(m, "prefix")
        e_o = (s_o - m[..., None]).exp()
        num = e_o @ _heads(self.v_o, H).to(cd)
        den = e_o.sum(-1, keepdim=True)
        if self.mode == "exact":
            num, den = comm.all_reduce(torch.cat([num, den], -1), "prefix").split([num.shape[-1], 1], -1)
        e_p = (s_p - m[..., None]).exp()
        num = num + e_p @ _heads(self.v_p, H).to(cd)
        den = den[..., 0] + e_p.sum(-1)
        if sinks is not None:
            den = den + (sinks - m[..., None]).exp().sum(-1)
        o = safe_divide(num, den)
        if self.mode == "approximate":
            o = comm.all_reduce(o, "prefix") / comm.world
        return o
