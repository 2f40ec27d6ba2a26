"""The learned parts a spec needs, as ``nn.Module``s that ``lincomp.linearize`` attaches to attention modules.

``LinearizedAttention`` (attached as ``attention_module.lincomp``) owns every parameter a spec needs and
computes attention through ``torch.ops.lincomp.attention``:

| spec needs | parameter | shape | initialisation |
| --- | --- | --- | --- |
| hedgehog / hedgehog_exp map | ``feature_q.weight``, ``feature_k.weight`` | ``[H, D, E]`` | identity-like (``eye`` per head; LoLCATs / Hedgehog) |
| scalar gate (Lizard) | ``gate.proj`` | ``hidden -> H`` | GLA init (xavier, gain 2^-2.5); bias so gamma = sigmoid(.) starts at 0.97 |
| vector gate (GLA) | ``gate.down``, ``gate.proj`` | ``hidden -> 16 -> H*F`` | GLA: ``g = logsigmoid(x W1 W2 + b) / 16`` |
| sinks (Lizard meta memory) | ``sink_logits`` | ``[H, m]`` | 0 |
| combine="shared" (LoLCATs) | ``window_factor`` | ``[H]`` | logit(0.1): window_gamma = sigmoid(factor) starts at 0.1 |
| combine="sum" (Lizard) | ``alpha`` | ``[H]`` | 1 |
| window.pool (CLEAR pooled keys) | ``pool_weight`` | the pool factors, e.g. ``[4, 4]`` | ``1 / prod(factors)`` (CLEAR's average) |

Gates are computed from the attention module's input hidden states ``x [B, L, hidden]``:
scalar ``g = logsigmoid(x W + b)`` ``[B, H, L]``; vector ``g = logsigmoid(x W1 W2 + b) / 16`` ``[B, H, L, F]``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lincomp.spec import AttentionSpec

MODES = ("student", "teacher")
GATE_LOW_RANK = 16          # GLA's gate rank and normaliser
SCALAR_GATE_INIT = 0.97     # sigmoid(bias) at initialisation: long memory, closest to a softmax teacher
WINDOW_GAMMA_INIT = 0.1     # LoLCATs: init_window_factor = logit(0.1)


def _gla_init(linear: nn.Linear) -> None:
    nn.init.xavier_uniform_(linear.weight, gain=2 ** -2.5)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class HedgehogFeatureMap(nn.Module):
    """The learned projection of a Hedgehog map: ``weight [H, D, E]``, identity-like at init.

    phi itself (softmax or exp of ``x W`` and ``-x W``) is applied by the kernel (docs/semantics.md section 2).
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, *, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim, dtype=dtype, device=device))
        with torch.no_grad():
            for h in range(num_heads):
                nn.init.eye_(self.weight[h])

    def extra_repr(self) -> str:
        return "heads={}, head_dim={}, feature_dim={}".format(*self.weight.shape)


class Gate(nn.Module):
    """Data-dependent log forget gate from hidden states: ``x [B, L, hidden] -> g [B, H, L]`` or ``[B, H, L, F]``."""

    def __init__(self, hidden_size: int, num_heads: int, kind: str, feature_width: int, *, dtype=None, device=None):
        super().__init__()
        if kind not in ("scalar", "vector"):
            raise ValueError(f"gate kind must be 'scalar' or 'vector', got {kind!r}")
        self.kind, self.num_heads, self.feature_width = kind, num_heads, feature_width
        kw = {"dtype": dtype, "device": device}
        if kind == "scalar":   # Lizard: gamma_t = sigmoid(x_t W) per token and head
            self.down = None
            self.proj = nn.Linear(hidden_size, num_heads, bias=True, **kw)
            _gla_init(self.proj)
            with torch.no_grad():
                self.proj.bias.fill_(math.log(SCALAR_GATE_INIT / (1 - SCALAR_GATE_INIT)))
        else:                  # GLA: low-rank, per feature
            self.down = nn.Linear(hidden_size, GATE_LOW_RANK, bias=False, **kw)
            self.proj = nn.Linear(GATE_LOW_RANK, num_heads * feature_width, bias=True, **kw)
            _gla_init(self.down)
            _gla_init(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "scalar":
            return F.logsigmoid(self.proj(x)).transpose(1, 2)                              # [B, H, L]
        g = F.logsigmoid(self.proj(self.down(x))) / GATE_LOW_RANK
        return g.unflatten(-1, (self.num_heads, self.feature_width)).transpose(1, 2)     # [B, H, L, F]


class LinearizedAttention(nn.Module):
    """Everything a spec learns, plus the call into lincomp. Attached as ``attention_module.lincomp``.

    ``forward(q, k, v, hidden_states=None, key_padding_mask=None, scale=None, spec_json=None) -> o``
    with q ``[B, H, L, D]``, k / v ``[B, Hkv, L, D]``, hidden_states ``[B, L, hidden]`` (needed by gated specs),
    key_padding_mask ``[B, L]`` bool, cu_seqlens int ``[N + 1]`` (a packed row, B = 1); o ``[B, H, L, D]``. ``mode`` is "student" (lincomp) or "teacher" (the
    model's original softmax attention; see ``lincomp.models.set_attention_mode``).
    """

    def __init__(self, spec, num_heads: int, head_dim: int, *, hidden_size: Optional[int] = None,
                 target: str = "auto", fallback: str = "warn", dtype=None, device=None):
        super().__init__()
        from lincomp.backends.ops import FALLBACKS, TARGETS, spec_to_json
        spec = AttentionSpec.coerce(spec)
        if target not in TARGETS:
            raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {list(FALLBACKS)}, got {fallback!r}")
        self.spec, self.spec_json = spec, spec_to_json(spec)
        self.num_heads, self.head_dim, self.hidden_size = num_heads, head_dim, hidden_size
        self.target, self.fallback = target, fallback
        self.mode = "student"
        self._decoder = None          # set while lincomp.models.generate runs
        kw = {"dtype": dtype, "device": device}
        lin = spec.linear
        self.feature_q = self.feature_k = self.gate = None
        width = head_dim
        if lin is not None and lin.has_weights:
            E = lin.feature_dim or head_dim
            width = 2 * E
            self.feature_q = HedgehogFeatureMap(num_heads, head_dim, E, **kw)
            self.feature_k = HedgehogFeatureMap(num_heads, head_dim, E, **kw)
        if lin is not None and lin.gate is not None:
            if hidden_size is None:
                raise ValueError(f"the spec's {lin.gate} gate is computed from hidden states: give hidden_size")
            self.gate = Gate(hidden_size, num_heads, lin.gate, width, **kw)
        self.sink_logits = nn.Parameter(torch.zeros(num_heads, spec.sinks, **kw)) if spec.sinks else None
        self.window_factor = (nn.Parameter(torch.full((num_heads,), math.log(WINDOW_GAMMA_INIT / (1 - WINDOW_GAMMA_INIT)), **kw))
                              if spec.combine == "shared" else None)
        self.alpha = nn.Parameter(torch.ones(num_heads, **kw)) if spec.combine == "sum" else None
        # CLEAR's pooling weight (window.pool), shared by all heads; starts as the average, as CLEAR does.
        self.pool_weight = (nn.Parameter(torch.full(spec.pool, 1.0 / math.prod(spec.pool), **kw))
                            if spec.pool is not None else None)

    @property
    def needs_hidden_states(self) -> bool:
        return self.gate is not None

    def weights(self, dtype=None) -> dict:
        """The spec's learned tensors that do not depend on the input (all but ``g``), cast to ``dtype``."""
        out = {}
        if self.feature_q is not None:
            out["feature_weight_q"], out["feature_weight_k"] = self.feature_q.weight, self.feature_k.weight
        if self.sink_logits is not None:
            out["sink_logits"] = self.sink_logits
        if self.window_factor is not None:
            out["window_gamma"] = torch.sigmoid(self.window_factor)
        if self.alpha is not None:
            out["alpha"] = self.alpha
        if self.pool_weight is not None:
            out["pool_weight"] = self.pool_weight
        return out if dtype is None else {k: t.to(dtype) for k, t in out.items()}

    def tensors(self, hidden_states: Optional[torch.Tensor] = None, dtype=None) -> dict:
        """Every docs/semantics.md tensor of this spec for one call (``g`` is computed from ``hidden_states``)."""
        out = self.weights(dtype)
        if self.gate is not None:
            if hidden_states is None:
                raise ValueError("this spec's gate is computed from the attention input hidden states, which were "
                                 "not passed; call the module through the model (linearize installs a hook for it)")
            g = self.gate(hidden_states)
            out["g"] = g if dtype is None else g.to(dtype)
        return out

    def forward(self, q, k, v, *, hidden_states=None, key_padding_mask=None, scale=None, spec_json=None,
                cu_seqlens=None):
        t = self.tensors(hidden_states, q.dtype)
        cache_layer = self.__dict__.pop("_cache_layer", None)   # armed by LincompCache.update for this one call
        if cache_layer is not None:
            return cache_layer.attend(q, k, v, t.get("g"), scale, key_padding_mask)
        if self._decoder is not None:
            return self._decode(q, k, v, t.get("g"), scale)
        return torch.ops.lincomp.attention(
            q, k, v, spec_json or self.spec_json, scale, t.get("g"), t.get("feature_weight_q"),
            t.get("feature_weight_k"), t.get("sink_logits"), t.get("window_gamma"), t.get("alpha"),
            key_padding_mask, self.target, self.fallback, "", cu_seqlens, t.get("pool_weight"))

    # -- decoding (lincomp.models.generate) ---------------------------------------------------------
    def make_decoder(self, scale: Optional[float], device: torch.device):
        """A fresh decoder for this layer's target (see ``_decoder_class``) holding these weights."""
        if not self.spec.causal:
            raise ValueError("token-by-token decoding needs a causal spec (causal=True)")
        weights = {k: t.detach() for k, t in self.weights().items()}
        return _decoder_class(self.target, device)(self.spec, scale=scale, **weights)

    def _decode(self, q, k, v, g, scale):
        if self._decoder == "pending":
            self._decoder = self.make_decoder(scale, q.device)
        return step_through(self._decoder, q, k, v, g)

    def extra_repr(self) -> str:
        return f"spec={self.spec.summary()}, heads={self.num_heads}, head_dim={self.head_dim}, mode={self.mode!r}"


def step_through(decoder, q, k, v, g=None) -> torch.Tensor:
    """Feed a decoder the tokens of q ``[B, H, L, D]``, k / v ``[B, Hkv, L, D]``, g ``[B, H, L(, F)]``; returns
    o ``[B, H, L, Dv]``. Several tokens (a prompt) go through the decoder's ``prefill`` (the forward kernel
    over the whole chunk, then the decoder state filled from it) where the decoder has one; else one by one."""
    if q.shape[2] > 1 and hasattr(decoder, "prefill"):
        return decoder.prefill(q, k, v, g)
    outs = [decoder.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], None if g is None else g[:, :, t:t + 1])
            for t in range(q.shape[2])]
    return torch.cat(outs, dim=2)


def _decoder_class(target: str, device: torch.device):
    """The decoder of a layer's target ("auto": TritonDecoder on CUDA, TVMDecoder on the CPU), all with the
    ``ReferenceDecoder`` interface; the reference, with a warning, when that backend is not installed."""
    from lincomp.reference import ReferenceDecoder
    if target == "auto":
        target = {"cuda": "triton", "cpu": "tvm"}.get(device.type, "reference")
    try:
        if target == "triton":
            from lincomp.lower.triton.decode import TritonDecoder
            return TritonDecoder
        if target == "tvm":
            from lincomp.lower.tvm import TVMDecoder
            return TVMDecoder
    except ImportError as e:
        from lincomp.runtime.kernel import warn_fallback
        warn_fallback(f"{target} decoder", f"{target} is not available: {e}")
    return ReferenceDecoder


__all__ = ["LinearizedAttention", "HedgehogFeatureMap", "Gate", "MODES"]
