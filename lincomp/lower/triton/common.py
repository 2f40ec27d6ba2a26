"""What every Triton kernel family (window, linear / hybrid, decode) shares: the interpreter switch,
the templates, power-of-two tile sizes and output buffers (through the one poison switch of
``lincomp.runtime.buffers``).

Imports neither triton nor any kernel family: the bottom layer of ``lincomp.lower.triton``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import string

from lincomp._files import read_template
from lincomp.runtime.buffers import alloc_output as alloc  # noqa: F401  (one poison switch)


@functools.lru_cache(maxsize=None)
def template(name: str) -> string.Template:
    """``templates/triton/<name>`` as a ``string.Template`` (read once)."""
    return string.Template(read_template("triton", name))


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def interpreting() -> bool:
    """True when Triton runs kernels through its interpreter (TRITON_INTERPRET=1): kernels take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def triton_imported_interpreted() -> bool:
    """Whether triton's library functions (tl.zeros, tl.sum: @triton.jit) were made for the interpreter."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction
    return not isinstance(tl.zeros, JITFunction)


@contextlib.contextmanager
def interpreter_env(on: bool):
    """TRITON_INTERPRET set to ``on`` inside the block (restored after)."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


__all__ = ["template", "next_pow2", "alloc", "interpreting", "triton_imported_interpreted", "interpreter_env"]
