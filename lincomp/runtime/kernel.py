"""The ``Kernel`` every backend returns from ``lincomp.compile`` (DESIGN.md public contract).

``kernel(q, k, v, **tensors) -> o``; ``kernel(..., initial_state=s, return_state=True) -> (o, state)``;
``kernel.source`` is the generated code and ``kernel.config`` the tuned choice.
"""

from __future__ import annotations

import warnings
from typing import Optional

from lincomp.spec import AttentionSpec


class Unsupported(Exception):
    """A kernel cannot handle this input; the caller falls back to a correct path with a warning."""


class LincompFallbackWarning(UserWarning):
    """Emitted whenever a call runs on a slower correct path instead of the requested kernel."""


class Kernel:
    """Base class: subclasses set ``target``, ``source``, ``config`` and implement ``forward``."""

    target = "abstract"
    differentiable = False   # True when autograd flows through forward() (Triton, the reference)

    def __init__(self, spec, source: str = "", config: Optional[dict] = None):
        self.spec = AttentionSpec.coerce(spec)
        self.source = source
        self.config = dict(config or {})

    def forward(self, q, k, v, **kwargs):
        raise NotImplementedError

    def tune(self, q, k, v, *, force: bool = False, progress=True, db=None, **tensors) -> list:
        """Autotune for these inputs' device, dtype and shape bucket; store results in the tuning db.

        Returns one ``lincomp.tuning.TuneResult`` per tuned kernel (empty: nothing to tune).
        """
        return []

    def __call__(self, q, k, v, *, layout: Optional[str] = None, **kwargs):
        if layout != "bhld":   # [B, L, H, D] tensors, or a check that [B, H, L, D] ones are not those (lincomp.layout)
            from lincomp.layout import call_in_layout
            return call_in_layout(self.__call__, layout, q, k, v, kwargs)
        try:
            return self.forward(q, k, v, **kwargs)
        except Unsupported as why:
            warn_fallback(self.target, why)
            from lincomp.reference import reference
            return reference(self.spec, q, k, v, layout="bhld", **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target!r}, spec={self.spec!r}, config={self.config})"


def warn_fallback(target: str, why) -> None:
    warnings.warn(f"lincomp: the {target} kernel cannot run this call ({why}); using the reference "
                  "(correct, slower)", LincompFallbackWarning, stacklevel=3)


class ReferenceKernel(Kernel):
    """The oracle behind the Kernel interface (any device, any dtype; differentiable)."""

    target = "reference"
    differentiable = True

    def __init__(self, spec, **hints):
        super().__init__(spec, source="# plain PyTorch: lincomp.reference.oracle", config={})

    def forward(self, q, k, v, **kwargs):
        from lincomp.reference import reference
        return reference(self.spec, q, k, v, layout="bhld", **kwargs)
