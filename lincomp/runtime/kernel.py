"""The ``Kernel`` every backend returns from ``lincomp.compile`` (DESIGN.md public contract).

``kernel(q, k, v, **tensors) -> o``; ``kernel(..., initial_state=s, return_state=True) -> (o, state)``;
``kernel(..., cu_seqlens=c)`` runs a packed row of documents (see :mod:`lincomp.runtime.varlen`);
``kernel.source`` is the generated code, ``kernel.config`` the tuned choice and ``kernel.lowered`` the IR
(:func:`lincomp.ir.lower`) it was generated from.
"""

from __future__ import annotations

import warnings
from typing import Optional

from lincomp.ir.lowered import Lowered, lower
from lincomp.layout import call_in_layout
from lincomp.reference import reference
from lincomp.runtime.varlen import run_packed
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

    @property
    def lowered(self) -> Lowered:
        """The IR this kernel was built from (rule, reach, tensors, algorithm; ``lincomp.ir.lower``)."""
        return lower(self.spec)

    def forward(self, q, k, v, **kwargs):
        raise NotImplementedError

    def tune(self, q, k, v, *, force: bool = False, progress=True, db=None, **tensors) -> list:
        """Autotune for these inputs' device, dtype and shape bucket; store results in the tuning db.

        Returns one ``lincomp.tuning.TuneResult`` per tuned kernel (empty: nothing to tune).
        """
        return []

    def __call__(self, q, k, v, *, layout: Optional[str] = None, cu_seqlens=None, **kwargs):
        if layout != "bhld":   # [B, L, H, D] tensors, or a check that [B, H, L, D] ones are not those (lincomp.layout)
            return call_in_layout(self.__call__, layout, q, k, v, dict(kwargs, cu_seqlens=cu_seqlens))
        if cu_seqlens is not None:   # a packed row: its documents, grouped by length, through _call
            return run_packed(self._call, self.spec, q, k, v, cu_seqlens, **kwargs)
        return self._call(q, k, v, **kwargs)

    def _call(self, q, k, v, **kwargs):
        """One unpacked call: ``forward``, or the reference (with a warning) when it is Unsupported."""
        try:
            return self.forward(q, k, v, **kwargs)
        except Unsupported as why:
            return self._fallback(why, q, k, v, **kwargs)

    def _fallback(self, why, q, k, v, **kwargs):
        """The reference for a call this kernel cannot run, with a warning saying why (tensors [B, H, L, D])."""
        warn_fallback(self.target, why)
        return reference(self.spec, q, k, v, layout="bhld", **kwargs)

    # -- training: the forward saves what the backward needs, so it runs once ------------------------
    def forward_saved(self, q, k, v, **kwargs) -> tuple:
        """(o, saved): the output and the tensors :meth:`backward_saved` needs, or ``saved=None`` when
        this kernel has no backward of its own (or fell back to the reference for this call): the
        gradient then comes from the reference. Subclasses override :meth:`forward_and_save`."""
        try:
            return self.forward_and_save(q, k, v, **kwargs)
        except Unsupported as why:
            return self._fallback(why, q, k, v, **kwargs), None

    def forward_and_save(self, q, k, v, **kwargs) -> tuple:
        """(o, saved list) for kernels with a backward; default: (o, None)."""
        return self.forward(q, k, v, **kwargs), None

    def saved_like(self, q, k, v, **kwargs) -> list:
        """Empty tensors shaped like ``forward_and_save``'s saved list (shape arithmetic only: fake
        implementations call it with fake tensors). Default: nothing saved."""
        return []

    def backward_unsupported(self) -> Optional[str]:
        """Why this kernel's backward cannot differentiate its spec (a kernel family that covers only part
        of the specs), else None. The custom op then differentiates the reference directly, with a warning."""
        return None

    def has_backward(self) -> bool:
        """True when :meth:`backward_saved` covers this kernel's spec (the op then trains on the kernels)."""
        return type(self).backward_saved is not Kernel.backward_saved and self.backward_unsupported() is None

    def backward_saved(self, grad_o, o, saved: list, q, k, v, needs=None, **kwargs) -> dict:
        """{input name: gradient} (q, k, v and the float tensors in ``kwargs``; None where zero) of
        ``sum(grad_o * o)``, from the forward's ``saved`` list; no forward is run again. ``needs``: the names
        whose gradient the caller wants (None: all); a kernel may skip the work of the others (missing or None)."""
        raise NotImplementedError(f"{type(self).__name__} saves nothing; its gradient comes from the reference")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target!r}, spec={self.spec!r}, config={self.config})"


def wants(needs, *names: str) -> bool:
    """Whether a backward given ``needs`` (:meth:`Kernel.backward_saved`; None: all) must form the gradient of
    any of ``names``."""
    return needs is None or any(n in needs for n in names)


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
        return reference(self.spec, q, k, v, layout="bhld", **kwargs)
