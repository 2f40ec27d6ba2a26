"""Token-by-token decoding with a generated Triton step kernel (docs/semantics.md section 4).

:class:`TritonDecoder` has the interface of :class:`lincomp.reference.ReferenceDecoder`:
``step(q, k, v, g=None) -> o`` with ``[B, H|Hkv, 1, D]`` inputs and ``[B, H, 1, Dv]`` output, and
``cache_len``. Its state (:class:`DecodeState`) has a fixed size: the linear state ``(S, z)``, a ring
buffer of the last ``reach + 1`` keys / values, the prefix tokens, and for ``combine="shared"`` with
gates the log-decay of each ring key. Memory does not grow with the sequence. The step kernel is
``templates/triton/linear_decode.py.tmpl`` after the shared linear helpers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from lincomp.lower.triton.common import alloc, interpreting, next_pow2, template
from lincomp.lower.triton.linear import LinearPlan, load_module, render_common
from lincomp.lower.triton.linear_kernel import compile_linear
from lincomp.lower.triton.linear_launch import _dummy, _tl_dtype
from lincomp.inputs import check_step, unpack_initial_state
from lincomp.runtime.kernel import Unsupported
from lincomp.spec import AttentionSpec


@dataclass
class DecodeState:
    """What a decoder carries between steps (fp32 tensors on the inputs' device).

    S [B, H, F, Dv], z [B, H, F] (linear state; "shared": keys that left the window);
    ring_k [B, H, R, D], ring_v [B, H, R, Dv] (last R = reach + 1 non-prefix tokens, slot (p - prefix) % R);
    ring_ld [B, H, R, 1 | BF] (log-decay of ring keys, "shared" with gates);
    prefix_k [B, H, prefix, D], prefix_v [B, H, prefix, Dv]; t (tokens seen so far).
    """

    S: Optional[torch.Tensor]
    z: Optional[torch.Tensor]
    ring_k: Optional[torch.Tensor]
    ring_v: Optional[torch.Tensor]
    ring_ld: Optional[torch.Tensor]
    prefix_k: Optional[torch.Tensor]
    prefix_v: Optional[torch.Tensor]
    t: int = 0

    def nbytes(self) -> int:
        return sum(getattr(self, f.name).numel() * getattr(self, f.name).element_size()
                   for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor))

    def clone(self) -> "DecodeState":
        return DecodeState(*(getattr(self, f.name).clone() if isinstance(getattr(self, f.name), torch.Tensor)
                             else getattr(self, f.name) for f in fields(self)))


def render_decode_source(plan: LinearPlan) -> str:
    return render_common(plan, "linear_decode.py.tmpl") + template("linear_decode.py.tmpl").substitute()


class TritonDecoder:
    """Feed ``step(q_t, k_t, v_t, g_t)`` with ``[B, H|Hkv, 1, D]`` tensors; get ``o_t [B, H, 1, Dv]``.

    Weights (``feature_weight_q/k``, ``sink_logits``, ``window_gamma``, ``alpha``) are given once;
    ``initial_state`` is ``(S0, z0)`` or ``S0``; ``state`` resumes from a :class:`DecodeState`.
    Works for every causal spec with a bounded window or a linear branch (a dense causal softmax has no
    constant-size state: use a window). CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    """

    def __init__(self, spec, *, scale: Optional[float] = None, linear_scale: Optional[float] = None,
                 initial_state=None, state: Optional[DecodeState] = None, compute_dtype=None, **weights):
        # compute_dtype: accepted for ReferenceDecoder parity; the kernel accumulates in fp32
        spec = AttentionSpec.coerce(spec)
        if not spec.causal:
            raise ValueError("decoding needs a causal spec (causal=true): a non-causal query sees future keys")
        if spec.window is None and spec.linear is None:
            raise ValueError("a dense causal softmax keeps every key (its cache grows with the sequence); "
                             "give the spec a window or a linear branch to decode with constant memory")
        self.spec = spec
        self.plan = LinearPlan.from_spec(spec, allow_softmax_only=True)
        self.scale, self.linear_scale = scale, linear_scale
        known = ("feature_weight_q", "feature_weight_k", "sink_logits", "window_gamma", "alpha")
        for name in weights:
            if name not in known:
                raise TypeError(f"unexpected keyword {name!r}; a decoder takes the weights {list(known)}")
        self.weights = {k: v for k, v in weights.items() if v is not None}
        self._check_weights()
        self.reach = 0 if spec.window is None else spec.window.reach(True)
        self.R = self.reach + 1 if spec.has_softmax else 1
        self._initial_state = initial_state
        self.state = state
        self.source = render_decode_source(self.plan)
        self._mod = None

    def _check_weights(self) -> None:
        spec, lin = self.spec, self.spec.linear
        need = set()
        if lin is not None and lin.has_weights:
            need |= {"feature_weight_q", "feature_weight_k"}
        if spec.sinks:
            need.add("sink_logits")
        if spec.combine == "shared":
            need.add("window_gamma")
        if spec.combine == "sum":
            need.add("alpha")
        for name in need - set(self.weights):
            raise ValueError(f"{name} is required by this spec ({spec.summary()}); pass it to the decoder")
        for name in set(self.weights) - need:
            raise ValueError(f"{name} was given but the spec ({spec.summary()}) does not use it")

    @property
    def t(self) -> int:
        return 0 if self.state is None else self.state.t

    @property
    def cache_len(self) -> int:
        """Keys held for the window: prefix tokens seen + the last ``reach`` others (constant in t)."""
        if not self.spec.has_softmax:
            return 0
        t, P = self.t, self.spec.prefix
        return min(t, P) + max(0, min(self.reach, t - P))

    def reset(self) -> None:
        self.state = None

    # -------------------------------------------------------------------------------------------
    def _dims(self, q, k, v):
        B, H, _, D = q.shape
        Dv = v.shape[-1]
        E = self.weights["feature_weight_q"].shape[-1] if self.plan.hedgehog else 1
        F = 2 * E if self.plan.hedgehog else D
        return B, H, k.shape[1], D, Dv, F, E

    def _new_state(self, q, k, v) -> DecodeState:
        B, H, HKV, D, Dv, F, E = self._dims(q, k, v)
        dev, f32 = q.device, torch.float32
        BF = 2 * max(16, next_pow2(E)) if self.plan.hedgehog else max(16, next_pow2(D))
        S = z = ld = None
        if self.plan.has_linear:
            st = self._initial_state
            if st is None:
                S, z = torch.zeros(B, H, F, Dv, device=dev), torch.zeros(B, H, F, device=dev)
            else:
                S0, z0 = unpack_initial_state(st, B, H, F, Dv)
                S, z = S0.to(dev, f32).clone(), z0.to(dev, f32).clone()
            if self.spec.combine == "shared" and self.plan.gate:
                ld = torch.zeros(B, H, self.R, BF if self.plan.gate == 2 else 1, device=dev)
        rk = rv = pk = pv = None
        if self.spec.has_softmax:
            rk, rv = torch.zeros(B, H, self.R, D, device=dev), torch.zeros(B, H, self.R, Dv, device=dev)
            P = self.spec.prefix
            pk, pv = torch.zeros(B, H, P, D, device=dev), torch.zeros(B, H, P, Dv, device=dev)
        return DecodeState(S, z, rk, rv, ld, pk, pv, 0)

    def _check_step(self, q, k, v, g) -> None:
        check_step(self.spec, q, k, v, g)
        dev = q.device
        if dev.type == "cpu" and not interpreting():
            raise Unsupported("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise Unsupported(f"dtype {q.dtype}")

    def step(self, q, k, v, g=None) -> torch.Tensor:
        """One token: q [B, H, 1, D], k / v [B, Hkv, 1, D|Dv], g [B, H, 1] or [B, H, 1, F] -> o [B, H, 1, Dv]."""
        self._check_step(q, k, v, g)
        if self.state is None:
            self.state = self._new_state(q, k, v)
        if self._mod is None:
            self._mod = load_module(self.plan, self.source, stem="decode")
        st, plan, spec = self.state, self.plan, self.spec
        B, H, HKV, D, Dv, F, E = self._dims(q, k, v)
        dev = q.device
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o = alloc((B, H, 1, Dv), q.dtype, dev)
        lin = spec.linear
        scale = D ** -0.5 if self.scale is None else float(self.scale)
        ls = self.linear_scale
        if ls is None:
            ls = D ** -0.5 if (lin is not None and lin.feature_map == "identity") else 1.0
        coef = self.weights.get("window_gamma", self.weights.get("alpha"))
        BE = max(16, next_pow2(E)) if plan.hedgehog else 16
        BD = max(16, next_pow2(D))
        BF = 2 * BE if plan.hedgehog else BD
        BV, BR = max(16, next_pow2(Dv)), max(16, next_pow2(self.R))
        # the state [BF, BV] and the ring [BR, BD] live in registers: spread big ones over 8 warps
        warps = 8 if max(BF * BV, BR * BD) >= 8192 else 4
        gg = None if g is None else g.contiguous()
        d = _dummy(dev)
        w = lambda name: self.weights[name].contiguous() if name in self.weights else d  # noqa: E731
        opt = lambda x: d if x is None else x  # noqa: E731
        self._mod.linear_decode[(B * H,)](
            q, k, v, opt(gg), w("feature_weight_q"), w("feature_weight_k"), w("sink_logits"), opt(coef),
            opt(st.S), opt(st.z), opt(st.ring_k), opt(st.ring_v), opt(st.ring_ld), opt(st.prefix_k),
            opt(st.prefix_v), o,
            st.t, scale, float(ls), H, HKV, D, Dv, F, E, self.R,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
            DT=_tl_dtype(q.dtype), BD=BD, BV=BV, BE=BE, BF=BF, BR=BR, BP=max(16, next_pow2(spec.prefix)),
            BS=max(2, next_pow2(spec.sinks)), BG=BF if plan.gate == 2 else 1, num_warps=warps)
        st.t += 1
        return o

    def prefill(self, q, k, v, g=None) -> torch.Tensor:
        """Feed a prompt q [B, H, L, D], k / v [B, Hkv, L, D|Dv] (g [B, H, L(, F)]); returns o [B, H, L, Dv].

        A fresh decoder of a linear or "sum" spec runs the whole-sequence chunked kernel and takes its
        final state (and the last keys for the window); otherwise the prompt is fed token by token.
        """
        spec = self.spec
        if self.state is None and spec.linear is not None and spec.combine != "shared" and q.shape[2] > 0:
            return self._prefill_chunked(q, k, v, g)
        outs = []
        for i in range(q.shape[2]):
            gi = None if g is None else g[:, :, i:i + 1]
            outs.append(self.step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], gi))
        return torch.cat(outs, 2)

    def _prefill_chunked(self, q, k, v, g):
        spec = self.spec
        self._check_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], None if g is None else g[:, :, :1])
        tensors = dict(self.weights)
        if g is not None:
            tensors["g"] = g
        if self._initial_state is not None:
            tensors["initial_state"] = self._initial_state
        o, (S, z) = compile_linear(spec)(q, k, v, scale=self.scale, linear_scale=self.linear_scale,
                                         return_state=True, **tensors)
        st = self._new_state(q[:, :, :1], k[:, :, :1], v[:, :, :1])
        st.S, st.z = S.float().contiguous(), z.float().contiguous()
        L, H, P = q.shape[2], q.shape[1], spec.prefix
        if spec.has_softmax:  # the window's keys: prefix tokens, and the last reach tokens in their slots
            rep = H // k.shape[1]
            kh, vh = k.repeat_interleave(rep, 1).float(), v.repeat_interleave(rep, 1).float()
            n = min(L, P)
            st.prefix_k[:, :, :n], st.prefix_v[:, :, :n] = kh[:, :, :n], vh[:, :, :n]
            for p in range(max(P, L - self.R + 1), L):
                slot = (p - P) % self.R
                st.ring_k[:, :, slot], st.ring_v[:, :, slot] = kh[:, :, p], vh[:, :, p]
        st.t = L
        self.state = st
        return o


__all__ = ["TritonDecoder", "DecodeState", "render_decode_source"]
