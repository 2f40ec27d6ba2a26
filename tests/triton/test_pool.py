"""Triton window kernels with CLEAR's pooled keys (``window.pool``) under the interpreter (or a GPU):
forward and gradients of q, k, v, sink_logits and pool_weight against the fp64 reference."""

import pytest
import torch

pytest.importorskip("triton")

from hypothesis import given, strategies as st  # noqa: E402

from lincomp.reference import reference  # noqa: E402
from lincomp.runtime.buffers import POISON_ENV  # noqa: E402
from lincomp.spec import AttentionSpec  # noqa: E402
from lincomp.testing import examples, random_inputs, rel_err  # noqa: E402

pytestmark = pytest.mark.interpreter

W = pytest.importorskip("lincomp.lower.triton.window_kernel")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("q", "k", "v", "sink_logits", "pool_weight")


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    with pytest.MonkeyPatch.context() as mp:
        if DEVICE == "cpu":
            mp.setenv("TRITON_INTERPRET", "1")
        mp.setenv(POISON_ENV, "1")
        yield


@examples(4)
@given(data=st.data())
def test_pooled_forward_and_gradients(data):
    ndim = data.draw(st.sampled_from([2, 3]), label="ndim")
    grid = [2] * (ndim - 2) + [data.draw(st.sampled_from([2, 4]), label="rows"), 4]
    pool = [data.draw(st.sampled_from([f for f in (1, 2, 4) if g % f == 0]), label=f"f{a}")
            for a, g in enumerate(grid)]
    spec = AttentionSpec(window={"kind": f"{ndim}d", "grid": grid, "radius": 2, "pool": pool},
                         prefix=data.draw(st.integers(0, 3), label="prefix"),
                         sinks=data.draw(st.integers(0, 2), label="sinks"))
    H = data.draw(st.sampled_from([1, 2]), label="H")
    x = random_inputs(spec, H=H, Hkv=data.draw(st.sampled_from([1, H]), label="Hkv"), D=8, device=DEVICE,
                      seed=data.draw(st.integers(0, 999), label="seed"))
    kern = W.compile_window(spec, config={"block_m": 16, "block_n": 16})
    leaves = {n: t.clone().requires_grad_(n in NAMES) for n, t in x.items()}
    ref_in = {n: t.detach().double().cpu().requires_grad_(n in NAMES) for n, t in x.items()}
    o, r = kern(**leaves), reference(spec, **ref_in)
    assert rel_err(o, r) <= 1e-4
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(0)).to(o.device)
    names = [n for n in NAMES if n in x]
    g = torch.autograd.grad(o, [leaves[n] for n in names], do)
    gr = torch.autograd.grad(r, [ref_in[n] for n in names], do.double().cpu())
    errs = {n: rel_err(a, b) for n, a, b in zip(names, g, gr)}
    assert all(e <= 1e-4 for e in errs.values()), errs
