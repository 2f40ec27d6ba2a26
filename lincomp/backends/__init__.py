"""Ways to install lincomp kernels into models. ``dynamo``: the ``torch.compile(backend="lincomp")`` backend.

Importing this package is cheap (torch and lincomp's light modules only); Inductor loads on first compile.
"""

from lincomp.backends.dynamo import CallSite, lincomp_backend, parse_options, rewrite, rewrite_report

__all__ = ["lincomp_backend", "CallSite", "parse_options", "rewrite", "rewrite_report"]
