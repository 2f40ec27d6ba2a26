"""Token-by-token decoding (docs/semantics.md section 4), the reference form.

The state is the linear branch's ``(S, z)`` plus a cache of the prefix tokens and the last
``reach`` tokens (the window's reach). Memory does not grow with the sequence for any bounded window.
Keys that fall out of reach can never be visible again (reach is the largest backward distance of a
visible pair), so with ``combine="shared"`` they are folded into ``(S, z)`` as they leave.
"""

from __future__ import annotations

from typing import Optional

import torch

from lincomp.reference.features import feature_map
from lincomp.reference.masks import visible
from lincomp.inputs import check_step, unpack_initial_state
from lincomp.spec import AttentionSpec


def window_positions(spec: AttentionSpec, reach: Optional[int], t0: int, n: int) -> list:
    """Positions a decoder caches for the window after tokens ``t0 .. t0 + n - 1`` joined, among those new
    tokens: the prefix tokens, then the last ``reach`` ones (all of them for an unbounded causal window)."""
    if not spec.has_softmax:
        return []
    end = t0 + n
    tail = t0 if reach is None else max(t0, end - reach)
    return [p for p in range(t0, min(end, spec.prefix))] + list(range(max(tail, spec.prefix), end))


def can_prefill(spec: AttentionSpec, fresh: bool, n: int) -> bool:
    """Whether ``n`` new tokens can go through the forward kernel at once (``prefill``) rather than one by one.

    The kernel sees only the new keys and carries only ``(S, z)`` between calls, so a window needs a fresh
    decoder; ``combine="shared"`` has no kernel state (keys inside the window are not in S)."""
    return n > 1 and spec.combine != "shared" and spec.pool is None and (fresh or not spec.has_softmax)


def prefill_tensors(weights: dict, g, initial_state) -> dict:
    """The kernel keywords of one prefill call: the decoder's weights, the gate, the state so far."""
    out = dict(weights)
    if g is not None:
        out["g"] = g
    if initial_state is not None:
        out["initial_state"] = initial_state
    return out


class ReferenceDecoder:
    """Feed ``step(q_t, k_t, v_t, g_t)`` with ``[B, H|Hkv, 1, D]`` tensors; get ``o_t [B, H, 1, Dv]``.

    Weights (``feature_weight_q/k``, ``sink_logits``, ``window_gamma``, ``alpha``) are given once.
    """

    def __init__(self, spec, *, scale: Optional[float] = None, linear_scale: Optional[float] = None,
                 compute_dtype: torch.dtype = torch.float32, initial_state=None, **weights):
        spec = AttentionSpec.coerce(spec)
        if not spec.causal:
            raise ValueError("decoding needs a causal spec (causal=true): a non-causal query sees future keys")
        self.spec, self.scale, self.linear_scale = spec, scale, linear_scale
        self.dtype = compute_dtype
        self.weights = {k: v for k, v in weights.items() if v is not None}
        self.reach = None if spec.window is None else spec.window.reach(True)
        self.t = 0
        self.keys = []      # cached (position, k [B,H,D], v [B,H,Dv], fk [B,H,F] | None, logdecay [B,H,Fg])
        self.S = self.z = None
        self._initial_state = initial_state

    @property
    def cache_len(self) -> int:
        return len(self.keys)

    def _w(self, name):
        w = self.weights.get(name)
        return None if w is None else w.to(self.dtype)

    def step(self, q, k, v, g=None) -> torch.Tensor:
        spec, lin, dt = self.spec, self.spec.linear, self.dtype
        check_step(spec, q, k, v, g)
        B, H, _, D = q.shape
        rep = H // k.shape[1]
        q1 = q[:, :, 0].to(dt)
        k1 = k[:, :, 0].to(dt).repeat_interleave(rep, 1)
        v1 = v[:, :, 0].to(dt).repeat_interleave(rep, 1)
        scale = D ** -0.5 if self.scale is None else self.scale
        fq = fk = gt = None
        if lin is not None:
            fq = feature_map(lin.feature_map, q1[:, :, None], self._w("feature_weight_q"))[:, :, 0]
            fk = feature_map(lin.feature_map, k1[:, :, None], self._w("feature_weight_k"))[:, :, 0]
            if self.S is None:
                Fdim, Dv = fk.shape[-1], v1.shape[-1]
                st = self._initial_state
                if st is None:
                    self.S, self.z = fk.new_zeros(B, H, Fdim, Dv), fk.new_zeros(B, H, Fdim)
                else:
                    S0, z0 = unpack_initial_state(st, B, H, Fdim, Dv)
                    self.S, self.z = S0.to(dt), z0.to(dt)
            gt = (g[:, :, 0].to(dt) if g is not None else fk.new_zeros(B, H))
            gt = gt[..., None] if gt.dim() == 2 else gt        # [B, H, Fg]
            # Everything already in the state or the cache decays by a_t before token t joins.
            self.S = gt.exp()[..., None] * self.S
            self.z = gt.exp() * self.z
            self.keys = [(p, kk, vv, ff, ld + gt) for (p, kk, vv, ff, ld) in self.keys]
        t = self.t
        self.keys.append((t, k1, v1, fk, None if gt is None else torch.zeros_like(gt)))
        self.t += 1

        pos = torch.tensor([p for p, *_ in self.keys], device=q.device)
        vis = visible(spec, torch.tensor(t, device=q.device), pos)                       # [n]
        K = torch.stack([e[1] for e in self.keys], 2)                                     # [B, H, n, D]
        V = torch.stack([e[2] for e in self.keys], 2)
        o = None
        if spec.has_softmax:
            s = scale * torch.einsum("bhd,bhnd->bhn", q1, K)
            if spec.combine == "shared":
                m = s.masked_fill(~vis, float("-inf")).amax(-1, keepdim=True)
                p = (s.masked_fill(~vis, float("-inf")) - m).exp()   # masked first: no inf * 0
                gamma = self._w("window_gamma")[None, :, None]
                num = gamma * torch.einsum("bhn,bhnd->bhd", p, V)
                den = gamma[..., 0] * p.sum(-1)
                # Linear terms: the folded state plus cached keys outside the window.
                FK = torch.stack([e[3] for e in self.keys], 2)
                LD = torch.stack([e[4] for e in self.keys], 2)                            # [B, H, n, Fg]
                a = (fq[:, :, None, :] * FK * LD.exp()) * (~vis)[None, None, :, None]
                num = num + torch.einsum("bhnf,bhnd->bhd", a, V) + torch.einsum("bhf,bhfd->bhd", fq, self.S)
                den = den + a.sum((-1, -2)) + (fq * self.z).sum(-1)
                o = torch.where(den[..., None] == 0, torch.zeros_like(num), num / den[..., None])
            else:
                logits = s.masked_fill(~vis, float("-inf"))
                M = logits.amax(-1)
                sinks = self._w("sink_logits")
                if sinks is not None:
                    M = torch.maximum(M, sinks.amax(-1)[None])
                p = (logits - M[..., None]).exp()
                den = p.sum(-1)
                if sinks is not None:
                    den = den + (sinks[None] - M[..., None]).exp().sum(-1)
                o = torch.einsum("bhn,bhnd->bhd", p, V) / den[..., None]
                if spec.combine == "sum":
                    o = self._w("alpha")[None, :, None] * o
        if lin is not None and spec.combine != "shared":
            self.S = self.S + fk[..., None] * v1[:, :, None, :]
            self.z = self.z + fk
            num = torch.einsum("bhf,bhfd->bhd", fq, self.S)
            den = (fq * self.z).sum(-1)
            if lin.normalize:
                ol = torch.where(den[..., None] == 0, torch.zeros_like(num), num / den[..., None])
            else:
                ls = self.linear_scale
                if ls is None:
                    ls = D ** -0.5 if lin.feature_map == "identity" else 1.0
                ol = ls * num
            o = ol if o is None else o + ol
        self._evict()
        return o[:, :, None].to(q.dtype)

    def prefill(self, q, k, v, g=None) -> torch.Tensor:
        """Feed n tokens at once: q ``[B, H, n, D]``, k / v ``[B, Hkv, n, D]``, g ``[B, H, n(, F)]`` -> o ``[B, H, n, Dv]``.

        Where :func:`can_prefill` allows, the whole-sequence reference with ``return_state`` gives o and
        ``(S, z)``, and the window's cache takes the new tokens it would hold; otherwise token by token."""
        spec, lin, dt = self.spec, self.spec.linear, self.dtype
        n = q.shape[2]
        if not can_prefill(spec, self.t == 0, n):
            return torch.cat([self.step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1],
                                        None if g is None else g[:, :, i:i + 1]) for i in range(n)], 2)
        from lincomp.reference.oracle import reference
        check_step(spec, q[:, :, :1], k[:, :, :1], v[:, :, :1], None if g is None else g[:, :, :1])
        init = (self.S, self.z) if self.S is not None else self._initial_state
        res = reference(spec, q, k, v, scale=self.scale, linear_scale=self.linear_scale, layout="bhld",
                        compute_dtype=dt, return_state=lin is not None,
                        **prefill_tensors(self.weights, g if lin is not None else None, init))
        o, (self.S, self.z) = res if lin is not None else (res, (None, None))
        if lin is not None:
            self.S, self.z = self.S.to(dt), self.z.to(dt)
        t0, rep = self.t, q.shape[1] // k.shape[1]
        kept = [p - t0 for p in window_positions(spec, self.reach, t0, n)]
        if kept:
            kk = k[:, :, kept].to(dt).repeat_interleave(rep, 1)
            vv = v[:, :, kept].to(dt).repeat_interleave(rep, 1)
            fk = ld = None
            if lin is not None:   # phi(k) and the log-decay each key accumulated since it joined
                fk = feature_map(lin.feature_map, kk, self._w("feature_weight_k"))
                gg = q.new_zeros(q.shape[:3], dtype=dt) if g is None else g.to(dt)
                gg = gg[..., None] if gg.dim() == 3 else gg
                ld = gg.sum(2, keepdim=True) - gg.cumsum(2)
                ld = ld[:, :, kept]
            for j, p in enumerate(kept):
                self.keys.append((t0 + p, kk[:, :, j], vv[:, :, j], None if fk is None else fk[:, :, j],
                                  None if ld is None else ld[:, :, j]))
        self.t += n
        return o.to(q.dtype)

    def _evict(self):
        """Drop cached keys no later query can see; with "shared" fold them into (S, z)."""
        if self.reach is None:
            return
        keep = []
        for e in self.keys:
            p = e[0]
            # The next query is at position self.t; key p stays if it is a prefix key or within reach.
            if p < self.spec.prefix or self.t - p <= self.reach:
                keep.append(e)
            elif self.spec.combine == "shared":
                _, _, vv, ff, ld = e
                w = ff * ld.exp()
                self.S = self.S + w[..., None] * vv[:, :, None, :]
                self.z = self.z + w
        self.keys = keep
