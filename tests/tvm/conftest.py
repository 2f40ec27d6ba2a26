"""Shared helpers of the TVM tests: NaN-poisoned outputs, a runner comparing a kernel to the fp64 oracle.

Compiled modules are memoised per process (and cached on disk), so every variant compiles once per
session; test shapes stay small (D <= 16) to keep the suite inside its time budget.
"""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _poison():
    """Every kernel output starts as NaN: an element a kernel forgets to write fails the comparison."""
    from lincomp.runtime.buffers import POISON_ENV
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(POISON_ENV, "1")
        yield


def to_double(inputs: dict) -> dict:
    return {k: (tuple(t.double() for t in v) if isinstance(v, tuple) else v.double()) for k, v in inputs.items()}


def compare(spec, *, B=1, H=2, Hkv=None, L=None, D=16, seed=0, initial_state=False, return_state=False,
            config=None, gate_strength=1.0, feature_dim=None, tol=1e-4, key_padding=False):
    """Run the TVM kernel on random inputs and assert rel err <= tol against the fp64 reference.

    ``key_padding``: a random ``key_padding_mask`` (about a third of the keys hidden; with B > 1 the last row
    hides every key, whose queries must output 0)."""
    import lincomp
    from lincomp.reference import reference
    from lincomp.testing import random_inputs, rel_err

    x = random_inputs(spec, B=B, H=H, Hkv=Hkv, L=L, D=D, seed=seed, initial_state=initial_state,
                      gate_strength=gate_strength, feature_dim=feature_dim)
    if key_padding:
        kpm = torch.rand(B, x["q"].shape[2], generator=torch.Generator().manual_seed(seed)) > 0.35
        if B > 1:
            kpm[-1] = False
        x["key_padding_mask"] = kpm
    kern = lincomp.compile(spec, target="tvm", config=config)
    with torch.no_grad():
        out = kern(**x, return_state=return_state)
    ref = reference(spec, **to_double({k: t for k, t in x.items() if k != "key_padding_mask"}),
                    key_padding_mask=x.get("key_padding_mask"), return_state=return_state)
    if return_state:
        (o, (S, z)), (ro, (rS, rz)) = out, ref
        errs = {"o": rel_err(o, ro), "S": rel_err(S, rS), "z": rel_err(z, rz)}
    else:
        errs = {"o": rel_err(out, ref)}
    assert all(e <= tol for e in errs.values()), f"{spec.summary()}: rel err {errs} > {tol} (config {kern.config})"
    return kern, errs


@pytest.fixture(scope="session")
def check():
    """``check(spec, **sizes)``: see :func:`compare`."""
    return compare


@pytest.fixture(scope="session")
def double():
    return to_double
