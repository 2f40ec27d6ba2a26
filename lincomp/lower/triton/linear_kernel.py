"""The linear / hybrid family's Kernel: :class:`LinearKernel` and ``compile_linear`` (top layer).

Calls go through the ``lincomp::linear_fwd`` custom op (``linear_op``), so they are differentiable and
opaque to torch.compile; configs come from the hints, the tuning database, on-first-use tuning on a
CUDA device, or ``default_config``.
"""

from __future__ import annotations

from typing import Optional

import torch

from lincomp.inputs import bind
from lincomp.ir.lowered import lower, require
from lincomp.lower.triton.common import interpreting
from lincomp.lower.triton.linear import LinearPlan, load_module, render_source
from lincomp.lower.triton.linear_launch import (MAX_HEAD_DIM, Dims, _triton_failure, config_string,
                                                default_config, tune_linear)
from lincomp.lower.triton.linear_op import _linear_fwd_fake, linear_attention
from lincomp.runtime.kernel import Kernel, Unsupported
from lincomp.tuning import TuningDB, shape_bucket
from lincomp.tuning.choose import Choice, choose

KERNELS = ("linear_fwd", "linear_bwd")   # tuning-db kernel names


class _TuningFailed(Exception):
    """On-first-use tuning failed (it warned): the chooser falls through to the default."""


class LinearKernel(Kernel):
    """Generated Triton kernels for one spec with a linear branch (pure, "sum" or "shared").

    ``kernel(q, k, v, **tensors)`` -> o; ``return_state=True`` -> (o, (S_L, z_L)). Differentiable in
    q, k, v, g, the feature weights, sink_logits, window_gamma, alpha and initial_state. Runs on CUDA
    tensors, and on CPU tensors under TRITON_INTERPRET=1. Hints: ``config`` (a dict with BT, BV,
    num_warps, num_stages; pins forward and backward), ``chunk_size`` (BT), ``autotune`` (default False;
    True: tune on a CUDA device when the tuning database has no entry), ``db`` (a TuningDB).
    ``kernel.config`` after a call: {"linear_fwd": ..., "linear_bwd": ...}, each {"source", "params",
    "key"} (``lincomp.tuning.choose``).
    """

    target = "triton"
    differentiable = True

    def __init__(self, spec, **hints):
        self.plan = LinearPlan.from_spec(spec)
        if self.plan.spec.window is not None:   # the hybrid template fuses the window into the linear kernel
            require(lower(self.plan.spec), "fused", "the Triton hybrid kernel")
        super().__init__(self.plan.spec, source=render_source(self.plan), config={})
        self.hints = hints
        self._configs: dict = {}
        self._spec_json = self.spec.canonical_json()  # computed once: json.dumps does not trace

    # -- configuration ---------------------------------------------------------------------------
    def _key(self, dims: Dims, dtype, device) -> tuple:
        return (str(device), str(dtype), shape_bucket(**dims.bucket()))

    def choices_for(self, dims: Dims, dtype, device, *, inputs: Optional[dict] = None) -> tuple:
        """(forward Choice, backward Choice) for this shape (``lincomp.tuning.choose``): pinned, the tuning
        database (exact, nearest bucket), tuned on first use (``autotune=True`` hint, CUDA), or the default."""
        chunk = self.hints.get("chunk_size")
        pinned = self.hints.get("config")
        kind = "cuda" if device.type == "cuda" else "cpu"
        if pinned is not None or kind != "cuda":   # the interpreter cannot time: its fixed default
            cfg = {**default_config(self.plan, dims, kind, chunk), **(pinned or {})}
            key = {"backend": "triton", "device": "interpreter" if kind != "cuda" else str(device),
                   "dtype": str(dtype), "bucket": shape_bucket(**dims.bucket())}
            source = "fixed" if pinned is not None else "default"
            return tuple(Choice(source, dict(cfg), {**key, "kernel": k}) for k in KERNELS)
        key = self._key(dims, dtype, device)
        if key in self._configs:
            return self._configs[key]
        tuned: list = []

        def tune_both(i):
            if not tuned:
                tuned.extend(self._tune(dims, dtype, device, inputs) or [None, None])
            if tuned[i] is None:
                raise _TuningFailed
            return tuned[i]
        allow_tuning = inputs is not None and self.hints.get("autotune", False) and not torch.compiler.is_compiling()
        db = self._db()
        out = []
        for i, kernel in enumerate(KERNELS):
            def default():
                return default_config(self.plan, dims, "cuda", chunk)
            try:
                out.append(choose("triton", kernel, self.spec, dtype, dims.bucket(), device=device, default=default,
                                  tune=(lambda i=i: tune_both(i)) if allow_tuning else None, db=db))
            except _TuningFailed:
                out.append(choose("triton", kernel, self.spec, dtype, dims.bucket(), device=device, default=default,
                                  db=db))
        self._configs[key] = tuple(out)
        return self._configs[key]

    def configs_for(self, dims: Dims, dtype, device, *, inputs: Optional[dict] = None) -> tuple:
        """(forward params, backward params) for this shape (see :meth:`choices_for`)."""
        f, b = self.choices_for(dims, dtype, device, inputs=inputs)
        return f.params, b.params

    def _db(self):
        return self.hints.get("db") or TuningDB()

    def _tune(self, dims, dtype, device, inputs):
        """Tune at the first call of a new shape bucket; a failure warns and keeps the default config."""
        import warnings
        try:
            results = tune_linear(self, dims, dtype, device, inputs, db=self._db())
        except Exception as e:  # tuning must never break a model run
            warnings.warn(f"lincomp: tuning the linear kernels failed ({type(e).__name__}: {e}); using the "
                          "default config", RuntimeWarning, stacklevel=4)
            return None
        return results[0].config, results[1].config

    def tune(self, q, k, v, *, force: bool = False, progress=True, db=None, **tensors) -> list:
        """Autotune forward and backward for these inputs (CUDA only; a CPU run has nothing to tune).

        Returns one ``lincomp.tuning.TuneResult`` per kernel ("linear_fwd", "linear_bwd").
        """
        if q.device.type != "cuda":
            return []
        call = bind(self.spec, q, k, v, **tensors)
        self.check_supported(call)
        dims = Dims.of(self.plan, q, k, v, call.feature_weight_q)
        results = tune_linear(self, dims, q.dtype, q.device, _op_inputs(self, call),
                              db=db if db is not None else self._db(), force=force, progress=progress)
        self._configs[self._key(dims, q.dtype, q.device)] = tuple(
            Choice("tuned", dict(r.config), {"backend": "triton", "kernel": k, "device": str(q.device),
                                             "dtype": str(q.dtype), "bucket": shape_bucket(**dims.bucket())})
            for k, r in zip(KERNELS, results))
        return results

    # -- call --------------------------------------------------------------------------------------
    def check_supported(self, call) -> None:
        """Raise Unsupported (-> reference fallback with a warning) for inputs these kernels do not take."""
        q = call.q
        if call.key_padding_mask is not None:
            raise Unsupported("key_padding_mask is not supported by the linear / hybrid Triton kernels")
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise Unsupported(f"dtype {q.dtype} (the Triton kernels take float32, float16, bfloat16)")
        if q.device.type == "cpu":
            if not interpreting():
                raise Unsupported("CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before "
                                  "importing triton), or use target='tvm' / 'reference'")
            if q.dtype == torch.bfloat16:
                raise Unsupported("the Triton interpreter has no bfloat16")
        elif q.device.type != "cuda":
            raise Unsupported(f"device {q.device} (Triton runs on CUDA)")
        F = call.F
        if max(call.D, call.Dv, F) > MAX_HEAD_DIM:
            raise Unsupported(f"head / feature dim above {MAX_HEAD_DIM} (D={call.D}, Dv={call.Dv}, F={F})")
        if self.plan.combine == 2 and self.plan.gate and self.plan.prefix:
            raise Unsupported("combine='shared' with gates and prefix tokens")

    def forward(self, q, k, v, *, scale=None, linear_scale=None, return_state: bool = False, **tensors):
        outs = self._run(q, k, v, scale, linear_scale, return_state, None, tensors)
        o = outs[0]
        if return_state:
            return o, (outs[1], outs[2])
        return o

    def forward_and_save(self, q, k, v, *, scale=None, linear_scale=None, **tensors):
        """(o, [S_L, z_L, den, shift, o_window, argmax]): what linear_bwd needs (empty where absent)."""
        outs = self._run(q, k, v, scale, linear_scale, False, True, tensors)
        return outs[0], list(outs[1:])

    def saved_like(self, q, k, v, *, scale=None, linear_scale=None, **tensors) -> list:
        wq = tensors.get("feature_weight_q")
        plan_json = self._spec_json
        return list(_linear_fwd_fake(q, k, v, tensors.get("g"), wq, None, None, None, None, None, plan_json, "", 1.0,
                                     1.0, False, True)[1:])

    def backward_saved(self, grad_o, o, saved, q, k, v, *, scale=None, linear_scale=None, needs=None,
                       **tensors) -> dict:
        """Gradients from o and the saved aux tensors: the backward kernels only, no forward."""
        call = bind(self.spec, q, k, v, scale=scale, linear_scale=linear_scale, check_values=False, **tensors)
        dims = Dims.of(self.plan, q, k, v, call.feature_weight_q)
        inputs = _op_inputs(self, call)
        fwd_cfg, bwd_cfg = self.configs_for(dims, q.dtype, q.device)
        aux = [None if t.numel() == 0 else t for t in saved]
        out = torch.ops.lincomp.linear_bwd(grad_o.contiguous(), None, None, *inputs["tensors"], o, *aux,
                                           inputs["spec"], config_string(fwd_cfg, bwd_cfg), call.scale,
                                           call.linear_scale)
        dq, dk, dv, dg, dwq, dwk, dsinks, dcoef = [None if t.numel() == 0 else t for t in out[:8]]
        coef = "alpha" if self.spec.combine == "sum" else "window_gamma"
        return {"q": dq, "k": dk, "v": dv, "g": dg, "feature_weight_q": dwq, "feature_weight_k": dwk,
                "sink_logits": dsinks, coef: dcoef}

    def _run(self, q, k, v, scale, linear_scale, return_state: bool, want_aux, tensors) -> list:
        """The forward op's outputs [o, S_L, z_L, den, shift, o_window, argmax] for one call."""
        compiling = torch.compiler.is_compiling()
        call = bind(self.spec, q, k, v, scale=scale, linear_scale=linear_scale, return_state=return_state,
                    check_values=not compiling, **tensors)
        self.check_supported(call)
        dims = Dims.of(self.plan, q, k, v, call.feature_weight_q)
        inputs = _op_inputs(self, call)
        choices = self.choices_for(dims, q.dtype, q.device, inputs=inputs)
        fwd_cfg, bwd_cfg = (c.params for c in choices)
        if not compiling:
            self.config = {c.key["kernel"]: c.as_dict() for c in choices}

        def launch(f, b):
            return linear_attention(
                *inputs["tensors"], spec=inputs["spec"], config=config_string(f, b), scale=call.scale,
                linear_scale=call.linear_scale, want_state=bool(return_state), want_aux=want_aux)

        if compiling or q.device.type != "cuda":
            return launch(fwd_cfg, bwd_cfg)
        try:
            return launch(fwd_cfg, bwd_cfg)
        except Exception as e:  # a GPU the configs do not fit: a smaller config, else the reference
            if not _triton_failure(e):
                raise
            small = {**fwd_cfg, "BV": 32, "num_stages": 1}
            try:
                outs = launch(small, {**bwd_cfg, "BV": 32, "num_stages": 1})
            except Exception as e2:
                if not _triton_failure(e2):
                    raise
                raise Unsupported(f"the generated kernel failed on this device: {type(e2).__name__}: "
                                  f"{str(e2)[:200]}") from e2
            self._configs[self._key(dims, q.dtype, q.device)] = (
                Choice("default", small, choices[0].key), Choice("default", {**bwd_cfg, "BV": 32, "num_stages": 1},
                                                                 choices[1].key))
            return outs




def _op_inputs(kernel: LinearKernel, call) -> dict:
    """The custom op's tensor arguments for a bound call (None where a spec does not use one)."""
    spec = kernel.spec
    coef = call.alpha if spec.combine == "sum" else call.window_gamma if spec.combine == "shared" else None
    tensors = (call.q, call.k, call.v, call.g, call.feature_weight_q, call.feature_weight_k,
               call.sink_logits, coef, call.S0, call.z0)
    return {"tensors": tensors, "spec": kernel._spec_json, "scale": call.scale,
            "linear_scale": call.linear_scale}


def compile_linear(spec, **hints) -> LinearKernel:
    """A :class:`LinearKernel` for ``spec`` (needs ``spec.linear``). Generates and imports the module now
    (so ``kernel.source`` is real); compiles for the device on first call."""
    kernel = LinearKernel(spec, **hints)
    load_module(kernel.plan, kernel.source)
    return kernel


__all__ = ["compile_linear", "LinearKernel"]
