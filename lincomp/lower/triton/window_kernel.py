"""The window family's Kernel: :class:`WindowKernel` and ``compile_window`` (top layer of the family).

``compile_window(spec, **hints)`` returns a :class:`WindowKernel` whose ``source`` is the generated
Triton module (``lincomp.lower.triton.window``); calls go through the ``lincomp::window_attention``
custom op (``window_op``), so they are differentiable and opaque to torch.compile.
"""

from __future__ import annotations

import json
from typing import Mapping, Optional

import torch

from lincomp.inputs import bind
from lincomp.lower.triton.common import interpreting
from lincomp.lower.triton.window import render_source
from lincomp.lower.triton.window_launch import (_CHOSEN, KERNELS, _bucket, _dims, check_supported, choose_config,
                                                normalize_config, tune_window)
from lincomp.lower.triton.window_op import window_attention, window_attention_backward
from lincomp.runtime.kernel import Kernel
from lincomp.runtime.pool import merge_pooled, pooled_kv, window_only
from lincomp.spec import AttentionSpec
from lincomp.tuning import device_name
from lincomp.tuning.choose import Choice


class WindowKernel(Kernel):
    """The window (softmax) branch as generated Triton kernels, differentiable, torch.compile-traceable.

    ``kernel(q, k, v, scale=None, sink_logits=None, key_padding_mask=None) -> o [B, H, L, Dv]``.
    ``kernel.source`` is the generated module; ``kernel.config`` the configs of the last call
    ({"window_fwd": ..., "window_bwd": ...}, each {"source", "params", "key"}: ``lincomp.tuning.choose``).
    """

    target = "triton"
    differentiable = True

    def __init__(self, spec, *, config: Optional[Mapping] = None, autotune: bool = False, allow_tf32: bool = False):
        spec = AttentionSpec.coerce(spec)
        super().__init__(spec, source=render_source(spec))
        self.autotune = bool(autotune)
        self.allow_tf32 = bool(allow_tf32)
        fixed = {}
        if config:
            per_kernel = any(key in config for key in KERNELS)
            for kern in KERNELS:
                c = config.get(kern) if per_kernel else config
                if c:
                    fixed[kern] = normalize_config(spec, c)
        self.fixed = fixed
        self.config = {kern: _fixed_choice(kern, c).as_dict() for kern, c in fixed.items()}   # known before a call
        self._options = json.dumps({"autotune": self.autotune, "tf32": self.allow_tf32, **fixed}, sort_keys=True)
        self._spec_json = window_only(spec).canonical_json()   # pooled keys: merged after the window op

    def forward(self, q, k, v, *, scale=None, **tensors):
        return self.forward_and_save(q, k, v, scale=scale, **tensors)[0]

    def forward_and_save(self, q, k, v, *, scale=None, **tensors):
        """(o [B, H, L, Dv], [lse [B, H, L] fp32]): the log-sum-exp is all the backward needs besides o.

        A pooled spec (CLEAR's ``window.pool``) merges the pooled keys after the window op by the rows' lse,
        in differentiable torch: it saves nothing (``None``), so the custom op's gradient is the reference's,
        while a direct call differentiates through the window op and the merge."""
        call = bind(self.spec, q, k, v, scale=scale, **tensors)
        check_supported(call.q, call.k, call.v)
        o, lse = window_attention(call.q, call.k, call.v, call.sink_logits, call.key_padding_mask,
                                  self._spec_json, call.scale, self._options)
        saved = [lse]
        if call.pool_weight is not None:   # CLEAR's pooled keys: pooled once, merged by the rows' lse
            kp, vp = pooled_kv(self.spec, call.k, call.v, call.pool_weight)
            o, saved = merge_pooled(o, lse, call.q, kp, vp, self.spec.prefix, call.scale), None
        if not torch.compiler.is_compiling():   # bookkeeping only; nothing for a traced graph
            self.config = last_configs(window_only(self.spec), call.q, call.v, self._options)
        return o, saved

    def saved_like(self, q, k, v, **tensors) -> list:
        if self.spec.pool is not None:
            return []
        B, H, L = q.shape[0], q.shape[1], q.shape[2]
        return [q.new_empty((B, H, L), dtype=torch.float32)]

    def backward_saved(self, grad_o, o, saved, q, k, v, *, scale=None, needs=None, **tensors) -> dict:
        """dq, dk, dv (and d sink_logits) from o and the saved log-sum-exp: the backward kernels only."""
        call = bind(self.spec, q, k, v, scale=scale, check_values=False, **tensors)
        dq, dk, dv, dsink = window_attention_backward(grad_o.contiguous(), call.q, call.k, call.v, o, saved[0], None,
                                                      call.sink_logits, call.key_padding_mask, self._spec_json,
                                                      call.scale, self._options)
        return {"q": dq, "k": dk, "v": dv, "sink_logits": dsink if call.sink_logits is not None else None}

    def tune(self, q, k, v, *, force: bool = False, progress=True, db=None, **tensors) -> list:
        """Kernel-interface tuning (``lincomp.tune``): forward and backward configs for these inputs."""
        inputs = {"q": q, "k": k, "v": v, "sink_logits": tensors.get("sink_logits")}
        res = tune_window(window_only(self.spec), inputs=inputs, db=db, force=force, progress=progress)
        return [res[kern] for kern in KERNELS if kern in res]


def last_configs(spec, q, v, options: str) -> dict:
    """What the ops chose for this call's key, in the ``kernel.config`` schema of ``lincomp.tuning.choose``
    ({kernel name: {"source", "params", "key"}})."""
    opts = json.loads(options)
    autotune = bool(opts.get("autotune"))
    out = {}
    for kern in KERNELS:
        if kern in opts:
            out[kern] = _fixed_choice(kern, opts[kern]).as_dict()
        elif q.device.type != "cuda" or interpreting():
            out[kern] = choose_config(kern, spec, q, v).as_dict()
        else:
            key = (kern, spec, device_name(q.device), str(q.dtype), _bucket(_dims(q, v)), autotune)
            if key in _CHOSEN:
                out[kern] = _CHOSEN[key].as_dict()
    return out


def _fixed_choice(kernel: str, params: Mapping) -> Choice:
    return Choice("fixed", dict(params), {"backend": "triton", "kernel": kernel})


_KNOWN_HINTS = {"config", "autotune", "allow_tf32"}


def compile_window(spec, **hints) -> WindowKernel:
    """A :class:`WindowKernel` for a softmax-only ``spec``.

    Hints: ``config`` (a dict {block_m, block_n, tile, num_warps, num_stages}, or
    {"window_fwd": ..., "window_bwd": ...}): fixed configs; ``autotune`` (default False: use the tuning db,
    else a heuristic; True: tune a new key on first use and store it); ``allow_tf32`` (fp32 inputs use
    tf32 dots: faster, ~5e-3 error). Other hints are for other backends and ignored.
    """
    spec = AttentionSpec.coerce(spec)
    if spec.linear is not None:
        raise ValueError(f"compile_window lowers softmax-only specs (linear=None); {spec.summary()} has a linear "
                         "branch")
    return WindowKernel(spec, **{k: v for k, v in hints.items() if k in _KNOWN_HINTS})
