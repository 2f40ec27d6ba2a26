"""Validate the tensors of one attention call against a spec (shared by every backend).

``bind(spec, q, k, v, **tensors)`` returns a :class:`Call` with the checked tensors and the sizes
``B, H, Hkv, L, D, Dv, F``. Names and shapes are those of docs/semantics.md.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from lincomp.documents import state_pair
from lincomp.ir.tensors import optional_tensors, required_tensors
from lincomp.spec import AttentionSpec

TENSOR_NAMES = ("g", "feature_weight_q", "feature_weight_k", "sink_logits", "window_gamma", "alpha",
                "initial_state", "key_padding_mask", "pool_weight")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Call:
    spec: AttentionSpec
    q: torch.Tensor                    # [B, H, L, D]
    k: torch.Tensor                    # [B, Hkv, L, D]
    v: torch.Tensor                    # [B, Hkv, L, Dv]
    scale: float
    linear_scale: float
    g: Optional[torch.Tensor] = None   # [B, H, L] or [B, H, L, F], log forget gate <= 0
    feature_weight_q: Optional[torch.Tensor] = None  # [H, D, E]
    feature_weight_k: Optional[torch.Tensor] = None  # [H, D, E]
    sink_logits: Optional[torch.Tensor] = None       # [H, m]
    window_gamma: Optional[torch.Tensor] = None      # [H]
    alpha: Optional[torch.Tensor] = None             # [H]
    S0: Optional[torch.Tensor] = None  # [B, H, F, Dv]
    z0: Optional[torch.Tensor] = None  # [B, H, F]
    key_padding_mask: Optional[torch.Tensor] = None  # [B, L] bool, True = attend
    pool_weight: Optional[torch.Tensor] = None       # [f_1, f_2(, f_3)] = window.pool
    return_state: bool = False

    @property
    def B(self): return self.q.shape[0]
    @property
    def H(self): return self.q.shape[1]
    @property
    def Hkv(self): return self.k.shape[1]
    @property
    def L(self): return self.q.shape[2]
    @property
    def D(self): return self.q.shape[3]
    @property
    def Dv(self): return self.v.shape[3]

    @property
    def F(self) -> Optional[int]:
        lin = self.spec.linear
        if lin is None:
            return None
        if lin.has_weights:
            return 2 * self.feature_weight_q.shape[-1]
        return self.D


def feature_width(spec: AttentionSpec, D: int, feature_weight: Optional[torch.Tensor] = None) -> int:
    """F, the width of phi(x): D for elementwise maps, 2E for hedgehog maps."""
    lin = spec.linear
    if lin.has_weights:
        return 2 * (feature_weight.shape[-1] if feature_weight is not None else lin.feature_dim)
    return D


def _shape_error(name, got, want, fix=""):
    return ValueError(f"{name} has shape {list(got)}, expected {want}{'; ' + fix if fix else ''}")


def _check_tensor(name, t, device, ndim_options):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}; move it with .to(q.device)")
    if t.dim() not in ndim_options:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim_options))} dims, got shape {list(t.shape)}")
    return t


def _finite(x, name: str, what: str) -> float:
    """``x`` as a float; a NaN / Inf scale would make every output NaN or silently finite garbage."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real) and not (isinstance(x, torch.Tensor) and x.numel() == 1):
        raise TypeError(f"{name} must be a number ({what}), got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite ({what}), got {x}")
    return x


def unpack_initial_state(st, B: int, H: int, F: int, Dv: int, device=None) -> tuple:
    """``initial_state`` (``S0`` or ``(S0, z0)``) as ``(S0 [B, H, F, Dv], z0 [B, H, F])``, checked; z0 defaults
    to zeros. The tensors come back as given (decoders cast and copy them); ``device``: where they must be."""
    S0, z0 = state_pair(st)
    S0 = _check_tensor("initial_state S0", S0, device, (4,))
    if list(S0.shape) != [B, H, F, Dv]:
        raise _shape_error("initial_state S0", S0.shape, f"[B, H, F, Dv] = {[B, H, F, Dv]}")
    z0 = _check_tensor("initial_state z0", S0.new_zeros(B, H, F) if z0 is None else z0, device, (3,))
    if list(z0.shape) != [B, H, F]:
        raise _shape_error("initial_state z0", z0.shape, f"[B, H, F] = {[B, H, F]}")
    return S0, z0


def check_log_gate(lo: float, hi: float) -> None:
    """Raise for a log forget gate whose smallest / largest entries are ``lo`` / ``hi`` (NaN or Inf
    anywhere makes one of them non-finite) unless both are finite and ``hi <= 0``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("g (log forget gate) has NaN or Inf entries; use a large negative finite value "
                         "(e.g. -30) for a full reset")
    if hi > 0:
        raise ValueError(f"g is the log of a forget gate and must be <= 0, but its max is {hi:.4g}; "
                         "pass F.logsigmoid(x) or -softplus(x)")


def check_window_gamma(gamma: torch.Tensor) -> None:
    """Raise unless every entry of ``window_gamma`` lies in (0, 1]."""
    if not bool(((gamma > 0) & (gamma <= 1)).all()):
        raise ValueError("window_gamma must lie in (0, 1] (pass sigmoid(factor) as LoLCATs does)")


def check_step(spec: AttentionSpec, q, k, v, g=None) -> None:
    """Check one decoding step (every decoder calls this): ``q [B, H, 1, D]``, ``k [B, Hkv, 1, D]``,
    ``v [B, Hkv, 1, Dv]``, ``g [B, H, 1]`` (scalar gate) or ``[B, H, 1, F]`` (vector gate), with the same
    rules as :func:`bind` (a missing or extra gate, a gate > 0 or with NaN / Inf raises)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[2] != 1:
            raise ValueError(f"{name} must be one token [B, H, 1, D] (a decoder takes a step at a time; feed a "
                             f"sequence token by token or use the full kernel), got shape {list(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; use float16, bfloat16, float32 or float64")
    B, H, _, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"k head dim {k.shape[3]} != q head dim {D}")
    if k.shape[1] != v.shape[1] or k.shape[1] < 1 or H % k.shape[1]:
        raise ValueError(f"key/value heads ({k.shape[1]}, {v.shape[1]}) must match and divide query heads ({H})")
    if min(B, H, D, v.shape[3]) < 1:
        raise ValueError(f"sizes must be >= 1, got q {list(q.shape)}, v {list(v.shape)}")
    lin = spec.linear
    gate = None if lin is None else lin.gate
    if gate is None:
        if g is not None:
            raise ValueError(f"g was given but the spec ({spec.summary()}) has no gate; remove it")
        return
    if g is None:
        raise ValueError(f"g is required by this spec's {gate} gate ({spec.summary()}): "
                         f"{'[B, H, 1]' if gate == 'scalar' else '[B, H, 1, F]'}")
    g = _check_tensor("g", g, q.device, (3,) if gate == "scalar" else (4,))
    if list(g.shape[:3]) != [B, H, 1]:
        raise _shape_error("g", g.shape, "[B, H, 1]" if gate == "scalar" else "[B, H, 1, F]",
                           f"one log gate per {'head' if gate == 'scalar' else 'feature'} for this token")
    if not g.is_floating_point():
        raise TypeError(f"g must be a float tensor, got {g.dtype}")
    check_log_gate(*(float(x) for x in torch.aminmax(g.detach())))


def _check_pool_weight(spec: AttentionSpec, t, device, dtype) -> torch.Tensor:
    """``pool_weight``: a float tensor shaped like ``window.pool`` (one weight per offset in a pooled cell)."""
    t = _check_tensor("pool_weight", t, device, (len(spec.pool),))
    if tuple(t.shape) != spec.pool:
        raise _shape_error("pool_weight", t.shape, f"window.pool = {list(spec.pool)}",
                           "one weight per token offset in a pooled cell (CLEAR starts at 1 / (f_1 f_2))")
    if not t.is_floating_point():
        raise TypeError(f"pool_weight must be a float tensor, got {t.dtype}")
    return t


def bind(spec: AttentionSpec, q, k, v, *, scale: Optional[float] = None, linear_scale: Optional[float] = None,
         return_state: bool = False, check_values: bool = True, **tensors) -> Call:
    """Check a call and return its :class:`Call`. Raises ValueError / TypeError naming the field."""
    spec = AttentionSpec.coerce(spec)
    for name in tensors:
        if name not in TENSOR_NAMES:
            raise TypeError(f"unexpected keyword {name!r}; the tensors lincomp takes are {list(TENSOR_NAMES)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, L, D] (the scaled_dot_product_attention layout), "
                             f"got shape {list(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; use float16, bfloat16, float32 or float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them to one")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, L, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[2] != L or v.shape[2] != L:
        raise ValueError(f"k and v must have the query length L={L} (self-attention), got k {k.shape[2]}, "
                         f"v {v.shape[2]}; cross-attention is not supported")
    if k.shape[3] != D:
        raise ValueError(f"k head dim {k.shape[3]} != q head dim {D}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k has {k.shape[1]} heads but v has {v.shape[1]}")
    Hkv = k.shape[1]
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"key/value heads ({Hkv}) must divide query heads ({H}) (grouped-query attention)")
    if L < 1:
        raise ValueError("the sequence is empty (L = 0)")
    if D < 1 or v.shape[3] < 1:
        raise ValueError(f"head dims must be >= 1, got q/k D={D}, v Dv={v.shape[3]}; q, k, v are [B, H, L, D]")
    if B < 1 or H < 1:
        raise ValueError(f"batch and heads must be >= 1, got B={B}, H={H}")
    expected = spec.expected_length()
    if expected is not None and expected != L:
        w = spec.window
        raise ValueError(f"sequence length L={L} does not match window.grid {list(w.grid)} with prefix "
                         f"{spec.prefix}: expected prefix + {'*'.join(map(str, w.grid))} = {expected}; build the spec "
                         f"for this input with spec.with_grid(...) or fix the prefix")
    scale = D ** -0.5 if scale is None else _finite(scale, "scale", "the softmax scale; default D ** -0.5")
    lin = spec.linear
    if linear_scale is None:
        linear_scale = D ** -0.5 if (lin is not None and lin.feature_map == "identity") else 1.0
    linear_scale = _finite(linear_scale, "linear_scale", "the linear branch's output scale")

    needed = set(required_tensors(spec))
    optional = set(optional_tensors(spec))
    for name in needed:
        if tensors.get(name) is None:
            raise ValueError(f"{name} is required by this spec ({spec.summary()}) and was not given; "
                             f"see docs/semantics.md for its shape")
    for name, t in tensors.items():
        if t is not None and name not in needed and name not in optional:
            why = ("initial_state needs a causal linear branch" if name == "initial_state"
                   else f"the spec ({spec.summary()}) does not use it")
            raise ValueError(f"{name} was given but {why}; remove it or change the spec")

    dev = q.device
    call = Call(spec, q, k, v, scale, float(linear_scale), return_state=bool(return_state))
    if lin is not None and lin.has_weights:
        for name in ("feature_weight_q", "feature_weight_k"):
            w = _check_tensor(name, tensors[name], dev, (3,))
            E = lin.feature_dim if lin.feature_dim is not None else w.shape[-1]
            if tuple(w.shape) != (H, D, E):
                raise _shape_error(name, w.shape, f"[H, D, E] = {[H, D, E]}",
                                   "one [D, E] projection per query head (E = linear.feature_dim)")
            setattr(call, name, w)
        if call.feature_weight_q.shape != call.feature_weight_k.shape:
            raise ValueError("feature_weight_q and feature_weight_k must have the same shape [H, D, E]")
    F = call.F
    if lin is not None and lin.gate is not None:
        g = _check_tensor("g", tensors["g"], dev, (3, 4))
        want = [B, H, L] if lin.gate == "scalar" else [B, H, L, F]
        if list(g.shape) != want:
            raise _shape_error("g", g.shape, want, f"a {lin.gate} gate is [B, H, L{'' if lin.gate == 'scalar' else ', F'}]")
        if not g.is_floating_point():
            raise TypeError(f"g must be a float tensor, got {g.dtype}")
        if check_values:  # one pass over g: min and max tell NaN / Inf and positive entries apart
            check_log_gate(*(float(x) for x in torch.aminmax(g.detach())))
        call.g = g
    if spec.sinks:
        t = _check_tensor("sink_logits", tensors["sink_logits"], dev, (2,))
        if list(t.shape) != [H, spec.sinks]:
            raise _shape_error("sink_logits", t.shape, f"[H, sinks] = {[H, spec.sinks]}")
        call.sink_logits = t
    if spec.pool is not None:
        call.pool_weight = _check_pool_weight(spec, tensors["pool_weight"], dev, q.dtype)
        if tensors.get("key_padding_mask") is not None:
            raise ValueError("key_padding_mask cannot be combined with window.pool (a pooled key mixes present "
                             "and padded tokens); drop the mask or remove pool from the spec")
    for name in ("window_gamma", "alpha"):
        if name in needed:
            t = _check_tensor(name, tensors[name], dev, (1,))
            if list(t.shape) != [H]:
                raise _shape_error(name, t.shape, f"[H] = [{H}]", "one value per query head")
            if name == "window_gamma" and check_values:
                check_window_gamma(t)
            setattr(call, name, t)
    st = tensors.get("initial_state")
    if st is not None:
        call.S0, call.z0 = unpack_initial_state(st, B, H, F, v.shape[3], device=dev)
    kpm = tensors.get("key_padding_mask")
    if kpm is not None:
        kpm = _check_tensor("key_padding_mask", kpm, dev, (2,))
        if kpm.dtype != torch.bool or list(kpm.shape) != [B, L]:
            raise ValueError(f"key_padding_mask must be a bool [B, L] = {[B, L]} tensor (True = attend), "
                             f"got {kpm.dtype} {list(kpm.shape)}")
        call.key_padding_mask = kpm
    if return_state:
        if lin is None or not spec.causal:
            raise ValueError("return_state=True needs a causal linear branch (the state is (S, z)); "
                             "for windows use lincomp.Decoder")
        if spec.combine == "shared":
            raise ValueError("return_state=True is not defined for combine='shared' (keys still inside the "
                             "window are not in S); carry a lincomp.Decoder instead")
    return call
