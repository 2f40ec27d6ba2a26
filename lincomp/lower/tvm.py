"""``lincomp.compile(spec, target="tvm")``: the spec's kernels as TVM TensorIR compiled by LLVM for this CPU.

Everything lives in :mod:`lincomp.lower.tvmir` (templates, build cache, kernel, decoder); this module is
the entry point ``lincomp.compiler`` imports on first use (so ``import lincomp`` never imports tvm).
"""

from lincomp.lower.tvmir.decode import TVMDecoder
from lincomp.lower.tvmir.kernel import TVMKernel, compile_tvm

__all__ = ["compile_tvm", "TVMKernel", "TVMDecoder"]
