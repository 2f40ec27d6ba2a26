"""Extreme but valid values on the TVM kernels against the fp64 reference (issue 19), and NaN / Inf inputs.

Sink logits from -inf (switched off) to +1e4, log gates from -1e4 to 0, window_gamma down to 1e-8, softmax
scores up to 1e4, head dims up to 512: the kernel matches the reference within docs/semantics.md's bound (widened
only by the conditioning of fp32 scores, see ``case_tolerance``). NaN / Inf inputs give NaN, never finite
numbers that differ from the reference.
"""

import pytest
import torch

pytest.importorskip("tvm")

from hypothesis import given, strategies as st  # noqa: E402

import lincomp  # noqa: E402
from lincomp.reference import reference  # noqa: E402
from lincomp.testing import case_tolerance, examples, extreme_case, random_inputs, rel_err  # noqa: E402


def _double(x: dict) -> dict:
    return {k: (tuple(t.double() for t in v) if isinstance(v, tuple) else
                v.double() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}


def _run(spec, x):
    with torch.no_grad():
        return lincomp.compile(spec, target="tvm")(**x)


@examples(8)
@given(case=extreme_case(head_dims=(8, 16, 256)))
def test_extreme_values_match_reference(case):
    spec, x = case
    out, ref = _run(spec, x), reference(spec, **_double(x))
    extremes = {k: v for k, v in x.items() if k in ("sink_logits", "window_gamma", "scale")}
    assert rel_err(out, ref) <= case_tolerance(spec, x), (spec, extremes)


@pytest.mark.slow
@examples(60)
@given(case=extreme_case())
def test_extreme_values_match_reference_long(case):
    spec, x = case
    assert rel_err(_run(spec, x), reference(spec, **_double(x))) <= case_tolerance(spec, x)


SINKS2 = lincomp.AttentionSpec.from_dict({"window": {"kind": "1d", "left": 7, "right": 0}, "causal": True, "sinks": 2})


@pytest.mark.parametrize("logits", [[-float("inf")] * 2, [-1e10, -1e10], [-1e10, 0.5], [-float("inf"), 3.0],
                                    [1e4, -1e4], [-1e30, -float("inf")]])
def test_sink_logits_switched_off_or_huge(logits):
    """Issue 19 repro: sinks at -inf or <= -1e10 gave zeros (rel err 1.0) on TVM; 2+ sinks went wrong."""
    x = random_inputs(SINKS2, H=2, L=33, D=16, seed=1)
    x["sink_logits"] = torch.tensor([logits, logits[::-1]])
    ref = reference(SINKS2, **_double(x))
    assert rel_err(_run(SINKS2, x), ref) <= 1e-4


def test_sinks_off_equal_plain_window():
    plain = lincomp.AttentionSpec.from_dict({"window": {"kind": "1d", "left": 7, "right": 0}, "causal": True})
    x = random_inputs(SINKS2, H=2, L=20, D=16, seed=2)
    x["sink_logits"] = torch.full((2, 2), -float("inf"))
    y = {k: v for k, v in x.items() if k != "sink_logits"}
    assert rel_err(_run(SINKS2, x), reference(plain, **_double(y))) <= 1e-4


@pytest.mark.parametrize("what", ["nan_q", "inf_k", "nan_sink", "nan_v"])
def test_nan_and_inf_inputs_give_nan_never_finite_garbage(what):
    """Issue 19 repro: Inf in k and NaN sink logits came out finite on TVM where the reference is NaN."""
    x = random_inputs(SINKS2, H=2, L=24, D=16, seed=3)
    if what == "nan_q":
        x["q"][0, 1, 5, 3] = float("nan")
    elif what == "inf_k":
        x["k"][0, 0, 4, 0] = float("inf")
    elif what == "nan_sink":
        x["sink_logits"][1, 0] = float("nan")
    else:
        x["v"][0, 0, 9, 2] = float("nan")
    out, ref = _run(SINKS2, x), reference(SINKS2, **_double(x))
    bad_ref = ~torch.isfinite(ref)
    assert bad_ref.any()
    assert not torch.isfinite(out[bad_ref]).any(), "the reference is NaN there; the kernel must not be finite"
    ok = torch.isfinite(out) & ~bad_ref
    # every finite output equals the reference (a NaN may spread to a tile's other rows, never a wrong number)
    assert torch.allclose(out[ok].double(), ref[ok], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gamma", [1e-4, 1e-6, 1e-8])
def test_shared_small_window_gamma(gamma):
    """Issue 19 repro: combine="shared" lost precision for small window_gamma (rel err 0.78 at 1e-8)."""
    spec = lincomp.AttentionSpec.from_dict({"window": {"kind": "1d", "left": 7, "right": 0}, "causal": True,
                                            "linear": {"feature_map": "elu1"}, "combine": "shared"})
    x = random_inputs(spec, H=2, L=32, D=16, seed=4)
    x["window_gamma"] = torch.full((2,), gamma)
    assert rel_err(_run(spec, x), reference(spec, **_double(x))) <= 1e-4


@pytest.mark.parametrize("D,Dv", [(256, 256), (64, 320), (512, 64)])
def test_wide_heads(D, Dv):
    """Issue 19 repro: head dim >= 256 raised AssertionError in codegen; the gemm tiles over wide heads now."""
    spec = lincomp.AttentionSpec.from_dict({"window": {"kind": "1d", "left": 5, "right": 0}, "causal": True,
                                            "sinks": 1, "linear": {"feature_map": "elu1", "normalize": True},
                                            "combine": "sum"})
    x = random_inputs(spec, H=1, L=19, D=D, seed=5)
    x["v"] = torch.randn(1, 1, 19, Dv)
    assert rel_err(_run(spec, x), reference(spec, **_double(x))) <= 1e-4


def test_wide_heads_through_auto_target():
    spec = lincomp.AttentionSpec.from_dict({"window": {"kind": "1d", "left": 3, "right": 0}, "causal": True})
    x = random_inputs(spec, H=1, L=9, D=256, seed=6)
    with torch.no_grad():
        out = lincomp.compile(spec, target="auto")(**x)
    assert rel_err(out, reference(spec, **_double(x))) <= 1e-4


@pytest.mark.parametrize("left", [2 ** 31, 2 ** 40, 2 ** 63])
def test_huge_windows_are_clamped(left):
    """Issue 19 repro: left >= 2^31 overflowed int32 (2^63: OverflowError); it is the same as a dense causal."""
    spec = lincomp.AttentionSpec.from_dict({"window": {"kind": "1d", "left": left, "right": left}, "causal": True})
    dense = lincomp.AttentionSpec.from_dict({"causal": True})
    x = random_inputs(spec, H=1, L=21, D=8, seed=7)
    assert rel_err(_run(spec, x), reference(dense, **_double(x))) <= 1e-4


def test_huge_grid_radius_is_clamped():
    """Issue 19 repro: r=2048 on 16x16 grew the block plan by 670 MB; r=2^40 raised MemoryError."""
    import resource
    spec = lincomp.AttentionSpec.from_dict({"window": {"kind": "2d", "grid": [16, 16], "radius": 2 ** 40}})
    assert spec.window.grid_radius == 22   # 15^2 + 15^2 = 450 < 22^2: every pair visible
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    x = random_inputs(spec, H=1, D=8, seed=8)
    out = _run(spec, x)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000   # KiB
    assert rel_err(out, reference(lincomp.AttentionSpec(), **_double(x))) <= 1e-4


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_non_finite_scale_is_rejected(scale):
    x = random_inputs(SINKS2, H=1, L=8, D=8)
    with pytest.raises(ValueError, match="scale"):
        _run(SINKS2, dict(x, scale=scale))


@given(st.data())
@examples(3)
def test_tuning_db_out_of_range_configs_never_reach_a_run(tmp_path_factory, data):
    """Issue 19 repro: block_m 0 / 4096 / NaN / a string in the database crashed runs inside TVM."""
    from lincomp.tuning import TuningDB
    from lincomp.tuning.db import TuningDBWarning
    from lincomp.lower.tvmir.kernel import KERNEL_NAMES, Sizes
    bad = data.draw(st.sampled_from([0, 4096, float("nan"), "64", -16, 3, [16]]), label="block_m")
    db = TuningDB(tmp_path_factory.mktemp("db"), shipped=None)
    spec = lincomp.AttentionSpec.from_dict({"window": {"kind": "1d", "left": 3, "right": 0}, "causal": True})
    x = random_inputs(spec, H=1, L=10, D=8)
    sizes = Sizes(1, 1, 8, 8, None, None, None)
    path = db.file_for("cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    import json
    from lincomp.tuning.db import FORMAT, VERSION, entry_key, shape_bucket
    from lincomp.tuning.device import resolve_device_name
    bucket = shape_bucket(**sizes.bucket(10, "window"))
    key = entry_key("tvm", KERNEL_NAMES["window"], spec.key(), "float32", bucket)
    doc = {"format": FORMAT, "version": VERSION, "device": resolve_device_name("cpu"), "entries": {key: {
        "backend": "tvm", "kernel": KERNEL_NAMES["window"], "spec": spec.key(), "dtype": "float32",
        "bucket": bucket, "config": {"block_m": bad, "block_n": 16}, "time_ms": 1.0}}}
    path.write_text(json.dumps(doc))   # json writes NaN as a bare NaN literal, which json.loads accepts
    with pytest.warns(TuningDBWarning):
        with torch.no_grad():
            out = lincomp.compile(spec, target="tvm", db=db)(**x)
    assert rel_err(out, reference(spec, **_double(x))) <= 1e-4
