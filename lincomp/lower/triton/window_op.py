"""torch custom ops for the window (softmax) branch: ``torch.ops.lincomp.window_attention`` and its backward.

The ops are opaque to torch.compile (fake implementations give the output shapes; autograd is
registered), so a model calling them compiles without graph breaks. Their implementations launch
the generated Triton kernels through ``lincomp.lower.triton.window_launch`` (compiled on CUDA, or the
interpreter with TRITON_INTERPRET=1; ``wrap_triton`` does not accept interpreted kernels, a custom op
does). The op layer of the window family: it sits above the launchers and below ``window_kernel``.

Arguments besides tensors are strings / floats so the schema stays simple: ``spec`` is the spec's
canonical JSON, ``options`` a JSON dict {"autotune": bool, "tf32": bool, optional fixed
"window_fwd" / "window_bwd" configs}.

Importing this module imports torch only (triton loads on the first call).
"""

import functools
import json
from typing import Optional

import torch
from torch import Tensor

from lincomp.lower.triton import window_launch as W
from lincomp.spec import AttentionSpec

DEFAULT_OPTIONS = ""   # "": no autotuning, no tf32, configs from the tuning db or the heuristic


@functools.lru_cache(maxsize=256)
def _spec(spec_json: str):
    return AttentionSpec.from_json(spec_json)


@functools.lru_cache(maxsize=256)
def _options(options: str) -> dict:
    return json.loads(options) if options else {"autotune": False, "tf32": False}


@torch.library.custom_op("lincomp::window_attention", mutates_args=())
def window_attention(q: Tensor, k: Tensor, v: Tensor, sink_logits: Optional[Tensor],
                     key_padding_mask: Optional[Tensor], spec: str, scale: float,
                     options: str = DEFAULT_OPTIONS) -> tuple[Tensor, Tensor]:
    """(o [B, H, L, Dv], lse [B, H, L] fp32 natural log; -inf where a row sees no key).

    q [B, H, L, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv]; sink_logits [H, m]; key_padding_mask [B, L] bool.
    Inputs are assumed validated (``lincomp.inputs.bind``).
    """
    sp, opts = _spec(spec), _options(options)
    tf32 = bool(opts.get("tf32"))
    cfg = opts.get("window_fwd")
    if cfg is None:
        cfg = W.choose_config("window_fwd", sp, q, v, autotune=bool(opts.get("autotune")),
                              runner=W.fwd_runner(sp, q, k, v, sink_logits, key_padding_mask, scale, tf32)).params
    return W.window_forward(sp, q, k, v, sink_logits, key_padding_mask, scale, cfg, tf32)


@window_attention.register_fake
def _window_attention_fake(q, k, v, sink_logits, key_padding_mask, spec, scale, options=DEFAULT_OPTIONS):
    B, H, L, _ = q.shape
    return q.new_empty(B, H, L, v.shape[-1]), q.new_empty(B, H, L, dtype=torch.float32)


@torch.library.custom_op("lincomp::window_attention_backward", mutates_args=())
def window_attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                              dlse: Optional[Tensor], sink_logits: Optional[Tensor],
                              key_padding_mask: Optional[Tensor], spec: str, scale: float,
                              options: str = DEFAULT_OPTIONS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d sink_logits) — the last is an empty tensor when the spec has no sinks."""
    sp, opts = _spec(spec), _options(options)
    tf32 = bool(opts.get("tf32"))
    cfg = opts.get("window_bwd")
    if cfg is None:
        cfg = W.choose_config("window_bwd", sp, q, v, autotune=bool(opts.get("autotune")),
                              runner=W.bwd_runner(sp, do, q, k, v, o, lse, dlse, sink_logits, key_padding_mask,
                                                  scale, tf32)).params
    dq, dk, dv, dsink = W.window_backward(sp, do, q, k, v, o, lse, dlse, sink_logits, key_padding_mask, scale,
                                          cfg, tf32)
    return dq, dk, dv, (dsink if dsink is not None else q.new_empty(0))


@window_attention_backward.register_fake
def _window_attention_backward_fake(do, q, k, v, o, lse, dlse, sink_logits, key_padding_mask, spec, scale,
                                    options=DEFAULT_OPTIONS):
    dsink = sink_logits.new_empty(sink_logits.shape) if sink_logits is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsink


def _setup_context(ctx, inputs, output):
    q, k, v, sink_logits, key_padding_mask, spec, scale, options = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, sink_logits, key_padding_mask)
    ctx.spec, ctx.scale, ctx.options = spec, scale, options
    ctx.has_sinks = sink_logits is not None


def _backward(ctx, do, dlse):
    q, k, v, o, lse, sink_logits, key_padding_mask = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv, dsink = window_attention_backward(do, q, k, v, o, lse, dlse, sink_logits, key_padding_mask,
                                                  ctx.spec, ctx.scale, ctx.options)
    return dq, dk, dv, (dsink if ctx.has_sinks else None), None, None, None, None


window_attention.register_autograd(_backward, setup_context=_setup_context)
