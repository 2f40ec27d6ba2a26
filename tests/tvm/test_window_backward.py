"""TVM window backward kernels (window_bwd.py) against autograd through the fp64 reference: random window
specs and shapes, the custom op's training path, configs and tuning (pooled keys: also tests/tvm/test_pool.py).
Outputs are NaN-poisoned (tests/tvm/conftest.py)."""

import math
import warnings

from typing import Optional

import pytest
import torch

pytest.importorskip("tvm")

from hypothesis import given, strategies as st  # noqa: E402

import lincomp  # noqa: E402
from lincomp import presets  # noqa: E402
from lincomp.backends import ops  # noqa: E402
from lincomp.reference import reference  # noqa: E402
from lincomp.runtime.kernel import LincompFallbackWarning  # noqa: E402
from lincomp.spec import AttentionSpec  # noqa: E402
from lincomp.testing import examples, random_inputs, rel_err, spec_strategy  # noqa: E402
from lincomp.tuning import TuningDB  # noqa: E402

TOL = 1e-4   # docs/semantics.md: fp32 against the fp64 reference

SPECS = {
    "1d-causal-prefix-sinks": AttentionSpec(window={"kind": "1d", "left": 9, "right": 0}, causal=True, prefix=3, sinks=2),
    "1d-band": AttentionSpec(window={"kind": "1d", "left": 5, "right": 7}),
    "terraced": AttentionSpec(window={"kind": "terraced", "block": 4}, causal=True, sinks=1),
    "dense-causal": AttentionSpec(causal=True),
    "2d-circle-prefix": AttentionSpec(window={"kind": "2d", "grid": [5, 7], "radius": 3, "shape": "circle"}, prefix=4,
                                      sinks=1),
    "2d-square": AttentionSpec(window={"kind": "2d", "grid": [6, 5], "radius": 1, "shape": "square"}),
    "3d-circle": AttentionSpec(window={"kind": "3d", "grid": [2, 3, 5], "radius": 2, "shape": "circle"}, prefix=2),
    "2d-tile": AttentionSpec(window={"kind": "2d", "grid": [6, 8], "shape": "tile", "tile": [2, 2], "kernel": [1, 3]}),
    # CLEAR's pooled keys (4x4 cells of 4x4 tokens, text tokens): d pool_weight too (more: tests/tvm/test_pool.py)
    "clear-pool": presets.clear_pool(radius=3, factor=4, grid=(16, 16), text_tokens=8),
}


def _float_inputs(x: dict) -> dict:
    return {n: t for n, t in x.items() if torch.is_tensor(t) and t.is_floating_point()}


def reference_grads(spec, x: dict, g: torch.Tensor) -> dict:
    """{name: d name} of sum(g * o) by autograd through the fp64 reference."""
    leaves = {n: t.double().requires_grad_(True) for n, t in _float_inputs(x).items()}
    o = reference(spec, **leaves, **{n: t for n, t in x.items() if n not in leaves})
    return dict(zip(leaves, torch.autograd.grad(o, list(leaves.values()), g.double()))), o


def check_wanted_grads(spec, x: dict, wanted: list, gains: Optional[dict] = None) -> None:
    """Through ``torch.ops.lincomp.attention(target="tvm", fallback="error")`` with only the ``wanted`` inputs
    requiring grad: each of their gradients within TOL of the fp64 reference's (``gains``: see grad_err)."""
    from lincomp.backends import ops
    leaves = {n: t.clone().requires_grad_(n in wanted) for n, t in x.items()}
    rest = {n: t for n, t in leaves.items() if n not in "qkv"}
    o = torch.ops.lincomp.attention(leaves["q"], leaves["k"], leaves["v"], ops.spec_to_json(spec), target="tvm",
                                    fallback="error", **rest)
    g = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))
    got = dict(zip(wanted, torch.autograd.grad(o, [leaves[n] for n in wanted], g)))
    ref, _ = reference_grads(spec, x, g)
    rows = o.shape[0] * o.shape[2]
    for n in wanted:
        err = grad_err(got[n], ref[n], rows if ref[n].dim() <= 2 else 1, (gains or {}).get(n, 1.0))
        assert err <= TOL, (n, err)


def grad_err(out: torch.Tensor, ref: torch.Tensor, rows: int = 1, gain: float = 1.0) -> float:
    """rel_err, except that a gradient that is (mathematically) zero -- dq, dk of a row that sees one key and
    no sink: ds = p (dp - delta) = 0 -- is compared absolutely, against elements of size 1e-2 (the inputs are
    N(0, 1)): its fp32 value is pure rounding, any relative measure of it is noise. ``rows``: how many row
    terms each element sums (a per-head weight's gradient sums B * L rows: its rounding grows as their root);
    ``gain``: a factor the kernel divides those sums by (d window_gamma = sum of row terms / gamma)."""
    floor = 1e-2 * (ref.numel() * rows) ** 0.5 * gain
    if ref.norm().item() >= floor:
        return rel_err(out, ref)
    return float("inf") if not torch.isfinite(out).all() else (out.double() - ref).norm().item() / floor


def check_grads(spec, x: dict, run, *, fallback_ok: bool = False, seed: int = 0) -> dict:
    """Run ``run(**leaves) -> o`` on leaves that require grad; compare o and every gradient with the reference."""
    leaves = {n: t.clone().requires_grad_(True) for n, t in _float_inputs(x).items()}
    rest = {n: t for n, t in x.items() if n not in leaves}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o = run(**leaves, **rest)
        g = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed))
        grads = dict(zip(leaves, torch.autograd.grad(o, list(leaves.values()), g)))
    fell_back = [w for w in caught if issubclass(w.category, LincompFallbackWarning)]
    assert bool(fell_back) == fallback_ok, [str(w.message) for w in fell_back]
    ref, ro = reference_grads(spec, x, g)
    rows = o.shape[0] * o.shape[2]   # per-head weights (window_gamma, alpha, sinks) sum B * L row terms
    gains = {"window_gamma": 1.0 / max(x["window_gamma"].abs().min().item(), 1e-3)} if "window_gamma" in x else {}
    errs = {"o": rel_err(o, ro), **{f"d{n}": grad_err(grads[n], ref[n], rows if ref[n].dim() <= 2 else 1,
                                                      max(1.0, gains.get(n, 1.0)))
                                    for n in leaves}}
    assert all(e <= TOL for e in errs.values()), f"{spec.summary()}: {errs}"
    return errs


@examples(20)
@given(spec=spec_strategy(linear=False, hybrids=False), data=st.data())
def test_random_specs_grads_match_reference(spec, data):
    """Direct kernel calls on inputs that require grad: dq, dk, dv, d sink_logits of random window specs."""
    H = data.draw(st.sampled_from([1, 2, 4]), label="H")
    Hkv = data.draw(st.sampled_from([h for h in (1, 2, 4) if H % h == 0]), label="Hkv")
    L = data.draw(st.integers(1, 200), label="L")
    D = data.draw(st.sampled_from([8, 16, 32]), label="D")
    B = data.draw(st.integers(1, 2), label="B")
    block = data.draw(st.sampled_from([16, 32]), label="block")
    split = data.draw(st.booleans(), label="split_dq")
    mr_d = data.draw(st.sampled_from([1, 2, 4]), label="mr_d")   # rows per dq / dk / dv step (the tuned space's)
    x = random_inputs(spec, B=B, H=H, Hkv=Hkv, L=L, D=D, seed=data.draw(st.integers(0, 999), label="seed"))
    kern = lincomp.compile(spec, target="tvm", config={"window_bwd": {"block_m": block, "block_n": block,
                                                                      "split_dq": split, "mr_d": mr_d}})
    check_grads(spec, x, kern)
    assert kern.config["window_bwd"]["source"] == "fixed"
    assert kern.config["window_bwd"]["params"]["split_dq"] is split


@pytest.mark.parametrize("name", list(SPECS))
def test_custom_op_trains_on_tvm_kernels(name):
    """torch.ops.lincomp.attention(target="tvm") on leaves that require grad: no fallback, the backward
    kernels ran (their config is recorded), gradients match, GQA heads summed into dk / dv."""
    spec = SPECS[name]
    x = random_inputs(spec, B=2, H=4, Hkv=2, L=53, D=16, seed=7)
    spec_json = ops.spec_to_json(spec)
    kern = ops.get_kernel(spec_json, "tvm", "warn")
    kern.config.pop("window_bwd", None)

    def run(q, k, v, **kw):
        return torch.ops.lincomp.attention(q, k, v, spec_json, target="tvm", **kw)

    check_grads(spec, x, run)
    assert "window_bwd" in kern.config, "the TVM backward did not run"


@pytest.mark.parametrize("split", [False, True])
def test_configs_and_lse(split):
    """Both dq strategies and tile sizes agree; the saved lse2 is the base-2 log-sum-exp with the sinks."""
    spec = SPECS["1d-causal-prefix-sinks"]
    x = random_inputs(spec, B=1, H=2, L=130, D=32, seed=3)
    for bm, bn in ((16, 64), (64, 16)):
        kern = lincomp.compile(spec, target="tvm", config={
            "window": {"block_m": 32, "block_n": 32}, "window_bwd": {"block_m": bm, "block_n": bn, "split_dq": split,
                                                                     "mr": 3, "mr_d": 3}})
        check_grads(spec, x, kern)
        assert "def window_bwd_dkdv" in kern.source and ("def window_bwd_dq" in kern.source) == split
    with torch.no_grad():
        _, (lse2,) = kern.forward_and_save(x["q"], x["k"], x["v"], sink_logits=x["sink_logits"])
    from lincomp.reference import window_mask
    xd = {n: t.double() for n, t in x.items()}
    s = (xd["q"] @ xd["k"].transpose(-1, -2)) / math.sqrt(32)
    s = s.masked_fill(~window_mask(spec, 130), -math.inf)
    sinks = xd["sink_logits"][None, :, None, :].expand(1, 2, 130, spec.sinks)
    want = torch.logsumexp(torch.cat([s, sinks], -1), -1) / math.log(2)
    assert rel_err(lse2, want) <= 1e-6


def test_sinks_switched_off_and_dominant():
    """A sink at -inf adds nothing (d logit 0); a dominant one takes most of the weight."""
    spec = AttentionSpec(window={"kind": "1d", "left": 4, "right": 0}, causal=True, sinks=2)
    x = random_inputs(spec, B=1, H=2, L=40, D=8, seed=5)
    x["sink_logits"] = torch.tensor([[-math.inf, 3.0], [8.0, -30.0]])
    kern = lincomp.compile(spec, target="tvm")
    check_grads(spec, x, kern)


def test_fp16_inputs_get_fp16_grads():
    spec = SPECS["1d-band"]
    x = random_inputs(spec, B=1, H=2, L=33, D=16, seed=11)
    leaves = [x[n].half().requires_grad_(True) for n in "qkv"]
    o = lincomp.compile(spec, target="tvm")(*leaves)
    o.float().sum().backward()
    assert all(t.grad.dtype == torch.float16 and torch.isfinite(t.grad).all() for t in leaves)


def test_tune_stores_backward_config(tmp_path):
    spec = SPECS["1d-band"]
    x = random_inputs(spec, B=1, H=2, L=64, D=16, seed=12)
    db = TuningDB(tmp_path / "db.json")
    kern = lincomp.compile(spec, target="tvm", db=db)
    space = [{"block_m": 16, "block_n": 16, "split_dq": True}, {"block_m": 32, "block_n": 32}]
    results = kern.tune(x["q"], x["k"], x["v"], progress=False, reps=1,
                        space={"window": [{"block_m": 16, "block_n": 16}], "window_bwd": space})
    assert len(results) == 2   # the forward's window part, then window_bwd
    fresh = lincomp.compile(spec, target="tvm", db=db)
    check_grads(spec, x, fresh)
    assert fresh.config["window_bwd"]["source"] == "db"
    with pytest.raises(ValueError, match="window_bwd.block_m"):
        lincomp.compile(spec, target="tvm", config={"window_bwd": {"block_m": 24}})
