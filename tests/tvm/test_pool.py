"""TVM kernels with CLEAR's pooled keys (``window.pool``) against the fp64 reference (NaN-poisoned outputs):
the forward, and the backward against fp64 reference autograd (d pool_weight included)."""

import pytest
import torch
from hypothesis import given, strategies as st

from lincomp.spec import AttentionSpec
from lincomp.testing import examples

pytest.importorskip("tvm")


def _pool_spec(data):
    ndim = data.draw(st.sampled_from([2, 3]), label="ndim")
    grid = ([data.draw(st.sampled_from([2, 3]), label="frames")] if ndim == 3 else []) + \
        [data.draw(st.sampled_from([4, 6, 8]), label="rows"), data.draw(st.sampled_from([4, 6, 8]), label="cols")]
    pool = [data.draw(st.sampled_from([f for f in (1, 2, 3, 4) if g % f == 0]), label=f"f{a}")
            for a, g in enumerate(grid)]
    shape = data.draw(st.sampled_from(["circle", "square"]), label="shape")
    return AttentionSpec(window={"kind": f"{ndim}d", "grid": grid, "shape": shape, "pool": pool,
                                 "radius": data.draw(st.integers(1 if shape == "circle" else 0, 3), label="r")},
                         prefix=data.draw(st.integers(0, 5), label="prefix"),
                         sinks=data.draw(st.integers(0, 2), label="sinks"))


@examples(10)
@given(data=st.data())
def test_pooled_forward_matches_reference(check, data):
    spec = _pool_spec(data)
    H = data.draw(st.sampled_from([1, 2, 4]), label="H")
    Hkv = data.draw(st.sampled_from([h for h in (1, 2, 4) if H % h == 0]), label="Hkv")
    bm = 16 if len(spec.window.grid) == 2 else 32
    config = {"window": {"block_m": bm, "block_n": bm, "kv_group": data.draw(st.sampled_from([1, 2]), label="G")}}
    check(spec, B=data.draw(st.integers(1, 2), label="B"), H=H, Hkv=Hkv, D=8, config=config,
          seed=data.draw(st.integers(0, 999), label="seed"))


def test_clear_df4_shape_and_pool_weight_matter(check):
    """The CLEAR preset layout at a small grid (4x4 cells of 4x4 tokens + text tokens), and a different
    pool_weight changes the output (the weights reach the kernel)."""
    import lincomp
    from lincomp import presets
    from lincomp.testing import random_inputs, rel_err
    spec = presets.clear_pool(radius=3, factor=4, grid=(16, 16), text_tokens=8)
    kern, _ = check(spec, H=2, D=16)
    x = random_inputs(spec, H=2, D=16)
    with torch.no_grad():
        a = kern(**x)
        b = kern(**dict(x, pool_weight=x["pool_weight"].flip(0)))
    assert rel_err(a, b) > 1e-3
    assert kern is not None and lincomp.compile(spec, target="tvm").source


# ------------------------------------------------------------------------------------- the backward
@examples(8)
@given(data=st.data())
def test_pooled_backward_matches_reference(data):
    """Direct kernel calls on leaves that require grad: dq, dk, dv, d pool_weight (and d sink_logits) of random
    pooled specs (2d / 3d, prefix, sinks, GQA, both dq strategies) within 1e-4 of fp64 reference autograd."""
    import lincomp
    from lincomp.testing import random_inputs
    from tests.tvm.test_window_backward import check_grads
    spec = _pool_spec(data)
    H = data.draw(st.sampled_from([1, 2, 4]), label="H")
    Hkv = data.draw(st.sampled_from([h for h in (1, 2, 4) if H % h == 0]), label="Hkv")
    block = data.draw(st.sampled_from([16, 32]), label="block")
    split = data.draw(st.booleans(), label="split_dq")
    x = random_inputs(spec, B=data.draw(st.integers(1, 2), label="B"), H=H, Hkv=Hkv, D=8,
                      seed=data.draw(st.integers(0, 999), label="seed"))
    kern = lincomp.compile(spec, target="tvm", config={"window_bwd": {"block_m": block, "block_n": block,
                                                                      "split_dq": split}})
    assert kern.has_backward()
    errs = check_grads(spec, x, kern)
    assert "dpool_weight" in errs and kern.config["window_bwd"]["params"]["split_dq"] is split
    assert "def pooled_bwd_dkdv" in kern.source and ("def pooled_bwd_dq" in kern.source) == split

