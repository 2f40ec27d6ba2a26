"""The reference oracle: the exact math of docs/semantics.md in plain PyTorch (any dtype, fp64 too).

``lincomp.reference(spec, q, k, v, **tensors)`` calls :func:`reference` here: this package is
callable, so the public name works whether Python resolves it to the package or the function.
"""

import sys
import types

from lincomp.reference.decode import ReferenceDecoder
from lincomp.reference.masks import allowed_mask, visible, window_mask
from lincomp.reference.oracle import FORMS, reference

__all__ = ["reference", "ReferenceDecoder", "visible", "window_mask", "allowed_mask", "FORMS"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return reference(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
