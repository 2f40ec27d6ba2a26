"""``lincomp.compile(spec, target)``: spec -> ``lincomp.ir.lower`` -> a backend -> a Kernel."""

from __future__ import annotations

import importlib

from lincomp.ir.lowered import lower
from lincomp.runtime.kernel import Kernel, ReferenceKernel, warn_fallback
from lincomp.spec import AttentionSpec

TARGETS = ("auto", "triton", "tvm", "reference")
# target -> (module, function(spec, **hints) -> Kernel); imported on first use only.
_BUILDERS = {"triton": ("lincomp.lower.triton", "compile_triton"), "tvm": ("lincomp.lower.tvm", "compile_tvm")}


def _build(target: str, spec: AttentionSpec, hints: dict) -> Kernel:
    if target == "reference":
        return ReferenceKernel(spec, **hints)
    module, fn = _BUILDERS[target]
    return getattr(importlib.import_module(module), fn)(spec, **hints)


class AutoKernel(Kernel):
    """Chooses per call: Triton for CUDA tensors, TVM for CPU tensors, the reference otherwise."""

    target = "auto"

    def __init__(self, spec, **hints):
        super().__init__(spec)
        self.hints = hints
        self._kernels = {}
        self._last = None   # the kernel of the latest call: what ``config`` and ``chosen`` report

    @property
    def chosen(self):
        """The concrete kernel (Triton / TVM / reference) of the latest call; None before the first call."""
        return self._last

    @property
    def config(self):
        """The latest call's kernel config (``{kernel name: {"source", "params", "key"}}``); {} before a call."""
        return {} if self._last is None else self._last.config

    @config.setter
    def config(self, value):
        pass

    def kernel_for(self, device) -> Kernel:
        target = "triton" if device.type == "cuda" else "tvm" if device.type == "cpu" else "reference"
        if target not in self._kernels:
            try:
                self._kernels[target] = _build(target, self.spec, self.hints)
            except Exception as e:  # not installed, or this spec does not lower: stay correct, say why
                warn_fallback(target, f"{target} could not build this spec: {type(e).__name__}: {e}")
                self._kernels[target] = ReferenceKernel(self.spec)
        return self._kernels[target]

    @property
    def source(self):
        return "\n\n".join(k.source for k in self._kernels.values())

    @source.setter
    def source(self, value):
        pass

    def forward(self, q, k, v, **kwargs):
        self._last = self.kernel_for(q.device)
        return self._last(q, k, v, layout="bhld", **kwargs)


def compile(spec, target: str = "auto", **hints) -> Kernel:
    """Lower ``spec`` (an AttentionSpec, dict or JSON path) to a kernel for ``target``.

    ``target``: "triton" (CUDA GPUs; the interpreter with TRITON_INTERPRET=1), "tvm" (CPU via LLVM),
    "reference" (plain PyTorch), or "auto" (chosen per call from the tensors' device).
    """
    spec = AttentionSpec.coerce(spec)
    lower(spec)   # the IR every backend below reads (rule, reach, algorithm): built once per spec key, cached
    if target not in TARGETS:
        raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
    if target == "auto":
        return AutoKernel(spec, **hints)
    return _build(target, spec, hints)
