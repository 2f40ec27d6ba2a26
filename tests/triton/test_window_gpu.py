"""The generated window kernels compiled for a CUDA GPU (skipped without one): bf16 / fp16 / fp32
against the fp32 reference, head dims 32..256, grid tilings, autotuning and the tuning db."""

import pytest
import torch

pytest.importorskip("triton")

import lincomp  # noqa: E402
from lincomp.spec import AttentionSpec, GridWindow, Window1D  # noqa: E402
from lincomp.testing import random_inputs, rel_err  # noqa: E402

pytestmark = pytest.mark.gpu

SPECS = {
    "swa-sinks": (AttentionSpec(window=Window1D(127, 0), causal=True, sinks=4), 1000),
    "bidir-1d-prefix": (AttentionSpec(window=Window1D(40, 17), prefix=9), 777),
    "terraced": (AttentionSpec(window={"kind": "terraced", "block": 64}, causal=True), 513),
    "clear": (AttentionSpec(window=GridWindow((24, 40), 8, "circle"), prefix=77), None),
    "3d-square": (AttentionSpec(window=GridWindow((3, 10, 12), 2, "square"), causal=True, prefix=5), None),
    "dense": (AttentionSpec(), 300),
    "dense-causal": (AttentionSpec(causal=True), 300),
}


def _check(spec, L, dtype, D, Hkv=2, kpm=False, tol=1e-2, config=None):
    inp = random_inputs(spec, B=2, H=4, Hkv=Hkv, L=L, D=D, dtype=dtype, device="cuda", seed=0)
    if kpm:
        m = torch.rand(2, inp["q"].shape[2], device="cuda") > 0.3
        m[1, :] = False   # every row of batch 1 sees no key
        inp["key_padding_mask"] = m
    names = [n for n in ("q", "k", "v", "sink_logits") if n in inp]
    kern = lincomp.compile(spec, target="triton", **({"config": config} if config else {}))
    leaves = {n: (t.clone().requires_grad_(n in names) if t.is_floating_point() else t) for n, t in inp.items()}
    o = kern(**leaves)
    do = torch.randn_like(o)
    g = torch.autograd.grad(o, [leaves[n] for n in names], do)
    ref_in = {n: (t.detach().float().requires_grad_(n in names) if t.is_floating_point() else t) for n, t in inp.items()}
    r = lincomp.reference(spec, **ref_in)
    gr = torch.autograd.grad(r, [ref_in[n] for n in names], do.float())
    assert rel_err(o, r) <= tol
    for n, a, b in zip(names, g, gr):
        assert rel_err(a, b) <= tol, n
    return kern


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(name, dtype):
    spec, L = SPECS[name]
    _check(spec, L, dtype, D=64)


@pytest.mark.parametrize("D", [32, 96, 128, 256])
def test_head_dims(D):
    _check(*SPECS["clear"], torch.bfloat16, D=D)
    _check(*SPECS["swa-sinks"], torch.bfloat16, D=D)


def test_fp32_ieee():
    _check(*SPECS["swa-sinks"], torch.float32, D=64, tol=1e-4)
    _check(*SPECS["clear"], torch.float32, D=64, tol=1e-4)


def test_key_padding_mask():
    _check(*SPECS["bidir-1d-prefix"], torch.bfloat16, D=64, kpm=True)


@pytest.mark.parametrize("config", [{"block_m": 128, "block_n": 128, "tile": [16, 8], "num_warps": 8, "num_stages": 2},
                                    {"block_m": 32, "block_n": 32, "tile": [4, 8], "num_warps": 4, "num_stages": 3}])
def test_grid_tilings(config):
    _check(*SPECS["clear"], torch.bfloat16, D=64, config=config)


def test_tuning_is_stored_and_reused(tmp_path):
    from lincomp.lower.triton.window_launch import tune_window
    from lincomp.tuning import TuningDB
    spec = AttentionSpec(window=Window1D(255, 0), causal=True)
    db = TuningDB(tmp_path, shipped=None)
    first = tune_window(spec, L=2048, H=4, D=64, db=db)
    assert not first["window_fwd"].cached and not first["window_bwd"].cached
    second = tune_window(spec, L=2000, H=4, D=64, db=db)   # same length bucket: no work
    assert second["window_fwd"].cached and second["window_bwd"].cached
    assert second["window_fwd"].config == first["window_fwd"].config
