"""Decoding one token at a time (docs/semantics.md section 4) as one generated TVM kernel per step.

``TVMDecoder`` has the interface of :class:`lincomp.reference.ReferenceDecoder`: ``step(q, k, v, g)`` with
``[B, H|Hkv, 1, D]`` tensors returns ``o [B, H, 1, Dv]``. Its state lives in preallocated buffers the
kernel updates in place:

- the linear state ``S [B, H, F, Dv]``, ``z [B, H, F]``;
- a key/value cache ``[B, Hkv, NC, D]``: ``prefix`` slots kept forever, then a ring of ``reach + 1``
  slots (the window's reach; a dense causal softmax grows the cache instead), slot positions in ``pos``;
- for ``combine="shared"``: phi(k) of cached keys and their accumulated log-decay; a key leaving the
  reach is folded into ``(S, z)`` by the kernel (as the reference decoder does).

The kernel (``decode_step``) runs per (batch, head): features, gate decay, the window softmax over the
visible cache slots (the same generated visibility rule as the window kernel), the linear read-out and
update, the combine, and the fold of the leaving key. ``t`` (position) and the slots are scalar
arguments: one compiled module serves every step.
"""

from __future__ import annotations

from typing import Optional

import torch

from lincomp.inputs import check_step, unpack_initial_state
from lincomp.lower.tvmir import build as _build
from lincomp.lower.tvmir.codegen import LOG2E, NEG_INF, Script, base2, exp2, f32
from lincomp.lower.tvmir.linear import INLINE_MAPS, phi_expr
from lincomp.lower.tvmir.window import visibility
from lincomp.reference.decode import can_prefill, prefill_tensors, window_positions
from lincomp.runtime.buffers import alloc_output
from lincomp.spec import AttentionSpec

L2E = f32(LOG2E)
# Below this many multiply-adds a step runs on the calling thread: a parallel launch wakes the other threads
# (microseconds on an idle machine, a scheduler time slice, milliseconds, on a busy one) for work one thread
# finishes in a fraction of a millisecond (e.g. B=1, 8 heads, a 129-key window and a 64 x 64 state: 0.3M).
SERIAL_WORK = 1 << 20


def step_work(spec: AttentionSpec, B: int, H: int, D: int, Dv: int, F: Optional[int], E: Optional[int],
              nc: int) -> int:
    """Multiply-adds of one decoding step over all rows and heads: the ``nc`` cache slots' scores and values,
    the linear state's decay / update / read-out, the learned feature map, the shared combine's cached terms."""
    per_head = nc * (D + Dv) if spec.has_softmax else 0
    if F:
        per_head += 3 * F * Dv + (nc * F if spec.combine == "shared" else 0)
    if E:
        per_head += 2 * D * E
    return B * H * per_head


def decode_args(spec: AttentionSpec) -> list:
    lin = spec.linear
    names = ["q", "k", "v"]
    if lin is not None and lin.gate is not None:
        names.append("g")
    if lin is not None and lin.has_weights:
        names += ["wq", "wk"]
    if spec.sinks:
        names.append("sink_logits")
    if spec.combine == "shared":
        names.append("window_gamma")
    if spec.combine == "sum":
        names.append("alpha")
    if spec.has_softmax:
        names += ["kc", "vc", "pos"]
    if spec.combine == "shared":
        names += ["fkc", "ld"]
    if lin is not None:
        names += ["S", "z"]
    return names + ["o", "t", "slot", "evict", "scale", "linear_scale"]


def decode_source(spec: AttentionSpec, H: int, Hkv: int, D: int, Dv: int, F: Optional[int], E: Optional[int],
                  name: str = "decode_step", parallel: bool = True) -> str:
    """TVMScript of one decoding step for ``spec``; ``parallel=False`` runs the (batch, head) loops on the
    calling thread (see :func:`step_work`)."""
    lin = spec.linear
    group = H // Hkv
    shared, summed = spec.combine == "shared", spec.combine == "sum"
    gate = lin.gate if lin is not None else None
    Fg = F if gate == "vector" else 1
    names = decode_args(spec)
    scalars = {"t": "T.int32", "slot": "T.int32", "evict": "T.int32", "scale": "T.float32",
               "linear_scale": "T.float32"}
    loop = "T.parallel" if parallel else "T.serial"
    s = Script()
    s("@T.prim_func")
    params = ", ".join(f"{a}: {scalars[a]}" if a in scalars else f"{a}_h: T.handle" for a in names)
    with s.block(f"def {name}({params}):"):
        s(f'T.func_attr({{"global_symbol": "{name}", "tir.noalias": True}})')
        s("B = T.int32()", "NC = T.int32()")
        shapes = {"q": f"(B, {H}, {D})", "k": f"(B, {Hkv}, {D})", "v": f"(B, {Hkv}, {Dv})",
                  "g": f"(B, {H})" if gate == "scalar" else f"(B, {H}, {F})",
                  "wq": f"({H}, {D}, {E})", "wk": f"({H}, {D}, {E})", "sink_logits": f"({H}, {spec.sinks})",
                  "window_gamma": f"({H},)", "alpha": f"({H},)", "kc": f"(B, {Hkv}, NC, {D})",
                  "vc": f"(B, {Hkv}, NC, {Dv})", "pos": "(NC,)", "fkc": f"(B, {H}, NC, {F})",
                  "ld": f"(B, {H}, NC, {Fg})", "S": f"(B, {H}, {F}, {Dv})", "z": f"(B, {H}, {F})",
                  "o": f"(B, {H}, {Dv})"}
        for a in names:
            if a not in scalars:
                dt = "int32" if a == "pos" else "float32"
                s(f'{a} = T.match_buffer({a}_h, {shapes[a]}, "{dt}")')
        if spec.has_softmax:
            s("# the current key / value into its cache slot")
            with s.block(f"for w in {loop}(B * {Hkv}):"):
                with s.block(f"for d in T.vectorized({D}):"):
                    s(f"kc[w // {Hkv}, w % {Hkv}, slot, d] = k[w // {Hkv}, w % {Hkv}, d]")
                with s.block(f"for d in T.vectorized({Dv}):"):
                    s(f"vc[w // {Hkv}, w % {Hkv}, slot, d] = v[w // {Hkv}, w % {Hkv}, d]")
        with s.block(f"for w in {loop}(B * {H}):"):
            s(f"b = w // {H}", f"h = w % {H}", f"hk = h // {group}" if group > 1 else "hk = h")
            s(f'acc = T.alloc_buffer(({Dv},), "float32")', 'sc = T.alloc_buffer((4,), "float32")')
            if lin is not None:
                s(f'fq = T.alloc_buffer(({F},), "float32")', f'fk = T.alloc_buffer(({F},), "float32")')
                _emit_features(s, lin.feature_map, D, E, F)
                if gate is not None:
                    s("# everything in the state decays by a_t = exp(g_t) before token t joins")
                    ge = (lambda f: f"g[b, h, {f}]") if gate == "vector" else (lambda f: "g[b, h]")
                    with s.block(f"for f in range({F}):"):
                        arg = ge("f") + f" * {L2E}"
                        s(f"a_f = {exp2(arg)}")
                        with s.block(f"for d in T.vectorized({Dv}):"):
                            s("S[b, h, f, d] = S[b, h, f, d] * a_f")
                        s("z[b, h, f] = z[b, h, f] * a_f")
            if shared:
                s("# cached keys age by g_t; the current key joins with phi(k) and no decay")
                if gate is not None:
                    g_t = "g[b, h, f]" if gate == "vector" else "g[b, h]"
                    with s.block("for c in range(NC):"):
                        with s.block("if pos[c] >= 0 and c != slot:"):
                            with s.block(f"for f in range({Fg}):"):
                                s(f"ld[b, h, c, f] = ld[b, h, c, f] + {g_t}")
                with s.block(f"for f in range({F}):"):
                    s("fkc[b, h, slot, f] = fk[f]")
                with s.block(f"for f in range({Fg}):"):
                    s("ld[b, h, slot, f] = T.float32(0)")
            if spec.has_softmax:
                _emit_window(s, spec, D, Dv)
            if shared:
                _emit_shared(s, F, Fg, Dv)
            elif lin is not None:
                _emit_linear(s, lin, F, Dv, summed)
            else:
                with s.block(f"for d in T.vectorized({Dv}):"):
                    s("o[b, h, d] = T.if_then_else(sc[1] == T.float32(0), T.float32(0), acc[d] / sc[1])")
    return s.text()


def _emit_features(s: Script, fmap: str, D: int, E: Optional[int], F: int) -> None:
    s("# phi(q_t), phi(k_t)")
    if fmap in INLINE_MAPS:
        with s.block(f"for f in T.vectorized({F}):"):
            s(f"fq[f] = {phi_expr(fmap, 'q[b, h, f]')}", f"fk[f] = {phi_expr(fmap, 'k[b, hk, f]')}")
        return
    for dst, x, w in (("fq", "q[b, h, d]", "wq"), ("fk", "k[b, hk, d]", "wk")):
        with s.block(f"for e in T.vectorized({E}):"):
            s(f"{dst}[e] = T.float32(0)")
        with s.block(f"for d in range({D}):"):
            with s.block(f"for e in T.vectorized({E}):"):
                s(f"{dst}[e] = {dst}[e] + {x} * {w}[h, d, e]")
        if fmap == "hedgehog":
            s(f"sc[0] = {dst}[0]", f"sc[1] = {dst}[0]")
            with s.block(f"for e in range(1, {E}):"):
                s(f"sc[0] = T.max(sc[0], {dst}[e])", f"sc[1] = T.min(sc[1], {dst}[e])")
            with s.block(f"for e in T.vectorized({E}):"):
                s(f"{dst}[{E} + e] = {exp2(f'(sc[1] - {dst}[e]) * {L2E}')}",
                  f"{dst}[e] = {exp2(f'({dst}[e] - sc[0]) * {L2E}')}")
            s("sc[0] = T.float32(0)", "sc[1] = T.float32(0)")
            with s.block(f"for e in range({E}):"):
                s(f"sc[0] = sc[0] + {dst}[e]", f"sc[1] = sc[1] + {dst}[{E} + e]")
            with s.block(f"for e in T.vectorized({E}):"):
                s(f"{dst}[e] = {dst}[e] / sc[0]", f"{dst}[{E} + e] = {dst}[{E} + e] / sc[1]")
        else:
            with s.block(f"for e in T.vectorized({E}):"):
                s(f"{dst}[{E} + e] = {exp2(f'-{dst}[e] * {L2E}')}", f"{dst}[e] = {exp2(f'{dst}[e] * {L2E}')}")


def _emit_window(s: Script, spec: AttentionSpec, D: int, Dv: int) -> None:
    """Softmax over the visible cache slots: sc[0] = max (base 2), sc[1] = sum, acc = sum p v."""
    vis = visibility(spec, "t", "pos[c]")
    s("# window softmax over the visible cache slots (base 2); logits kept in lg")
    s('lg = T.alloc_buffer((NC,), "float32")')
    with s.block("for c in range(NC):"):
        s("sc[2] = T.float32(0)")
        with s.block(f"for d in range({D}):"):
            s("sc[2] = sc[2] + q[b, h, d] * kc[b, hk, c, d]")
        s(f"lg[c] = T.if_then_else({vis}, sc[2] * scale * {L2E}, {NEG_INF})")
    shared = spec.combine == "shared"
    s(f"sc[0] = {NEG_INF}")
    with s.block("for c in range(NC):"):
        s("sc[0] = T.max(sc[0], lg[c])")
    if spec.sinks:
        for c in range(spec.sinks):
            s(f"sc[0] = T.max(sc[0], sink_logits[h, {c}])   # already times log2(e)")
    s(f"sc[0] = T.if_then_else(sc[0] == {NEG_INF}, T.float32(0), sc[0])")
    s("sc[1] = T.float32(0)")
    for c in range(spec.sinks):
        s(f"sc[1] = sc[1] + {exp2(f'sink_logits[h, {c}] - sc[0]')}")
    with s.block(f"for d in T.vectorized({Dv}):"):
        s("acc[d] = T.float32(0)")
    with s.block("for c in range(NC):"):
        s(f"sc[3] = {exp2('lg[c] - sc[0]')}")
        s("sc[1] = sc[1] + sc[3]")
        with s.block(f"for d in T.vectorized({Dv}):"):
            s("acc[d] = acc[d] + sc[3] * vc[b, hk, c, d]")
    if shared:
        s('vis_w = T.alloc_buffer((NC,), "int32")')
        with s.block("for c in range(NC):"):
            s(f"vis_w[c] = T.if_then_else({vis}, 1, 0)")


def _emit_shared(s: Script, F: int, Fg: int, Dv: int) -> None:
    s("# shared normaliser: gamma * window terms + linear terms of cached keys outside the window + the state")
    s(f'num = T.alloc_buffer(({Dv},), "float32")')
    with s.block(f"for d in T.vectorized({Dv}):"):
        s("num[d] = window_gamma[h] * acc[d]")
    s("sc[1] = window_gamma[h] * sc[1]")
    ldf = (lambda f: "ld[b, h, c, f]") if Fg > 1 else (lambda f: "ld[b, h, c, 0]")
    with s.block("for c in range(NC):"):
        with s.block("if pos[c] >= 0 and pos[c] <= t and vis_w[c] == 0:"):
            s("sc[3] = T.float32(0)")
            with s.block(f"for f in range({F}):"):
                arg = ldf("f") + f" * {L2E}"
                s(f"sc[3] = sc[3] + fq[f] * fkc[b, h, c, f] * {exp2(arg)}")
            s("sc[1] = sc[1] + sc[3]")
            with s.block(f"for d in T.vectorized({Dv}):"):
                s("num[d] = num[d] + sc[3] * vc[b, hk, c, d]")
    with s.block(f"for f in range({F}):"):
        s("sc[1] = sc[1] + fq[f] * z[b, h, f]")
        with s.block(f"for d in T.vectorized({Dv}):"):
            s("num[d] = num[d] + fq[f] * S[b, h, f, d]")
    with s.block(f"for d in T.vectorized({Dv}):"):
        s("o[b, h, d] = T.if_then_else(sc[1] == T.float32(0), T.float32(0), num[d] / sc[1])")
    s("# the key leaving the reach joins the state, with its decay")
    ldv = (lambda f: "ld[b, h, evict, f]") if Fg > 1 else (lambda f: "ld[b, h, evict, 0]")
    with s.block("if evict >= 0:"):
        with s.block(f"for f in range({F}):"):
            arg = ldv("f") + f" * {L2E}"
            s(f"a_f = fkc[b, h, evict, f] * {exp2(arg)}")
            with s.block(f"for d in T.vectorized({Dv}):"):
                s("S[b, h, f, d] = S[b, h, f, d] + a_f * vc[b, hk, evict, d]")
            s("z[b, h, f] = z[b, h, f] + a_f")


def _emit_linear(s: Script, lin, F: int, Dv: int, summed: bool) -> None:
    s("# linear branch: S += phi(k)^T v, z += phi(k); read out with phi(q)")
    s(f'num = T.alloc_buffer(({Dv},), "float32")')
    with s.block(f"for d in T.vectorized({Dv}):"):
        s("num[d] = T.float32(0)")
    s("sc[2] = T.float32(0)")
    with s.block(f"for f in range({F}):"):
        with s.block(f"for d in T.vectorized({Dv}):"):
            s("S[b, h, f, d] = S[b, h, f, d] + fk[f] * v[b, hk, d]")
            s("num[d] = num[d] + fq[f] * S[b, h, f, d]")
        s("z[b, h, f] = z[b, h, f] + fk[f]")
        s("sc[2] = sc[2] + fq[f] * z[b, h, f]")
    if lin.normalize:
        s("sc[3] = T.if_then_else(sc[2] == T.float32(0), T.float32(0), T.float32(1) / sc[2])")
    else:
        s("sc[3] = linear_scale")
    with s.block(f"for d in T.vectorized({Dv}):"):
        if summed:
            s("o[b, h, d] = num[d] * sc[3] + alpha[h] * T.if_then_else(sc[1] == T.float32(0), T.float32(0), "
              "acc[d] / sc[1])")
        else:
            s("o[b, h, d] = num[d] * sc[3]")


class TVMDecoder:
    """``step(q_t, k_t, v_t, g_t)`` -> ``o_t [B, H, 1, Dv]``, the interface of ``ReferenceDecoder``.

    Weights (``feature_weight_q/k``, ``sink_logits``, ``window_gamma``, ``alpha``) are given once;
    ``initial_state`` (S0 or (S0, z0)) seeds the linear state. Computes in float32.
    """

    def __init__(self, spec, *, scale: Optional[float] = None, linear_scale: Optional[float] = None,
                 initial_state=None, **weights):
        spec = AttentionSpec.coerce(spec)
        if not spec.causal:
            raise ValueError("decoding needs a causal spec (causal=true): a non-causal query sees future keys")
        unknown = set(weights) - {"feature_weight_q", "feature_weight_k", "sink_logits", "window_gamma", "alpha"}
        if unknown:
            raise TypeError(f"unexpected weight(s) {sorted(unknown)} for TVMDecoder")
        self.spec, self.scale, self.linear_scale = spec, scale, linear_scale
        self.weights = {k: _f32(w) for k, w in weights.items() if w is not None}
        self._given = {k: w for k, w in weights.items() if w is not None}   # as given: what prefill's kernel takes
        if "sink_logits" in self.weights:   # the kernel takes them in base 2 (see codegen.base2)
            self.weights["sink_logits"] = _f32(base2(weights["sink_logits"]))
        self.reach = None if spec.window is None else spec.window.reach(True)
        self._initial_state = initial_state
        self.t = 0
        self._ready = False
        self.source = ""

    @property
    def cache_len(self) -> int:
        """Cached keys (prefix slots + keys still within reach)."""
        return 0 if not self._ready or not self.spec.has_softmax else int((self._pos >= 0).sum())

    def _setup(self, q, k, v):
        spec, lin = self.spec, self.spec.linear
        B, H, _, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[-1]
        if H % Hkv:
            raise ValueError(f"key/value heads ({Hkv}) must divide query heads ({H})")
        E = None
        F = None
        if lin is not None:
            if lin.has_weights:
                w = self.weights.get("feature_weight_q")
                if w is None or self.weights.get("feature_weight_k") is None:
                    raise ValueError("feature_weight_q and feature_weight_k are required by this spec's hedgehog map")
                E = w.shape[-1]
                F = 2 * E
            else:
                F = D
        needed = {"sink_logits": spec.sinks > 0, "window_gamma": spec.combine == "shared",
                  "alpha": spec.combine == "sum"}
        for name, need in needed.items():
            if need and name not in self.weights:
                raise ValueError(f"{name} is required by this spec ({spec.summary()}) and was not given")
        self.B, self.H, self.Hkv, self.D, self.Dv, self.F = B, H, Hkv, D, Dv, F
        self._ring = None if self.reach is None else self.reach + 1
        nc = spec.prefix + (self._ring if self._ring is not None else 64)
        self.parallel = step_work(spec, B, H, D, Dv, F, E, nc) >= SERIAL_WORK
        src = decode_source(spec, H, Hkv, D, Dv, F, E, parallel=self.parallel)
        self._built = _build.build([src], f"decode-{spec.summary()}")
        self.source = self._built.source
        self._fn = self._built.fn("decode_step")
        if spec.has_softmax:
            self._alloc_cache(nc)
        if lin is not None:
            st = self._initial_state
            if st is None:
                self._S, self._z = torch.zeros(B, H, F, Dv), torch.zeros(B, H, F)
            else:
                S0, z0 = unpack_initial_state(st, B, H, F, Dv)
                self._S, self._z = _f32(S0).clone(), _f32(z0).clone()
        self._ready = True

    def _alloc_cache(self, nc: int) -> None:
        spec = self.spec
        old = getattr(self, "_kc", None)
        kc, vc = torch.zeros(self.B, self.Hkv, nc, self.D), torch.zeros(self.B, self.Hkv, nc, self.Dv)
        pos = torch.full((nc,), -1, dtype=torch.int32)
        fkc = ld = None
        if spec.combine == "shared":
            Fg = self.F if spec.linear.gate == "vector" else 1
            fkc, ld = torch.zeros(self.B, self.H, nc, self.F), torch.zeros(self.B, self.H, nc, Fg)
        if old is not None:   # a dense causal cache grew: keep what it holds
            n = old.shape[2]
            kc[:, :, :n], vc[:, :, :n], pos[:n] = self._kc, self._vc, self._pos
            if fkc is not None:
                fkc[:, :, :n], ld[:, :, :n] = self._fkc, self._ld
        self._kc, self._vc, self._pos, self._fkc, self._ld = kc, vc, pos, fkc, ld

    def _slot(self, p: int) -> int:
        n = self.spec.prefix
        if p < n or self._ring is None:
            return p
        return n + (p - n) % self._ring

    def prefill(self, q, k, v, g=None) -> torch.Tensor:
        """Feed n tokens at once: q ``[B, H, n, D]``, k / v ``[B, Hkv, n, D]``, g ``[B, H, n(, F)]`` -> o ``[B, H, n, Dv]``.

        Where ``can_prefill`` allows (a fresh decoder, or any decoder of a window-free spec; not "shared"),
        the spec's TVM forward kernel runs the whole chunk (``return_state=True`` gives ``(S, z)``, seeded
        with the state so far) and the window's cache slots take the chunk's prefix tokens and last
        ``reach`` keys / values; the steps that follow then compute what token-by-token feeding would.
        Otherwise the tokens go through :meth:`step` one by one."""
        spec, lin = self.spec, self.spec.linear
        n = q.shape[2]
        if not can_prefill(spec, not self._ready, n):
            return torch.cat([self.step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1],
                                        None if g is None else g[:, :, i:i + 1]) for i in range(n)], 2)
        from lincomp.lower.tvmir.kernel import compile_tvm   # the same kernel lincomp.compile(spec, "tvm") gives
        check_step(spec, q[:, :, :1], k[:, :, :1], v[:, :, :1], None if g is None else g[:, :, :1])
        init = (self._S, self._z) if self._ready and lin is not None else self._initial_state
        q, k, v, g = (None if x is None else x.contiguous() for x in (q, k, v, g))   # the kernel's layout
        kernel = self.__dict__.get("_prefill_kernel")
        if kernel is None:   # one per decoder: its compiled modules and plans are reused by later prompts
            kernel = self._prefill_kernel = compile_tvm(spec)
        res = kernel(q, k, v, scale=self.scale, linear_scale=self.linear_scale, layout="bhld",
                     return_state=lin is not None,
                     **prefill_tensors(self._given, g, init if lin is not None else None))
        o, state = res if lin is not None else (res, None)
        if not self._ready:
            self._setup(q, k, v)
        if state is not None:
            self._S.copy_(state[0])
            self._z.copy_(state[1])
        t0 = self.t
        kept = window_positions(spec, self.reach, t0, n)
        if kept:
            if self._ring is None and kept[-1] >= self._kc.shape[2]:   # a dense causal cache: room for all
                self._alloc_cache(max(2 * self._kc.shape[2], kept[-1] + 1))
            slots = [self._slot(p) for p in kept]
            rel = [p - t0 for p in kept]
            self._kc[:, :, slots] = k[:, :, rel].float()
            self._vc[:, :, slots] = v[:, :, rel].float()
            self._pos[slots] = torch.tensor(kept, dtype=torch.int32)
        self.t = t0 + n
        return o.to(q.dtype)

    def step(self, q, k, v, g=None) -> torch.Tensor:
        """One token: ``q [B, H, 1, D]``, ``k``, ``v [B, Hkv, 1, D]``, ``g [B, H, 1]`` or ``[B, H, 1, F]``."""
        spec, lin = self.spec, self.spec.linear
        check_step(spec, q, k, v, g)
        out_dtype = q.dtype
        if not self._ready:
            self._setup(q, k, v)
        t = self.t
        args = [_f32(q[:, :, 0]), _f32(k[:, :, 0]), _f32(v[:, :, 0])]
        if lin is not None and lin.gate is not None:
            args.append(_f32(g[:, :, 0]))
        if lin is not None and lin.has_weights:
            args += [self.weights["feature_weight_q"], self.weights["feature_weight_k"]]
        for name in ("sink_logits", "window_gamma", "alpha"):
            if name in self.weights:
                args.append(self.weights[name])
        slot = evict = -1
        if spec.has_softmax:
            slot = self._slot(t)
            if slot >= self._kc.shape[2]:
                self._alloc_cache(2 * self._kc.shape[2])
            self._pos[slot] = t
            leaving = t - self.reach if self.reach is not None else -1
            if leaving >= spec.prefix:
                evict = self._slot(leaving)
            args += [self._kc, self._vc, self._pos]
            if spec.combine == "shared":
                args += [self._fkc, self._ld]
        if lin is not None:
            args += [self._S, self._z]
        o = alloc_output((self.B, self.H, self.Dv))   # NaN under the poison switch
        D = q.shape[-1]
        scale = D ** -0.5 if self.scale is None else float(self.scale)
        ls = self.linear_scale
        if ls is None:
            ls = D ** -0.5 if (lin is not None and lin.feature_map == "identity") else 1.0
        self._fn(*args, o, t, slot, evict if spec.combine == "shared" else -1, scale, float(ls))
        if evict >= 0:
            self._pos[evict] = -1
        self.t += 1
        return o[:, :, None].to(out_dtype)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """float32, contiguous, 64-byte aligned (what the compiled kernel accepts)."""
    if t.dtype == torch.float32 and t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    out = torch.empty(t.shape, dtype=torch.float32)
    out.copy_(t)
    return out
