"""The Kernel interface's small helpers: ``repr`` (what users see in a REPL or a log) and ``wants`` (which
gradients a backward must form)."""

import lincomp
from lincomp.runtime.kernel import Kernel, wants
from lincomp.spec import AttentionSpec


def test_kernel_repr_names_target_spec_and_config():
    spec = AttentionSpec(window={"kind": "1d", "left": 3, "right": 0}, causal=True)
    kern = lincomp.compile(spec, target="reference")
    text = repr(kern)
    assert text.startswith("ReferenceKernel(target='reference', spec=") and "config={}" in text
    assert "__repr__" in Kernel.__dict__


def test_wants_reads_needs():
    assert wants(None, "q") and wants(("k", "v"), "q", "v")
    assert not wants(("k",), "q", "v") and not wants((), "q")
