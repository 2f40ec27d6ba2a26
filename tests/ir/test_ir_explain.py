"""``lincomp explain``: the printed IR, rewrites, plan and numbers."""

import argparse
import json

import pytest

from lincomp import presets
from lincomp.ir import cost
from lincomp.explain import main, register
from lincomp.ir.explain import load_spec
from lincomp.ir.passes import lower_to_plan


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_explain_clear_prints_plan_and_numbers(capsys):
    rc, out, _ = _run(capsys, "clear-r8", "--grid", "64x64", "--heads", "24", "--dim", "128")
    assert rc == 0
    spec = presets.clear(8, (64, 64), 512)
    plan = lower_to_plan(spec, 4608, H=24, D=128)
    for text in ("== clear-r8 at L=4608 (512 prefix + 64x64 grid) ==", "%window = window_softmax(",
                 "window=2d(64x64, circle r=8), prefix=512", "window: block_sparse", "rewrites: none",
                 "tile 8x8", f"{plan.block_plan.density:.2%} density", f"{plan.block_plan.full_fraction:.1%} full",
                 f"{plan.cost.visible_pairs:,} of {plan.cost.allowed_pairs:,}", f"{plan.cost.flops:.4g}",
                 f"{100 * plan.cost.flops_saved:.2f}% fewer attention FLOPs", "row-major 128 (FlexAttention-style)",
                 f"{plan.pair_efficiency:.1%}", "B=1, H=24, D=128"):
        assert text in out, text


def test_explain_clear_8k_reproduces_99_5(capsys):
    rc, out, _ = _run(capsys, "clear-r8", "--grid", "512x512", "--no-ir", "--json")
    assert rc == 0
    (res,) = json.loads(out)
    assert res["L"] == 262656 and 99.4 <= res["flops_saved_pct"] <= 99.6
    assert res["efficiency_tiled"] > 3 * res["efficiency_rowmajor128"]
    rc, out, _ = _run(capsys, "clear-r8", "--grid", "512x512", "--no-ir")
    assert "99.54% fewer attention FLOPs than dense" in out and "%q = input" not in out


def test_explain_several_lengths_and_rewrites(capsys, tmp_path):
    path = tmp_path / "lolcats.json"
    presets.lolcats(block=64).to_json(path)
    rc, out, _ = _run(capsys, str(path), "--length", "100", "--length", "4096", "--block", "32")
    assert rc == 0
    assert out.count("== lolcats-tk64 at L=") == 2
    assert "window_to_dense @%window" in out and "shared_drops_linear" in out and "hybrid_to_window" in out
    assert "linear: chunked" in out and "hybrid: fused" in out and "block plan: 32x32" in out
    rc, out, _ = _run(capsys, "lizard", "-L", "1", "--no-ir")
    assert "window: decode" in out and "linear: recurrent" in out
    rc, out, _ = _run(capsys, '{"window": {"kind": "1d", "left": 15}, "causal": true}', "-L", "256", "--no-ir")
    assert rc == 0 and "w1d15.0_c at L=256" in out
    rc, out, _ = _run(capsys, "clear-r4", "--grid", "8x8", "--grid", "4x16", "--prefix", "0", "--no-ir")
    assert "at L=64 (0 prefix + 8x8 grid)" in out and "at L=64 (0 prefix + 4x16 grid)" in out


@pytest.mark.parametrize("argv,msg", [
    (["lizrd", "-L", "5"], "did you mean 'lizard'"),
    (["lizard"], "--length"),
    (["clear-r8", "-L", "5"], "--grid"),
    (["lizard", "-L", "64", "--grid", "8x8"], "--grid only applies"),
    (["clear-r8", "--grid", "64x64", "--block", "48"], "power of two"),
])
def test_explain_errors(capsys, argv, msg):
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and msg in err


def test_register_and_load_spec():
    parser = argparse.ArgumentParser(prog="lincomp")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["explain", "clear-r16", "--grid", "32x32", "-L", "1536"])
    assert args.func and args.grid == [(32, 32)] and args.length == [1536]
    assert load_spec("clear-r5").window.radius == 5
    assert load_spec("swa-128") == presets.sliding_window(128)
    assert cost.count_visible_pairs(load_spec("clear-r8"), 4608) > 0


def test_explain_configs_are_what_a_call_gets():
    """explain's config lines come from the same chooser a TVM call uses: equal to kernel.config after it."""
    pytest.importorskip("tvm")
    import torch

    import lincomp
    from lincomp.explain import configs_text
    from lincomp.testing import random_inputs

    spec = lincomp.presets.lizard(window=8, sinks=2, feature_dim=4, chunk_size=16)
    kernel = lincomp.compile(spec, target="tvm")
    preview = kernel.preview_configs(H=2, D=16, L=64)
    with torch.no_grad():
        kernel(**random_inputs(spec, H=2, L=64, D=16, feature_dim=4))
    assert {k: v["params"] for k, v in kernel.config.items()} == {k: v["params"] for k, v in preview.items()}
    text = configs_text(spec, 64, heads=2, dim=16)
    for name, c in preview.items():
        assert f"tvm {name} on " in text and c["source"] in text


@pytest.mark.parametrize("feature_dim", [4, 16])
def test_explain_json_carries_the_configs_a_gqa_call_gets(capsys, tmp_path, feature_dim):
    """--json includes the configs, and --kv-heads reaches the chooser (the preview once assumed Hkv = H)."""
    pytest.importorskip("tvm")
    import torch

    import lincomp
    from lincomp.testing import random_inputs

    spec = lincomp.presets.lizard(window=8, sinks=2, feature_dim=feature_dim, chunk_size=16)
    path = tmp_path / "spec.json"
    spec.to_json(path)
    rc, out, _ = _run(capsys, str(path), "-L", "64", "--heads", "4", "--kv-heads", "2", "--dim", "16", "--no-ir",
                      "--json")
    assert rc == 0
    (res,) = json.loads(out)
    tvm = res["configs"]["tvm"]
    assert set(tvm) == {"window_fwd", "linear_fwd"}
    kernel = lincomp.compile(spec, target="tvm")
    with torch.no_grad():
        kernel(**random_inputs(spec, H=4, Hkv=2, L=64, D=16, feature_dim=feature_dim))
    assert {k: v["key"] for k, v in kernel.config.items()} == {k: v["key"] for k, v in tvm.items()}
    assert {k: v["params"] for k, v in kernel.config.items()} == {k: v["params"] for k, v in tvm.items()}
