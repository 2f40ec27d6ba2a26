"""Output buffers every backend allocates, and the one poison switch.

With ``LINCOMP_POISON_OUTPUTS=1`` every kernel output starts as NaN instead of uninitialised memory,
so an element a generated kernel forgets to write shows up in a comparison against the reference
(the test suites set it). Triton and TVM kernels both allocate through :func:`alloc_output`.
"""

from __future__ import annotations

import os

import torch

POISON_ENV = "LINCOMP_POISON_OUTPUTS"


def poisoning() -> bool:
    """True when ``LINCOMP_POISON_OUTPUTS=1``: outputs are filled with NaN before a kernel writes them."""
    return os.environ.get(POISON_ENV, "0").strip() == "1"


def alloc_output(shape, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """An output buffer of ``shape``: uninitialised, or all NaN under the poison switch."""
    if poisoning():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


__all__ = ["POISON_ENV", "poisoning", "alloc_output"]
