"""Training the linear branch on the TVM kernels: the saving forward and the backward's host side.

``forward_and_save`` runs linear.py's kernel with ``save_states`` (the state entering each chunk; the
normalised branch in "numden" mode, so its denominators are saved too); ``backward_saved`` turns the
output gradient into the scan's (d num, and d den as one more column), runs linear_bwd.py's kernel (which
also forms the gate's gradient) and finishes on the host what is elementwise or tiny:

- feature maps: the kernels work on phi(q), phi(k); their backward (and d feature_weight_q / _k for
  hedgehog maps) is ``torch.func.vjp`` of ``lincomp.reference.features`` (a projection and a softmax);
- GQA: per-query-head gradients of k, v summed over each group.

Non-causal specs (no gate, no state) need no scan: their gradients are four dense products, done by torch.
"""

from __future__ import annotations

from typing import Optional

import torch

from lincomp.lower.tvmir.features import TASK_ROWS
from lincomp.reference.features import feature_map
from lincomp.runtime.kernel import wants

# Saved states are laid out for the smallest backward chunk, so their shape never depends on the chosen
# config (fake tensors only know L): a larger chunk uses the first ceil(L / chunk) entries.
MIN_CHUNK = 16


def n_saved_chunks(L) -> int:
    return (L + MIN_CHUNK - 1) // MIN_CHUNK


def chunk_states(Sc: torch.Tensor, L: int, chunk: int) -> torch.Tensor:
    """The saved states of a walk with ``chunk``: the buffer's first B * H * ceil(L / chunk) entries laid out as a
    contiguous [B, H, ceil(L / chunk), F, Dv (+1)] (the saving forward writes this view, the backward reads it; a
    slice of the [B, H, ceil(L / 16), ...] layout would be strided and cost the backward a copy)."""
    B, H, _, F, Dsv = Sc.shape
    nc = (L + chunk - 1) // chunk
    return Sc.view(-1)[:B * H * nc * F * Dsv].view(B, H, nc, F, Dsv)


def saved_shapes(spec, B, H, L, F, Dv) -> list:
    """Shapes of the saved list: Sc [B, H, ceil(L / 16), F, Dv (+1)], den [B, H, L] (normalised, else [0]);
    combine="shared" (shared_train.py): the shared den and then lse2 [B, H, L]; hedgehog maps: then phi(q), phi(k)
    [B, H, L, F] as the forward formed them (the backward would otherwise form them again)."""
    shared = spec.combine == "shared"
    aug = int(spec.linear.normalize or shared)
    lse = [(B, H, L)] if shared else []
    feats = [(B, H, L, F)] * 2 if spec.linear.has_weights else []
    if not spec.causal:
        return [(0,), (B, H, L) if aug else (0,), *lse, *feats]
    return [(B, H, n_saved_chunks(L), F, Dv + aug), (B, H, L) if aug else (0,), *lse, *feats]


def saved_features(spec, saved: list) -> Optional[tuple]:
    """(phi(q), phi(k)) of the saved list (hedgehog maps: its last two entries), else None."""
    return (saved[-2], saved[-1]) if spec.linear.has_weights else None


def scan_grad(spec, grad_o: torch.Tensor, o: torch.Tensor, den: Optional[torch.Tensor], linear_scale: float,
              aug: bool) -> torch.Tensor:
    """d num [B, H, L, Dv] (and d den as column Dv with the normaliser) from d o (o = num / den, 0 at den 0)."""
    grad_o = grad_o.float()
    if not aug:
        return (grad_o * linear_scale).contiguous()
    rden = torch.where(den == 0, torch.zeros_like(den), 1.0 / torch.where(den == 0, torch.ones_like(den), den))
    B, H, L, Dv = grad_o.shape
    out = torch.empty(B, H, L, Dv + 1, dtype=torch.float32)
    torch.mul(grad_o, rden[..., None], out=out[..., :Dv])
    out[..., Dv] = -(out[..., :Dv] * o.float()).sum(-1)
    return out


class Features:
    """phi(q), phi(k) of a call and the vjp of the maps. phi(k) has H heads with per-head weights, else the key
    heads. Hedgehog maps run on the generated kernels of ``module`` (features.py: phi, and its vjp giving
    d x and d W); elementwise maps (or no module) on ``torch.func.vjp`` of the reference maps (it differentiates
    inside a custom op's backward too, where plain autograd records nothing)."""

    NAMES = ("q", "k", "feature_weight_q", "feature_weight_k")

    def __init__(self, call, needs=None, module=None, phi=None):
        """``needs``: the names whose gradient is wanted (None: all); the others are constants of the vjp.
        ``module``: the compiled features_q / _k and features_bwd_q / _k (TVMKernel._feature_module); ``phi``:
        (phi(q), phi(k)) as the saving forward formed them (with ``module``), else formed here."""
        lin, H = call.spec.linear, call.H
        given = {n: getattr(call, n) for n in self.NAMES if getattr(call, n) is not None}
        self.names = [n for n in given if wants(needs, n)]
        self._module, self._call = module, call
        if module is not None and phi is not None:
            self.fq, self.fk = phi
            return
        if module is not None:
            B, L = call.B, call.L
            self.fq = torch.empty(B, H, L, call.F, dtype=torch.float32)
            self.fk = torch.empty(B, H, L, call.F, dtype=torch.float32)
            module.fn("features_q")(call.q, call.feature_weight_q, self.fq)
            module.fn("features_k")(call.k, call.feature_weight_k, self.fk)
            return

        def phis(*wanted):
            x = dict(given, **dict(zip(self.names, wanted)))
            q, k = x["q"], x["k"]
            if lin.has_weights and k.shape[1] != H:
                k = k.repeat_interleave(H // k.shape[1], dim=1)
            return (feature_map(lin.feature_map, q, x.get("feature_weight_q")).float(),
                    feature_map(lin.feature_map, k, x.get("feature_weight_k")).float())

        if self.names:
            (fq, fk), self._vjp = torch.func.vjp(phis, *[given[n] for n in self.names])
        else:   # no gradient through the maps is wanted (only v, the gate or the gain)
            (fq, fk), self._vjp = phis(), (lambda cotangents: ())
        self.fq, self.fk = fq.contiguous(), fk.contiguous()

    def backward(self, dfq: torch.Tensor, dfk: torch.Tensor) -> dict:
        """{name: gradient} of q, k and the feature weights from d phi(q), d phi(k) (phi(k)'s own heads)."""
        if self._module is None:
            return dict(zip(self.names, self._vjp((dfq, dfk))))
        call, out = self._call, {}
        B, H, L, D = call.B, call.H, call.L, call.D
        for side, dphi in (("q", dfq), ("k", dfk)):
            x, w = getattr(call, side), getattr(call, f"feature_weight_{side}")
            wanted = [n for n in (side, f"feature_weight_{side}") if n in self.names]
            if not wanted:
                continue
            dx = torch.empty(B, H, L, D, dtype=torch.float32)
            dwp = torch.empty(B, H, (L + TASK_ROWS - 1) // TASK_ROWS, D, w.shape[-1], dtype=torch.float32)
            self._module.fn(f"features_bwd_{side}")(x, w, w.transpose(-1, -2).contiguous(), dphi.contiguous(), dx, dwp)
            out[side] = group_sum(dx, x.shape[1])          # a key head shared by a group of query heads
            out[f"feature_weight_{side}"] = dwp.sum((0, 2))
        return {n: out[n] for n in self.names}


def group_sum(x: torch.Tensor, Hkv: int) -> torch.Tensor:
    """[B, H, ...] per query head -> [B, Hkv, ...] (each group of H / Hkv query heads summed)."""
    B, H = x.shape[:2]
    return x if H == Hkv else x.view(B, Hkv, H // Hkv, *x.shape[2:]).sum(2)


def noncausal_grads(spec, feats: Features, v, do: torch.Tensor, Hkv: int, want_dv: bool = True) -> tuple:
    """(dfq, dfk per query head, dv per query head or None without ``want_dv``) of o = phi(q) S (/ phi(q) . z),
    S = phi(k)^T v."""
    fq, fk = feats.fq, feats.fk
    H = fq.shape[1]
    fkh = fk if fk.shape[1] == H else fk.repeat_interleave(H // fk.shape[1], dim=1)
    vh = v if v.shape[1] == H else v.repeat_interleave(H // v.shape[1], dim=1)
    vh = vh.float()
    if do.shape[-1] > vh.shape[-1]:   # the normaliser's column of ones
        vh = torch.cat([vh, torch.ones_like(vh[..., :1])], -1)
    S = fkh.transpose(-1, -2) @ vh                  # [B, H, F, Dsv]
    dS = fq.transpose(-1, -2) @ do                  # [B, H, F, Dsv]
    dfq = do @ S.transpose(-1, -2)
    dfk = vh @ dS.transpose(-1, -2)
    dv = (fkh @ dS)[..., :v.shape[-1]] if want_dv else None   # attention transfer freezes v: a fifth product saved
    return dfq, dfk, dv


STATE_NAMES = ("S0", "z0")


class _Train(torch.autograd.Function):
    """A direct kernel call under autograd: the saving forward, then the backward kernels."""

    @staticmethod
    def forward(ctx, kernel, scale, linear_scale, names, q, k, v, *tensors):
        kw = _keywords(names, tensors)
        with torch.no_grad():
            o, saved = kernel.forward_and_save(q, k, v, scale=scale, linear_scale=linear_scale, **kw)
        ctx.kernel, ctx.scale, ctx.linear_scale, ctx.names, ctx.n_saved = kernel, scale, linear_scale, names, len(saved)
        ctx.save_for_backward(q, k, v, *tensors, o, *saved)
        return o

    @staticmethod
    def backward(ctx, grad_o):
        q, k, v, *rest = ctx.saved_tensors
        n = len(ctx.names)
        tensors, o, saved = rest[:n], rest[n], list(rest[n + 1:])
        kw = _keywords(ctx.names, tensors)
        wanted = {"initial_state" if n in STATE_NAMES else n
                  for n, w in zip(("q", "k", "v", *ctx.names), ctx.needs_input_grad[4:]) if w}
        with torch.no_grad():
            grads = ctx.kernel.backward_saved(grad_o, o, saved, q, k, v, scale=ctx.scale,
                                              linear_scale=ctx.linear_scale, needs=frozenset(wanted), **kw)
        state = grads.get("initial_state") or (None, None)
        by_name = dict(grads, S0=state[0], z0=state[1])
        out = [by_name.get(x) for x in ("q", "k", "v", *ctx.names)]
        inputs = (q, k, v, *tensors)
        return (None, None, None, None, *[None if d is None else d.to(t.dtype) for d, t in zip(out, inputs)])


def _keywords(names, tensors) -> dict:
    kw = {n: t for n, t in zip(names, tensors) if n not in STATE_NAMES}
    if "S0" in names:
        kw["initial_state"] = tuple(t for n, t in zip(names, tensors) if n in STATE_NAMES)
    return kw


def differentiable_call(kernel, q, k, v, scale, linear_scale, tensors: dict) -> torch.Tensor:
    """``kernel(q, k, v, **tensors)`` with autograd through the TVM backward kernels (o [B, H, L, Dv])."""
    from lincomp.documents import state_pair
    from lincomp.runtime.kernel import Unsupported
    names, values = [], []
    for name, t in tensors.items():
        if name == "initial_state":
            S0, z0 = state_pair(t)
            z0 = S0.new_zeros(S0.shape[:-1]) if z0 is None else z0
            names += list(STATE_NAMES)
            values += [S0, z0]
        elif isinstance(t, torch.Tensor):
            names.append(name)
            values.append(t)
        elif t is not None:
            raise Unsupported(f"{name} under autograd")
    return _Train.apply(kernel, scale, linear_scale, tuple(names), q, k, v, *values)
