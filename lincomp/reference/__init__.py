"""The reference oracle: the exact math of SEMANTICS.md in plain PyTorch (any dtype, fp64 too)."""

from lincomp.reference.decode import ReferenceDecoder
from lincomp.reference.masks import allowed_mask, visible, window_mask
from lincomp.reference.oracle import FORMS, reference

__all__ = ["reference", "ReferenceDecoder", "visible", "window_mask", "allowed_mask", "FORMS"]
