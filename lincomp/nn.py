"""``lincomp.nn``: drop-in attention layers with their own q / k / v / o projections (as fla's layers are).

Every layer maps ``x [B, L, hidden] -> [B, L, hidden]``::

    x -> q_proj, k_proj, v_proj -> [B, H, L, D] / [B, Hkv, L, D] -> lincomp attention (spec) -> o_proj

The spec's learned tensors (gate projection ``g``, Hedgehog feature weights, sink logits, ``alpha``,
``window_gamma``, ``pool_weight``) are ``nn.Parameter``s of ``layer.attn`` (a
:class:`lincomp.models.modules.LinearizedAttention`, whose docstring gives each one's shape and
initialisation); the gate is computed from the layer's own input ``x``. ``target="auto"`` runs the
generated Triton kernels on CUDA tensors and the TVM kernels on CPU tensors.

- :class:`Attention` (any spec), :class:`SlidingWindowAttention`, :class:`LizardAttention`,
  :class:`ClearAttention` (text tokens then a 2D / 3D latent grid);
- :func:`layer_kwargs` / :func:`spec_from_config` / :meth:`Attention.from_config`: sizes and a spec from a
  transformers model config (``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
  ``attention_bias``, ``sliding_window``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lincomp import presets
from lincomp.models.modules import LinearizedAttention
from lincomp.spec import AttentionSpec

CONFIG_PRESETS = ("sliding_window", "lizard", "lolcats", "gla")


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class Attention(nn.Module):
    """Multi-head attention computing ``spec`` with lincomp: ``forward(x [B, L, hidden]) -> [B, L, hidden]``.

    ``num_kv_heads`` (grouped-query attention) must divide ``num_heads``; ``head_dim`` defaults to
    ``hidden_size // num_heads``; ``scale`` to ``head_dim ** -0.5``. ``forward`` also takes
    ``key_padding_mask [B, L]`` (bool, True = a real token) and ``cu_seqlens`` (int ``[N + 1]``, packed
    documents in one row, B = 1).
    """

    def __init__(self, hidden_size: int, num_heads: int, spec, *, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, bias: bool = False, scale: Optional[float] = None,
                 target: str = "auto", fallback: str = "warn", dtype=None, device=None):
        super().__init__()
        hidden_size, num_heads = _positive(hidden_size, "hidden_size"), _positive(num_heads, "num_heads")
        num_kv_heads = num_heads if num_kv_heads is None else _positive(num_kv_heads, "num_kv_heads")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads} (grouped-query "
                             "attention shares each key/value head among num_heads // num_kv_heads query heads)")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}; pass head_dim")
            head_dim = hidden_size // num_heads
        head_dim = _positive(head_dim, "head_dim")
        self.spec = AttentionSpec.coerce(spec)
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden_size, num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5 if scale is None else float(scale)
        kw = {"dtype": dtype, "device": device}
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias, **kw)
        self.attn = LinearizedAttention(self.spec, num_heads, head_dim, hidden_size=hidden_size, target=target,
                                        fallback=fallback, **kw)

    @classmethod
    def from_config(cls, config, spec=None, *, preset: str = "sliding_window", **kwargs) -> "Attention":
        """A layer sized like ``config``'s attention (a transformers ``PretrainedConfig`` or any object with its
        attribute names), computing ``spec``, or else :func:`spec_from_config` ``(config, preset)``."""
        spec = spec_from_config(config, preset) if spec is None else spec
        return cls(spec=spec, **{**layer_kwargs(config), **kwargs})

    def heads(self, x: torch.Tensor):
        """(q [B, H, L, D], k [B, Hkv, L, D], v [B, Hkv, L, D]) of ``x [B, L, hidden]``."""
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [B, L, hidden={self.hidden_size}], got {list(x.shape)}")
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = self.heads(x)
        o = self.attn(q, k, v, hidden_states=x, key_padding_mask=key_padding_mask, scale=self.scale,
                      cu_seqlens=cu_seqlens)                                       # [B, H, L, D]
        B, L = x.shape[:2]
        return self.o_proj(o.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (f"spec={self.spec.summary()}, hidden={self.hidden_size}, heads={self.num_heads}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}")


class SlidingWindowAttention(Attention):
    """Causal sliding-window softmax: query i sees keys i - window + 1 .. i (plus ``sinks`` learned logits)."""

    def __init__(self, hidden_size: int, num_heads: int, window: int, *, sinks: int = 0, **kwargs):
        super().__init__(hidden_size, num_heads, presets.sliding_window(_positive(window, "window"), sinks), **kwargs)


class LizardAttention(Attention):
    """Lizard: gated linear attention (exp Hedgehog map, data-dependent gate from ``x``) + a causal sliding
    window of ``window`` keys with ``sinks`` meta-memory logits, summed with a learned ``alpha`` per head.
    ``feature_dim`` (E) defaults to the head dimension."""

    def __init__(self, hidden_size: int, num_heads: int, window: int = 128, *, sinks: int = 4,
                 feature_dim: Optional[int] = None, gate: str = "scalar", chunk_size: int = 64,
                 head_dim: Optional[int] = None, **kwargs):
        E = feature_dim or head_dim or _positive(hidden_size, "hidden_size") // _positive(num_heads, "num_heads")
        spec = presets.lizard(_positive(window, "window"), sinks, E, chunk_size, gate)
        super().__init__(hidden_size, num_heads, spec, head_dim=head_dim, **kwargs)


class ClearAttention(Attention):
    """CLEAR: ``text_tokens`` global tokens, then a ``grid`` (rows, cols) or (frames, rows, cols) of image
    tokens in row-major order, each seeing the grid tokens within ``radius`` (a ``circle`` or ``square``).
    ``pool`` adds CLEAR's down-sampled keys/values with a learned ``pool_weight``. Inputs need
    L = text_tokens + prod(grid); non-causal."""

    def __init__(self, hidden_size: int, num_heads: int, grid, radius: int, *, text_tokens: int = 0,
                 shape: str = "circle", pool=None, **kwargs):
        spec = (presets.clear(radius, grid, text_tokens, shape) if pool is None
                else presets.clear_pool(radius, pool, grid, text_tokens, shape))
        super().__init__(hidden_size, num_heads, spec, **kwargs)


# ============================================================================ transformers configs
def _config_value(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def layer_kwargs(config) -> dict:
    """{hidden_size, num_heads, num_kv_heads, head_dim, bias} of a transformers config's attention."""
    hidden = _config_value(config, "hidden_size", "d_model")
    heads = _config_value(config, "num_attention_heads", "num_heads", "n_head")
    if hidden is None or heads is None:
        raise ValueError(f"{type(config).__name__} has no hidden_size / num_attention_heads; build the layer "
                         "with explicit sizes instead: Attention(hidden_size, num_heads, spec)")
    return {"hidden_size": hidden, "num_heads": heads,
            "num_kv_heads": _config_value(config, "num_key_value_heads", default=heads),
            "head_dim": _config_value(config, "head_dim", default=hidden // heads),
            "bias": bool(_config_value(config, "attention_bias", default=False))}


def spec_from_config(config, preset: str = "sliding_window", **overrides) -> AttentionSpec:
    """The ``preset`` spec sized from ``config``: the window from ``config.sliding_window`` (tokens a query
    sees, itself included), Hedgehog feature width from the head dimension. ``overrides`` are passed to the
    preset (e.g. ``window=64``, ``sinks=0``)."""
    if preset not in CONFIG_PRESETS:
        raise ValueError(f"preset must be one of {list(CONFIG_PRESETS)}, got {preset!r}")
    window = _config_value(config, "sliding_window")
    head_dim = layer_kwargs(config)["head_dim"]
    if preset == "sliding_window":
        if "window" not in overrides and window is None:
            raise ValueError(f"{type(config).__name__}.sliding_window is not set, so there is no window to copy; "
                             "pass window=... (tokens a query sees)")
        return presets.sliding_window(**{"window": window, **overrides})
    if preset == "lizard":
        return presets.lizard(**{"window": window or 128, "feature_dim": head_dim, **overrides})
    if preset == "lolcats":
        return presets.lolcats(**{"feature_dim": head_dim, **overrides})
    return presets.gla(**overrides)


__all__ = ["Attention", "SlidingWindowAttention", "LizardAttention", "ClearAttention", "layer_kwargs",
           "spec_from_config", "CONFIG_PRESETS"]
