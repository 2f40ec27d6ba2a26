"""Triton lowering: softmax-only specs go to the window templates, everything with a linear branch
(pure linear, ``combine="shared"``, ``combine="sum"``) to the linear / hybrid templates.

Each family is four one-way layers (enforced by the import-linter contracts in pyproject.toml):
codegen (``window``, ``linear``: spec -> generated source, on ``common``) -> launch (``window_launch``,
``linear_launch``: configs, launchers, tuning) -> op (``window_op``, ``linear_op``: torch.library custom
ops) -> Kernel (``window_kernel``, ``linear_kernel``, ``decode``). Nothing here imports triton until a
kernel is loaded.
"""

from lincomp.lower.triton.decode import DecodeState, TritonDecoder
from lincomp.lower.triton.linear_kernel import LinearKernel, compile_linear
from lincomp.lower.triton.window_kernel import WindowKernel, compile_window
from lincomp.spec import AttentionSpec


def compile_triton(spec, **hints):
    """A Triton :class:`~lincomp.runtime.kernel.Kernel` for ``spec`` (CUDA, or the interpreter on CPU)."""
    spec = AttentionSpec.coerce(spec)
    if spec.linear is None:
        return compile_window(spec, **hints)
    return compile_linear(spec, **hints)


__all__ = ["compile_triton", "compile_window", "compile_linear", "WindowKernel", "LinearKernel", "TritonDecoder",
           "DecodeState"]
