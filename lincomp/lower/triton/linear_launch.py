"""The linear / hybrid family's launch layer: configs, launchers and the measured config search.

``run_forward`` / ``run_backward`` launch the generated kernels (``lincomp.lower.triton.linear``) for
given tensors and finish the chain rule on the host; ``default_config`` is the config without tuning;
``tune_linear`` times the spaces below and stores the winners in the tuning database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lincomp.lower.triton.common import alloc, next_pow2
from lincomp.lower.triton.linear import LinearPlan, load_module
from lincomp.tuning import tune

MAX_HEAD_DIM = 256  # one program keeps a [F, BV] state and [BT, D] tiles in registers

# Autotuning spaces (GPU). The chunk is BT tokens; vector gates walk the chunk column by column, so
# they keep it short. BV splits the value dimension over programs (more parallelism, less state per
# program, at the price of recomputing the scores per value block).
FWD_SPACE = [{"BT": 64, "BV": bv, "num_warps": w, "num_stages": 2} for bv in (64, 128) for w in (4, 8)]
FWD_SPACE_VECTOR = [{"BT": bt, "BV": bv, "num_warps": 4, "num_stages": 2} for bt in (16, 32) for bv in (64, 128)]
BWD_SPACE = [{"BT": bt, "BV": 64, "num_warps": w, "num_stages": 2} for bt in (32, 64) for w in (4, 8)]
BWD_SPACE_VECTOR = [{"BT": bt, "BV": 64, "num_warps": w, "num_stages": 2} for bt in (16, 32) for w in (4, 8)]

# ----------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Dims:
    B: int
    H: int
    HKV: int
    L: int
    D: int
    DV: int
    F: int
    E: int

    @classmethod
    def of(cls, plan: LinearPlan, q, k, v, wq=None) -> "Dims":
        B, H, L, D = q.shape
        E = wq.shape[-1] if plan.hedgehog else 1
        return cls(B, H, k.shape[1], L, D, v.shape[-1], 2 * E if plan.hedgehog else D, E)

    def bucket(self) -> dict:
        return {"H": self.H, "L": self.L, "D": self.D, "Dv": self.DV, "F": self.F}


def default_config(plan: LinearPlan, dims: Dims, device_type: str, chunk_size: Optional[int] = None) -> dict:
    """The fixed config used without tuning: the spec's chunk size (a power of two in [16, 128]; vector
    gates at most 32), one value block under the interpreter, 64-wide value blocks on a GPU."""
    bt = min(128, max(16, next_pow2(chunk_size or plan.chunk_size)))
    if plan.gate == 2:
        bt = min(bt, 32)
    full_v = max(16, next_pow2(dims.DV))
    if device_type == "cpu":
        return {"BT": bt, "BV": full_v, "num_warps": 4, "num_stages": 1}
    return {"BT": bt, "BV": min(64, full_v), "num_warps": 4, "num_stages": 2}


def _blocks(plan: LinearPlan, dims: Dims, config: dict) -> dict:
    """Tile sizes: powers of two >= 16 (tl.dot's minimum), padded lanes masked."""
    BD = max(16, next_pow2(dims.D))
    BE = max(16, next_pow2(dims.E)) if plan.hedgehog else 16
    return {"BT": max(16, next_pow2(int(config["BT"]))), "BD": BD, "BE": BE, "BF": 2 * BE if plan.hedgehog else BD,
            "BV": max(16, min(next_pow2(int(config["BV"])), next_pow2(dims.DV)))}


def _launch_opts(config: dict) -> dict:
    return {"num_warps": int(config.get("num_warps", 4)), "num_stages": int(config.get("num_stages", 2))}


def _unit_stride(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Kernels index the last dim with stride 1 (other strides are passed): copy only when needed."""
    if t is None:
        return None
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple:
    return t.stride(0), t.stride(1), t.stride(2)


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def _empty(device) -> torch.Tensor:
    return torch.empty(0, device=device)


_DUMMIES: dict = {}


def _dummy(device) -> torch.Tensor:
    """A valid pointer for arguments a variant never reads (one per device, never written)."""
    key = str(device)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(2, dtype=torch.float32, device=device)
    return _DUMMIES[key]


def _c(t: Optional[torch.Tensor], device):
    return _dummy(device) if t is None or t.numel() == 0 else t.contiguous()


# ------------------------------------------------------------------------------------- launchers
def run_reduce(mod, plan: LinearPlan, dims: Dims, config: dict, x, w, y, r=None, c=None):
    """Non-causal whole-sequence sums M [B, H, F, Dv], MZ [B, H, F] (fp32)."""
    blk = _blocks(plan, dims, config)
    dev = x.device
    M = alloc((dims.B, dims.H, dims.F, dims.DV), torch.float32, dev)
    MZ = alloc((dims.B, dims.H, dims.F), torch.float32, dev)
    grid = (triton_cdiv(dims.DV, blk["BV"]), dims.B * dims.H)
    mod.linear_reduce[grid](
        x, y, _c(w, dev), _c(r, dev), _c(c, dev), M, MZ,
        dims.L, dims.H, x.shape[1], y.shape[1], dims.D, dims.DV, dims.F, dims.E,
        *_strides(x), *_strides(y),
        DT=_tl_dtype(x.dtype), BT=blk["BT"], BD=blk["BD"], BV=blk["BV"], BE=blk["BE"], BF=blk["BF"],
        HAS_RC=r is not None, **_launch_opts(config))
    return M, MZ


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def run_forward(plan: LinearPlan, config: dict, q, k, v, g, wq, wk, sinks, coef, S0, z0, scale: float,
                lin_scale: float, want_state: bool, want_aux: bool) -> list:
    """Launch the forward. Returns [o, S_L, z_L, den, shift, o_window, argmax] (empty where absent).

    Non-causal with ``want_aux``: S_L, z_L hold the whole-sequence state (the backward reads it).
    """
    mod = load_module(plan)
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    dims = Dims.of(plan, q, k, v, wq)
    blk = _blocks(plan, dims, config)
    dev = q.device
    B, H, L, DV, F = dims.B, dims.H, dims.L, dims.DV, dims.F
    o = alloc((B, H, L, DV), q.dtype, dev)
    if plan.causal:
        state_in = (S0, z0) if S0 is not None else (None, None)
    else:  # the whole-sequence state
        state_in = run_reduce(mod, plan, dims, config, k, wk, v)
    has_s0 = state_in[0] is not None
    S_out = alloc((B, H, F, DV), torch.float32, dev) if (want_state and plan.causal) else None
    z_out = alloc((B, H, F), torch.float32, dev) if (want_state and plan.causal) else None
    den = shift = ow = argm = None
    if want_aux:
        if plan.normalize or plan.combine == 2:
            den = alloc((B, H, L), torch.float32, dev)
        if plan.combine:
            shift = alloc((B, H, L), torch.float32, dev)
        if plan.combine == 1:
            ow = alloc((B, H, L, DV), torch.float32, dev)
        if plan.combine == 2:  # where the window max m_i is attained (its gradient goes there)
            argm = torch.full((B, H, L), -1, dtype=torch.int32, device=dev)
    z0_t = state_in[1] if state_in[1] is not None else (torch.zeros(B, H, F, device=dev) if has_s0 else None)
    grid = (triton_cdiv(DV, blk["BV"]), B * H)
    mod.linear_fwd[grid](
        q, k, v, _c(g, dev), _c(wq, dev), _c(wk, dev), _c(sinks, dev), _c(coef, dev),
        _c(state_in[0], dev), _c(z0_t, dev), _c(S_out, dev), _c(z_out, dev), o,
        _c(den, dev), _c(shift, dev), _c(ow, dev), _c(argm, dev),
        float(scale), float(lin_scale), L, H, dims.HKV, dims.D, DV, F, dims.E,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        DT=_tl_dtype(q.dtype), BS=max(2, next_pow2(plan.sinks)), HAS_S0=has_s0,
        STORE_STATE=S_out is not None, STORE_AUX=want_aux, **blk, **_launch_opts(config))
    if not plan.causal and want_aux:
        S_out, z_out = state_in
    return [o] + [t if t is not None else _empty(dev) for t in (S_out, z_out, den, shift, ow, argm)]


def _phi_grad(name: str, x: torch.Tensor, w: Optional[torch.Tensor], dphi: torch.Tensor):
    """phi(x) and the chain rule through it, in fp32: (phi [B,H,L,F], dx [B,H,L,D], dW [H,D,E] | None)."""
    x = x.float()
    if name == "identity":
        return x, dphi, None
    if name == "elu1":
        return torch.nn.functional.elu(x) + 1, dphi * torch.where(x > 0, 1.0, torch.exp(x.clamp(max=0))), None
    if name == "relu":
        return torch.relu(x), dphi * (x > 0), None
    wf = w.float()
    E = wf.shape[-1]
    proj = torch.einsum("bhld,hde->bhle", x, wf)
    da, dc = dphi[..., :E], dphi[..., E:]
    if name == "hedgehog":
        a, c = torch.softmax(proj, -1), torch.softmax(-proj, -1)
        dproj = a * (da - (da * a).sum(-1, keepdim=True)) - c * (dc - (dc * c).sum(-1, keepdim=True))
    else:
        a, c = torch.exp(proj), torch.exp(-proj)
        dproj = da * a - dc * c
    dx = torch.einsum("bhle,hde->bhld", dproj, wf)
    dw = torch.einsum("bhld,bhle->hde", x, dproj)
    return torch.cat([a, c], -1), dx, dw


def run_backward(plan: LinearPlan, config: dict, do, dSL, dzL, q, k, v, g, wq, wk, sinks, coef, S0, z0,
                 o, SL, zL, den, shift, ow, argm, scale: float, lin_scale: float) -> list:
    """Launch the backward. Returns [dq, dk, dv, dg, dwq, dwk, dsinks, dcoef, dS0, dz0] (None where absent)."""
    mod = load_module(plan)
    q, k, v, do = _unit_stride(q), _unit_stride(k), _unit_stride(v), _unit_stride(do)
    dims = Dims.of(plan, q, k, v, wq)
    blk = _blocks(plan, dims, config)
    dev = q.device
    B, H, HKV, L, D, DV, F = dims.B, dims.H, dims.HKV, dims.L, dims.D, dims.DV, dims.F
    NV = triton_cdiv(DV, blk["BV"])
    f32 = torch.float32
    of, dof = o.float(), do.float()

    # The output gradient as per-row factors (see the dq template): dnum = u * do, dden; window
    # ds = coef * P * (wrow * do . v + erow).
    dcoef = None
    o_lin = of - coef.float()[None, :, None, None] * ow if plan.combine == 1 else of
    if plan.normalize or plan.combine == 2:
        inv = torch.where(den == 0, torch.zeros_like(den), 1.0 / torch.where(den == 0, torch.ones_like(den), den))
        u, dden = inv, -(dof * o_lin).sum(-1) * inv
    else:
        u, dden = torch.full((B, H, L), float(lin_scale), device=dev), torch.zeros(B, H, L, device=dev)
    wrow = erow = None
    if plan.combine == 1:
        wrow, erow = torch.ones(B, H, L, device=dev), -(dof * ow).sum(-1)
        dcoef = (dof * ow).sum((0, 2, 3))
    elif plan.combine == 2:
        wrow, erow = u, dden
        if not plan.causal and plan.prefix:  # prefix rows have no linear term (the forward zeroes it)
            keep = (torch.arange(L, device=dev) >= plan.prefix).to(f32)
            u, dden = u * keep, dden * keep
    u, dden = u.contiguous(), dden.contiguous()

    if plan.causal:
        s_in = (S0, z0 if z0 is not None else (torch.zeros(B, H, F, device=dev) if S0 is not None else None))
        ds_in = (dSL, dzL)
        if (dSL is None) != (dzL is None):
            ds_in = (dSL if dSL is not None else torch.zeros(B, H, F, DV, device=dev),
                     dzL if dzL is not None else torch.zeros(B, H, F, device=dev))
    else:
        s_in = (SL, zL)
        ds_in = run_reduce(mod, plan, dims, config, q, wq, do, u, dden)
    opts = dict(DT=_tl_dtype(q.dtype), **blk, **_launch_opts(config))
    grid = (NV, B * H)

    dqf = alloc((NV, B, H, L, F), f32, dev)
    dqr = alloc((NV, B, H, L, D), f32, dev) if plan.combine else None
    dsink = alloc((B, H, plan.sinks), f32, dev) if plan.sinks else None
    rrow = alloc((NV, B, H, L), f32, dev) if plan.combine else None
    mod.linear_bwd_dq[grid](
        q, k, v, _c(g, dev), _c(wq, dev), _c(wk, dev), _c(sinks, dev), _c(coef, dev),
        _c(s_in[0], dev), _c(s_in[1], dev), do, u, dden, _c(shift, dev), _c(wrow, dev), _c(erow, dev),
        dqf, _c(dqr, dev), _c(dsink, dev), _c(rrow, dev),
        float(scale), L, H, HKV, D, DV, F, dims.E,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        BS=max(2, next_pow2(plan.sinks)), HAS_S0=s_in[0] is not None, **opts)

    dkf = alloc((NV, B, H, L, F), f32, dev)
    dkr = alloc((NV, B, H, L, D), f32, dev) if plan.combine else None
    dvo = alloc((B, H, L, DV), f32, dev)
    want_ds0 = plan.causal and S0 is not None
    dS0 = alloc((B, H, F, DV), f32, dev) if want_ds0 else None
    dz0 = alloc((B, H, F), f32, dev) if want_ds0 else None
    mod.linear_bwd_dkv[grid](
        q, k, v, _c(g, dev), _c(wq, dev), _c(wk, dev), _c(coef, dev), _c(ds_in[0], dev), _c(ds_in[1], dev),
        do, u, dden, _c(shift, dev), _c(wrow, dev), _c(erow, dev),
        dkf, _c(dkr, dev), dvo, _c(dS0, dev), _c(dz0, dev),
        float(scale), L, H, HKV, D, DV, F, dims.E,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        HAS_DSL=ds_in[0] is not None, STORE_DS0=want_ds0, **opts)

    dqf, dkf = dqf.sum(0), dkf.sum(0)
    G = H // HKV
    k_h = k.repeat_interleave(G, 1) if G > 1 else k
    fq, dq, dwq = _phi_grad(plan.feature_map, q, wq, dqf)
    fk, dk, dwk = _phi_grad(plan.feature_map, k_h, wk, dkf)
    if plan.combine:
        dq = dq + dqr.sum(0)
        dk = dk + dkr.sum(0)
        if plan.combine == 2:
            # R_i = sum_j P_ij (dP_ij + e_i): gamma's gradient, and (times -gamma) the gradient of the
            # window max m_i, which flows to the score s_{i, argmax_i} (docs/semantics.md: m_i is not detached).
            R = rrow.sum(0)
            dcoef = R.sum((0, 2))
            cR = (-float(scale) * coef.float()[None, :, None] * R)[..., None]
            idx = argm.long()[..., None]
            dq = dq + cR * torch.gather(k_h.float(), 2, idx.expand(B, H, L, D))
            dk = dk.scatter_add(2, idx.expand(B, H, L, D), cR * q.float())
    dg = None
    if plan.gate:
        # G_t = sum_{l <= t} g_l enters only as phi(q_t) e^{G_t} and phi(k_t) e^{-G_t} (and e^{G_L} in
        # the returned state), so dG_t = phi(q_t) dphi(q_t) - phi(k_t) dphi(k_t), dg_l = sum_{t >= l} dG_t.
        dG = fq * dqf - fk * dkf
        if plan.gate == 1:
            dG = dG.sum(-1)
        dg = dG.flip(2).cumsum(2).flip(2)
        if dSL is not None or dzL is not None:
            term = torch.zeros(B, H, F, device=dev)
            if dSL is not None:
                term = term + (dSL.float() * SL).sum(-1)
            if dzL is not None:
                term = term + dzL.float() * zL
            dg = dg + (term.sum(-1)[:, :, None] if plan.gate == 1 else term[:, :, None, :])
        dg = dg.to(g.dtype)
    if G > 1:
        dk = dk.view(B, HKV, G, L, D).sum(2)
        dvo = dvo.view(B, HKV, G, L, DV).sum(2)
    return [dq.to(q.dtype), dk.to(k.dtype), dvo.to(v.dtype), dg,
            None if dwq is None else dwq.to(wq.dtype), None if dwk is None else dwk.to(wk.dtype),
            None if dsink is None else dsink.sum(0).to(sinks.dtype),
            None if dcoef is None else dcoef.to(coef.dtype),
            None if dS0 is None else dS0.to(S0.dtype), None if dz0 is None else dz0.to(z0.dtype if z0 is not None else f32)]


def _triton_failure(e: BaseException) -> bool:
    """A compile / resource failure of Triton itself (not a bug in the inputs)."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"OutOfResources", "CompilationError", "PTXASError"}) or "out of resource" in str(e).lower()


def config_string(fwd: dict, bwd: dict) -> str:
    """The launch configs as the custom op's JSON string argument (plain formatting: torch.compile
    traces this without a graph break, unlike json.dumps)."""
    def one(c):
        return (f'{{"BT": {int(c["BT"])}, "BV": {int(c["BV"])}, "num_warps": {int(c.get("num_warps", 4))}, '
                f'"num_stages": {int(c.get("num_stages", 2))}}}')
    return f'{{"fwd": {one(fwd)}, "bwd": {one(bwd)}}}'


def tune_linear(kernel, dims: Dims, dtype, device, inputs: dict, *, db=None, force=False,
                progress=None, bench=None) -> list:
    """Measured search of the forward space, then the backward space, stored in the tuning database."""
    plan = kernel.plan
    tensors = [None if t is None else t.detach() for t in inputs["tensors"]]
    scale, ls = inputs["scale"], inputs["linear_scale"]
    vector = plan.gate == 2
    fspace = FWD_SPACE_VECTOR if vector else FWD_SPACE
    bspace = BWD_SPACE_VECTOR if vector else BWD_SPACE
    full_v = max(16, next_pow2(dims.DV))
    fspace = [c for c in fspace if c["BV"] <= full_v] or [default_config(plan, dims, "cuda")]
    bspace = [c for c in bspace if c["BV"] <= full_v] or [default_config(plan, dims, "cuda")]

    def build_fwd(cfg):
        def run():
            return run_forward(plan, cfg, *tensors, scale, ls, False, False)
        run()  # compile, and reject a config that does not launch
        return run

    res_f = tune(fspace, build_fwd, bench, backend="triton", kernel="linear_fwd", spec=kernel.spec, dtype=dtype,
                 dims=dims.bucket(), db=db, device=device, force=force, progress=progress)
    fwd_out = []  # the forward's saved tensors, made on the first backward build only (a cached
                  # result builds nothing: zero work)

    def build_bwd(cfg):
        if not fwd_out:
            aux = run_forward(plan, res_f.config, *tensors, scale, ls, plan.causal, True)
            fwd_out.append((torch.randn_like(aux[0]), [None if t.numel() == 0 else t for t in aux]))
        do, saved = fwd_out[0]

        def run():
            return run_backward(plan, cfg, do, None, None, *tensors, *saved, scale, ls)
        run()
        return run

    res_b = tune(bspace, build_bwd, bench, backend="triton", kernel="linear_bwd", spec=kernel.spec, dtype=dtype,
                 dims=dims.bucket(), db=db, device=device, force=force, progress=progress)
    return [res_f, res_b]
