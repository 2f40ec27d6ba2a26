"""The q / k / v layouts lincomp takes, for ``kernel(...)`` and ``lincomp.reference(...)``:

| layout | q | k, v | g (gated specs) | o |
| --- | --- | --- | --- | --- |
| ``"bhld"`` (default; SDPA's) | ``[B, H, L, D]`` | ``[B, Hkv, L, D]`` | ``[B, H, L]`` / ``[B, H, L, F]`` | ``[B, H, L, Dv]`` |
| ``"blhd"`` (flash-attn, fla, xformers) | ``[B, L, H, D]`` | ``[B, L, Hkv, D]`` | ``[B, L, H]`` / ``[B, L, H, F]`` | ``[B, L, H, Dv]`` |

Every other tensor (feature weights, sinks, key_padding_mask ``[B, L]``, states) is the same in both. A
``"blhd"`` call is computed as ``"bhld"`` on transposed copies. Without ``layout``, a q whose head axis is
implausibly long (more than ``MAX_HEADS``) is taken for a ``[B, L, H, D]`` tensor passed by mistake: ValueError,
instead of attending over the wrong axis.
"""

from __future__ import annotations

from typing import Callable, Optional

LAYOUTS = ("bhld", "blhd")
MAX_HEADS = 256      # more query heads than any released model has; a longer axis is the sequence


def check_layout(layout: Optional[str], q) -> str:
    """The layout of this call ("bhld" when None), after the head-axis plausibility check."""
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)} ([B, H, L, D] or [B, L, H, D]), got {layout!r}")
    if getattr(q, "dim", lambda: 0)() != 4:
        return layout or "bhld"
    head_axis = 2 if layout == "blhd" else 1
    heads = q.shape[head_axis]
    if heads > MAX_HEADS and layout != "bhld":
        read = "[B, L, H, D]" if layout == "blhd" else "[B, H, L, D]"
        other = "bhld" if layout == "blhd" else "blhd"
        raise ValueError(f"q of shape {list(q.shape)} read as {read} has {heads} heads (more than {MAX_HEADS}): it "
                         f"looks like the other layout; pass layout='{other}'"
                         + ("" if layout else " (or layout='bhld' if it really has that many heads)"))
    return layout or "bhld"


def call_in_layout(fn: Callable, layout: Optional[str], q, k, v, kwargs: dict):
    """``fn(q, k, v, layout="bhld", **kwargs)`` for tensors given in ``layout``; the output comes back in it."""
    layout = check_layout(layout, q)
    if layout == "bhld":
        return fn(q, k, v, layout="bhld", **kwargs)
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    if kwargs.get("g") is not None:
        kwargs = dict(kwargs, g=kwargs["g"].transpose(1, 2).contiguous())
    out = fn(q, k, v, layout="bhld", **kwargs)
    if isinstance(out, tuple):               # (o, state): the state has no sequence axis
        return (out[0].transpose(1, 2), *out[1:])
    return out.transpose(1, 2)


__all__ = ["LAYOUTS", "MAX_HEADS", "check_layout", "call_in_layout"]
