"""Issue 19 regressions outside the kernels: spec keys, JSON files, huge windows, call checks, decoder
checks, the explain / tune command lines. Each test is one repro of the issue (fast: no TVM compile)."""

import json
import math
import subprocess
import sys

import pytest
import torch

import lincomp
from lincomp.reference import ReferenceDecoder, reference
from lincomp.spec import MAX_REACH, AttentionSpec, GridWindow
from lincomp.testing import random_inputs, rel_err

W = {"kind": "1d", "left": 3, "right": 0}


# ------------------------------------------------------------------------------------- spec keys
@pytest.mark.parametrize("d,field", [
    ({"window_size": 128}, "window_size"), ({"sliding_window": 64}, "sliding_window"),
    ({"num_sinks": 4}, "num_sinks"), ({"scale": 0.1}, "scale"), ({"dropout": 0.1}, "dropout"),
    ({"mask_mod": "causal"}, "mask_mod"), ({"version": 2}, "version"),
    ({"window": {**W, "dilation": 2}}, "dilation"), ({"window": {**W, "stride": 2}}, "stride"),
    ({"causal": True, "linear": {"feature_map": "elu1", "gate_type": "scalar"}}, "gate_type"),
    ({"causal": True, "linear": {"feature_map": "elu1", "eps": 1e-6}}, "eps"),
])
def test_unknown_keys_raise_at_every_level(d, field):
    """Issue 19 repro: keys that are not near-typos were dropped (a spec silently became dense)."""
    with pytest.raises(ValueError, match=repr(field)):
        AttentionSpec.from_dict(d)


def test_typos_still_suggest_the_key():
    with pytest.raises(ValueError, match="did you mean 'causal'"):
        AttentionSpec.from_dict({"casual": True})


def test_human_keys_are_allowed():
    spec = AttentionSpec.from_dict({"window": W, "causal": True, "name": "swa", "description": "a sliding window",
                                    "paper": "Longformer"})
    assert spec == AttentionSpec.from_dict({"window": W, "causal": True})
    with pytest.raises(TypeError, match="name"):
        AttentionSpec.from_dict({"name": ["not", "a", "string"]})


# ------------------------------------------------------------------------------------ JSON files
def test_json_paths_give_value_errors_naming_the_file(tmp_path):
    """Issue 19 repro: a missing file read as 'does not parse', a directory / '' raised IsADirectoryError,
    a binary file UnicodeDecodeError without the name, deep nesting RecursionError."""
    binary = tmp_path / "spec.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    cases = [(tmp_path / "missing.json", "does not exist"), (tmp_path, "not a regular file"), ("", "empty"),
             (binary, "not UTF-8"), (deep, "nested too deeply")]
    for path, why in cases:
        with pytest.raises(ValueError, match=why) as e:
            AttentionSpec.from_json(path)
        if str(path):
            assert str(path) in str(e.value)
    with pytest.raises(TypeError, match="JSON object"):
        AttentionSpec.from_json(listed)


def test_json_file_with_a_utf8_bom_is_accepted(tmp_path):
    p = tmp_path / "spec.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"window": W, "causal": True}).encode())
    assert AttentionSpec.from_json(p) == AttentionSpec.from_dict({"window": W, "causal": True})
    assert AttentionSpec.from_json(str(p)).causal
    assert AttentionSpec.from_json("\ufeff" + json.dumps({"causal": True})).causal


# ---------------------------------------------------------------------------------- huge windows
@pytest.mark.parametrize("left", [2 ** 31, 2 ** 63, 10 ** 30])
def test_huge_1d_windows_clamp_to_max_reach(left):
    spec = AttentionSpec.from_dict({"window": {"kind": "1d", "left": left, "right": left}})
    assert spec.window.left == spec.window.right == MAX_REACH
    x = random_inputs(spec, H=1, L=9, D=4)
    assert rel_err(reference(spec, **x), reference(AttentionSpec(), **x)) < 1e-6


@pytest.mark.parametrize("grid,shape", [((16, 16), "circle"), ((16, 16), "square"), ((3, 5, 4), "circle"),
                                        ((1, 7), "square")])
def test_grid_radius_clamps_to_the_grid_with_the_same_pairs(grid, shape):
    """A radius past the grid's edge (2048 on 16x16 grew the block plan by 670 MB) is the smallest one that
    sees the whole grid: the same visible pairs, the same output, a plan of the grid's size."""
    from lincomp.ir.blocks import block_plan
    from lincomp.reference.masks import window_rule
    huge = GridWindow(grid, 2 ** 40, shape)
    r = huge.grid_radius
    assert r <= math.isqrt(sum(g * g for g in grid)) + 1   # the grid's diagonal, not 2^40
    pos = torch.arange(huge.tokens)
    assert bool(window_rule(huge, pos[:, None], pos[None, :]).all())
    assert not bool(window_rule(GridWindow(grid, r - 1, shape), pos[:, None], pos[None, :]).all()) or r <= 1
    spec = AttentionSpec(window=huge)
    p = block_plan(spec, huge.tokens, 16, 16, None)
    assert p.kv_indices.numel() <= p.num_q_tiles * p.num_k_tiles   # at most every tile pair, once


# ------------------------------------------------------------------------------------ call checks
def test_empty_head_dim_is_a_value_error():
    """Issue 19 repro: D=0 raised ZeroDivisionError."""
    q = torch.randn(1, 1, 4, 0)
    with pytest.raises(ValueError, match="head dims"):
        reference(AttentionSpec(), q, q, q)
    with pytest.raises(ValueError, match="head dims"):
        reference(AttentionSpec(), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 0))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scale_is_rejected(scale):
    """Issue 19 repro: scale=nan was accepted (TVM returned partly finite output)."""
    x = random_inputs(AttentionSpec(), H=1, L=4, D=8)
    with pytest.raises(ValueError, match="scale must be finite"):
        reference(AttentionSpec(), **x, scale=scale)
    with pytest.raises(ValueError, match="linear_scale"):
        reference(AttentionSpec(causal=True, linear={"feature_map": "elu1"}), **x, linear_scale=scale)


def test_reference_turns_nan_and_inf_into_nan():
    """What the kernels must match: NaN / Inf in the inputs reach the output as NaN."""
    spec = AttentionSpec.from_dict({"window": W, "causal": True, "sinks": 1})
    x = random_inputs(spec, H=1, L=8, D=4)
    x["k"][0, 0, 2, 0] = float("inf")
    o = reference(spec, **x)[0, 0]
    # rows 2..5 see key 2: a score of +inf makes the row NaN (-inf: the key gets weight 0); others are unharmed
    assert torch.isnan(o[2:6]).any() and torch.isfinite(o[:2]).all() and torch.isfinite(o[6:]).all()


# --------------------------------------------------------------------------------------- decoders
GATED = AttentionSpec.from_dict({"window": W, "causal": True, "linear": {"feature_map": "elu1", "gate": "scalar"},
                                 "combine": "sum"})


def _decoders():
    yield "reference", lambda **w: ReferenceDecoder(GATED, **w)
    try:
        import tvm  # noqa: F401
        yield "tvm", lambda **w: lincomp.TVMDecoder(GATED, **w)
    except ImportError:
        pass
    yield "triton", lambda **w: lincomp.TritonDecoder(GATED, **w)


@pytest.mark.parametrize("name,make", list(_decoders()), ids=lambda v: v if isinstance(v, str) else "")
def test_decoders_check_steps_like_the_kernels(name, make):
    """Issue 19 repro: a decoder without g ran ungated (rel err 0.62); [B, H, 2, D] silently used the first
    token; g > 0 and NaN g were accepted."""
    dec = make(alpha=torch.ones(2))
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    g = -torch.rand(1, 2, 1)
    with pytest.raises(ValueError, match="g is required"):
        dec.step(q, k, v)
    with pytest.raises(ValueError, match="one token"):
        dec.step(torch.randn(1, 2, 2, 8), k, v, g)
    with pytest.raises(ValueError, match="<= 0"):
        dec.step(q, k, v, g.abs() + 0.1)
    with pytest.raises(ValueError, match="NaN"):
        dec.step(q, k, v, torch.full_like(g, float("nan")))
    with pytest.raises(ValueError, match="^g "):
        dec.step(q, k, v, torch.zeros(1, 2, 1, 8))   # a vector gate's shape for a scalar-gated spec
    with pytest.raises(ValueError, match="^g has shape"):
        dec.step(q, k, v, torch.zeros(1, 3, 1))
    with pytest.raises(ValueError, match="no gate"):
        make_plain = ReferenceDecoder(AttentionSpec.from_dict({"window": W, "causal": True}))
        make_plain.step(q, k, v, g)
    assert dec.t == 0   # nothing was consumed by a rejected step


# --------------------------------------------------------------------------------- command lines
def _cli(*args):
    return subprocess.run([sys.executable, "-c", "import sys, lincomp.cli as c; sys.exit(c.main(sys.argv[1:]))",
                           *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [("explain", "lolcats", "--dim", "-1"), ("explain", "lolcats", "--heads", "0"),
                                  ("tune", "lolcats", "--dim", "0"), ("tune", "no-such-preset", "--target", "tvm"),
                                  ("tune", "swa-128", "--length", "-5")])
def test_cli_user_errors_are_one_line_exit_2(args):
    """Issue 19 repro: explain printed negative FLOP ratios for --dim -1; tune printed tracebacks."""
    r = _cli(*args)
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr and "error:" in r.stderr
