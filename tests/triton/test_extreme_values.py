"""Extreme but valid values on the Triton kernels (the interpreter on a CPU machine) against the fp64
reference (issue 19): sink logits from -inf to +1e4, log gates from -1e4 to 0, window_gamma down to 1e-8,
softmax scores up to 1e4, head dims up to 512. Tiny shapes: the interpreter runs one program at a time."""

import pytest
import torch

pytest.importorskip("triton")

from hypothesis import assume, given  # noqa: E402

import lincomp  # noqa: E402
from lincomp.reference import reference  # noqa: E402
from lincomp.testing import case_tolerance, examples, extreme_case, random_inputs, rel_err  # noqa: E402

pytestmark = pytest.mark.interpreter   # tests/conftest.py sets TRITON_INTERPRET=1 on a CPU-only machine
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _double(x: dict) -> dict:
    return {k: (tuple(t.double() for t in v) if isinstance(v, tuple) else
                v.double() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}


def _run(spec, x):
    x = {k: (tuple(t.to(DEVICE) for t in v) if isinstance(v, tuple) else
             v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    with torch.no_grad():
        return lincomp.compile(spec, target="triton")(**x).cpu()


def _known_limit(spec) -> bool:
    """Non-causal combine="shared" computes the out-of-window linear part as (all keys) - (in-window keys):
    a small window_gamma makes that cancel (see test_noncausal_shared_tiny_gamma_known_limit)."""
    return spec.combine == "shared" and not spec.causal


@examples(8)
@given(case=extreme_case(head_dims=(8, 16), max_len=10, windows=("1d", "terraced", None)))
def test_extreme_values_match_reference(case):
    spec, x = case
    assume(not _known_limit(spec))
    assert rel_err(_run(spec, x), reference(spec, **_double(x))) <= case_tolerance(spec, x)


@pytest.mark.slow
@examples(40)
@given(case=extreme_case(head_dims=(8, 16, 64, 256, 512), max_len=20))
def test_extreme_values_match_reference_long(case):
    spec, x = case
    assume(not _known_limit(spec))
    assert rel_err(_run(spec, x), reference(spec, **_double(x))) <= case_tolerance(spec, x)


@pytest.mark.parametrize("hybrid", [False, True])
def test_sinks_switched_off(hybrid):
    """Issue 19 repro: sink logits of -inf gave NaN on Triton (the window kernel and the "sum" hybrid)."""
    d = {"window": {"kind": "1d", "left": 3, "right": 0}, "causal": True, "sinks": 2}
    if hybrid:
        d.update(linear={"feature_map": "elu1", "normalize": True}, combine="sum")
    spec = lincomp.AttentionSpec.from_dict(d)
    x = random_inputs(spec, H=2, L=10, D=16, seed=1)
    x["sink_logits"] = torch.tensor([[-float("inf")] * 2, [-float("inf"), 2.0]])
    assert rel_err(_run(spec, x), reference(spec, **_double(x))) <= 1e-4


def test_shared_tiny_window_gamma():
    spec = lincomp.AttentionSpec.from_dict({"window": {"kind": "1d", "left": 3, "right": 0}, "causal": True,
                                            "linear": {"feature_map": "elu1"}, "combine": "shared"})
    x = random_inputs(spec, H=2, L=12, D=16, seed=2)
    x["window_gamma"] = torch.tensor([1e-8, 1e-6])
    assert rel_err(_run(spec, x), reference(spec, **_double(x))) <= 1e-4


@pytest.mark.xfail(strict=True, reason="known limit: non-causal combine='shared' on Triton subtracts the "
                                       "in-window terms from the full sum; a tiny window_gamma cancels")
def test_noncausal_shared_tiny_gamma_known_limit():
    spec = lincomp.AttentionSpec.from_dict({"window": {"kind": "1d", "left": 0, "right": 0},
                                            "linear": {"feature_map": "identity"}, "combine": "shared"})
    x = random_inputs(spec, H=1, L=1, D=8, seed=3)
    x["window_gamma"] = torch.tensor([1e-8])
    assert rel_err(_run(spec, x), reference(spec, **_double(x))) <= 1e-4
