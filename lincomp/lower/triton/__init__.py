"""Triton lowering: softmax-only specs go to the window templates, everything with a linear branch
(pure linear, ``combine="shared"``, ``combine="sum"``) to the linear / hybrid templates."""

from lincomp.spec import AttentionSpec


def compile_triton(spec, **hints):
    """A Triton :class:`~lincomp.runtime.kernel.Kernel` for ``spec`` (CUDA, or the interpreter on CPU)."""
    spec = AttentionSpec.coerce(spec)
    if spec.linear is None:
        from lincomp.lower.triton.window import compile_window
        return compile_window(spec, **hints)
    from lincomp.lower.triton.linear import compile_linear
    return compile_linear(spec, **hints)


from lincomp.lower.triton.decode import DecodeState, TritonDecoder  # noqa: E402,F401  (does not import triton)
