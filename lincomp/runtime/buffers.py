"""Output buffers every backend allocates, and the one poison switch.

With ``LINCOMP_POISON_OUTPUTS=1`` every kernel output starts as NaN instead of uninitialised memory,
so an element a generated kernel forgets to write shows up in a comparison against the reference
(the test suites set it). Triton and TVM kernels both allocate through :func:`alloc_output`.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Dict, Iterator, List

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


class Scratch:
    """Intermediate buffers of a call (feature maps, the linear branch's num / den, ...), kept between calls.

    A fresh multi-MB ``torch.empty`` comes from mmap: the kernel then page-faults every page of it in
    (measured on a hybrid at L=4096: a quarter of the call). ``with scratch.lease() as get:`` hands out one
    set of buffers, ``get(name, shape)``, reused by the next call of the same shapes (a new shape replaces
    the old buffer); concurrent calls each lease their own set. Only buffers that die with the call may come
    from here, never an output. Under the poison switch a reused buffer is refilled with NaN.
    """

    def __init__(self, keep: int = 2):
        self._lock = threading.Lock()
        self._free: List[Dict[str, torch.Tensor]] = []
        self._keep = keep

    @contextmanager
    def lease(self) -> Iterator:
        with self._lock:
            bufs = self._free.pop() if self._free else {}

        def get(name: str, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            t = bufs.get(name)
            if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                t = bufs[name] = alloc_output(tuple(shape), dtype)
            elif poisoning():
                t.fill_(float("nan"))
            return t
        try:
            yield get
        finally:
            with self._lock:
                if len(self._free) < self._keep:
                    self._free.append(bufs)

    def clear(self) -> None:
        """Free the kept buffers (they come back, at their first-call cost, on the next call)."""
        with self._lock:
            self._free.clear()


__all__ = ["POISON_ENV", "poisoning", "alloc_output", "Scratch"]
