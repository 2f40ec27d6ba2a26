"""bf16 inputs on the TVM window kernel: the AVX-512 BF16 dot-product variant (window.py, ``bf16=True``)
against the fp64 reference on the bf16-rounded inputs, within SEMANTICS' half-precision bound (1e-2); the
variants and CPUs without it widen to fp32 and say why."""

import pytest
import torch

pytest.importorskip("tvm")

from hypothesis import given, settings, strategies as st  # noqa: E402

import lincomp  # noqa: E402
from lincomp import presets  # noqa: E402
from lincomp.lower.tvmir import build  # noqa: E402
from lincomp.reference import reference  # noqa: E402
from lincomp.testing import random_inputs, rel_err, spec_strategy  # noqa: E402

BF16_TOL = 1e-2
needs_bf16 = pytest.mark.skipif(not build.bf16_dot(), reason="this CPU has no AVX-512 BF16 (vdpbf16ps)")


def _bf16(x: dict) -> dict:
    return {n: (t.bfloat16() if n in ("q", "k", "v") else t) for n, t in x.items()}


def _oracle(spec, xb: dict) -> torch.Tensor:
    """The fp64 reference on exactly the bf16 values the kernel saw."""
    return reference(spec, **{n: (t.double() if torch.is_tensor(t) and t.is_floating_point() else t)
                              for n, t in xb.items()})


def _run(spec, xb, **kw):
    kern = lincomp.compile(spec, target="tvm", **kw)
    with torch.no_grad():
        o = kern(**xb)
    return kern, o


@needs_bf16
@settings(deadline=None)
@given(spec=spec_strategy(linear=False, hybrids=False), data=st.data())
def test_random_window_specs_bf16(spec, data):
    H = data.draw(st.sampled_from([1, 2, 4]), label="H")
    Hkv = data.draw(st.sampled_from([h for h in (1, 2, 4) if H % h == 0]), label="Hkv")
    L = data.draw(st.integers(1, 70), label="L")
    D = data.draw(st.sampled_from([16, 32]), label="D")
    B = data.draw(st.integers(1, 2), label="B")
    xb = _bf16(random_inputs(spec, B=B, H=H, Hkv=Hkv, L=L, D=D, seed=data.draw(st.integers(0, 999), label="seed")))
    kern, o = _run(spec, xb)
    assert o.dtype == torch.bfloat16
    assert "lincomp_dpbf16" in kern.source, "the bf16 kernel did not run"
    assert rel_err(o, _oracle(spec, xb)) <= BF16_TOL, (spec.summary(), kern.config)


@needs_bf16
@pytest.mark.parametrize("name", ["clear", "pool", "sta", "sinks"])
def test_paper_windows_bf16(name):
    spec = {"clear": presets.clear(radius=2, grid=(8, 8), text_tokens=5),
            "pool": presets.clear_pool(radius=2, factor=2, grid=(8, 8), text_tokens=5),
            "sta": presets.sta(grid=(2, 4, 4), tile=(1, 2, 2), kernel=(1, 1, 1)),
            "sinks": presets.sliding_window(9, sinks=3)}[name]
    L = 32 if name in ("sta", "sinks") else 69
    xb = _bf16(random_inputs(spec, H=2, L=L, D=32, seed=5))
    kern, o = _run(spec, xb)
    assert "lincomp_dpbf16" in kern.source
    assert rel_err(o, _oracle(spec, xb)) <= BF16_TOL


@needs_bf16
def test_bf16_extreme_values():
    """Huge logits (exp2 saturates both ways), sinks switched off, padded keys and a fully padded row."""
    spec = presets.sliding_window(7, sinks=2)
    x = random_inputs(spec, B=2, H=2, L=40, D=16, seed=7)
    x["q"] = x["q"] * 300.0
    x["sink_logits"] = torch.tensor([[float("-inf"), 2.0], [float("-inf"), float("-inf")]])
    kpm = torch.rand(2, 40, generator=torch.Generator().manual_seed(1)) > 0.3
    kpm[1] = False
    xb = _bf16(x)
    kern, o = _run(spec, dict(xb, key_padding_mask=kpm))
    assert "lincomp_dpbf16" in kern.source
    assert torch.isfinite(o).all()
    ref = reference(spec, **{n: t.double() for n, t in xb.items()}, key_padding_mask=kpm)
    assert rel_err(o[0], ref[0]) <= BF16_TOL
    assert (o[1] == 0).all()   # no visible key and no sink: 0, as the reference


@needs_bf16
def test_bf16_nan_reaches_the_output():
    spec = presets.sliding_window(5)
    xb = _bf16(random_inputs(spec, H=1, L=20, D=16, seed=8))
    xb["v"][0, 0, 3, 1] = float("nan")
    _, o = _run(spec, xb)
    # the reference's P @ V is a dense product: 0 * NaN poisons column 1 of every row, and only it
    assert torch.equal(torch.isnan(o), torch.isnan(_oracle(spec, xb)))
    assert torch.isnan(o[..., 1]).all() and not torch.isnan(o[..., 2:]).any()


def test_bf16_widened_without_the_dot_product(monkeypatch):
    """A CPU without AVX-512 BF16 (or a hybrid spec) runs the fp32 kernel on widened inputs, and says why."""
    spec = presets.sliding_window(5)
    monkeypatch.setattr(build, "bf16_dot", lambda: False)
    xb = _bf16(random_inputs(spec, H=2, L=33, D=16, seed=9))
    kern, o = _run(spec, xb)
    assert o.dtype == torch.bfloat16 and "lincomp_dpbf16" not in kern.source
    assert rel_err(o, _oracle(spec, xb)) <= BF16_TOL
    from lincomp.lower.tvmir.kernel import Sizes
    sizes = Sizes(2, 2, 16, 16, None, None, None)
    assert "AVX-512 BF16" in kern.bf16_unsupported(sizes, {"window": kern.config["window_fwd"]["params"]})


@needs_bf16
@pytest.mark.parametrize("why", ["hybrid", "head dim", "block_m"])
def test_bf16_unsupported_variants_widen(why):
    spec = presets.lizard(window=6, feature_dim=4) if why == "hybrid" else presets.sliding_window(5)
    D = 24 if why == "head dim" else 16   # Dv = 24 is no multiple of 16
    config = {"window": {"block_m": 8, "block_n": 8}} if why == "block_m" else None
    xb = _bf16(random_inputs(spec, H=2, L=33, D=D, seed=10))
    kern, o = _run(spec, xb, config=config)
    assert o.dtype == torch.bfloat16 and "lincomp_dpbf16" not in kern.source
    assert rel_err(o, _oracle(spec, xb)) <= BF16_TOL
