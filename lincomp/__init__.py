"""lincomp: declared attention variants (local windows, gated linear attention, hybrids) compiled to
generated Triton (GPU) and TVM (CPU) kernels, autotuned per device, installed into real models.

``import lincomp`` is cheap: triton, tvm, transformers and diffusers load on first use.
"""

from lincomp.spec import AttentionSpec, GridWindow, LinearBranch, TerracedWindow, Window1D
from lincomp import presets

__version__ = "0.1.0"

_LAZY = {
    "reference": ("lincomp.reference", None),   # a callable package: lincomp.reference(spec, q, k, v)
    "ReferenceDecoder": ("lincomp.reference", "ReferenceDecoder"),
    "compile": ("lincomp.compiler", "compile"),
    "Kernel": ("lincomp.runtime.kernel", "Kernel"),
    "tune": ("lincomp.autotune", "tune"),
    "linearize": ("lincomp.models", "linearize"),
    "distill": ("lincomp.models.distill", "distill"),
    "TritonDecoder": ("lincomp.lower.triton.decode", "TritonDecoder"),
    "TVMDecoder": ("lincomp.lower.tvm", "TVMDecoder"),
    "TuningDB": ("lincomp.tuning", "TuningDB"),
    "from_mask_mod": ("lincomp.ir.flex", "from_mask_mod"),
    "spec_json_schema": ("lincomp.spec_schema", "spec_json_schema"),
}


_SUBMODULES = ("distributed", "models", "nn", "backends", "tuning", "ir", "reference", "testing", "presets")


def __getattr__(name):
    if name in _SUBMODULES and name not in _LAZY:
        import importlib
        return importlib.import_module(f"lincomp.{name}")
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        module = importlib.import_module(mod)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lincomp' has no attribute {name!r}")


__all__ = ["AttentionSpec", "Window1D", "TerracedWindow", "GridWindow", "LinearBranch", "presets",
           *_LAZY]
