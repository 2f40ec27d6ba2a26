"""AttentionSpec: round trips, stable keys, presets, and clear errors for invalid specs."""

import json
import subprocess
import sys

import pytest
from hypothesis import given

from lincomp import AttentionSpec, GridWindow, LinearBranch, TerracedWindow, Window1D, presets
from lincomp.testing import spec_strategy


@given(spec_strategy())
def test_dict_and_json_round_trip(spec):
    d = spec.to_dict()
    assert AttentionSpec.from_dict(d) == spec
    assert AttentionSpec.from_json(json.dumps(d)) == spec
    assert AttentionSpec.from_dict(json.loads(spec.to_json())).key() == spec.key()
    assert hash(spec) == hash(AttentionSpec.from_dict(d))
    assert set(d) == {"window", "causal", "prefix", "sinks", "linear", "combine"} | ({"name"} if spec.name else set())


def test_json_file_round_trip(tmp_path):
    spec = presets.lizard()
    path = tmp_path / "lizard.json"
    spec.to_json(path)
    assert AttentionSpec.from_json(path) == spec
    assert AttentionSpec.coerce(str(path)) == spec
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temp file


def test_key_is_stable_and_ignores_names():
    a = AttentionSpec.from_dict({"window": {"kind": "1d", "left": 127, "right": 0}, "causal": True, "name": "a"})
    b = AttentionSpec(window=Window1D(127, 0), causal=True, name="b")
    assert a == b and a.key() == b.key()
    assert a.key() != AttentionSpec(window=Window1D(127, 0), causal=False).key()
    # The key is a pure function of the canonical JSON: identical across processes.
    out = subprocess.run([sys.executable, "-c", "from lincomp import presets; print(presets.lizard().key())"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == presets.lizard().key()


def test_defaults_and_optional_keys():
    spec = AttentionSpec.from_dict({"causal": True, "description": "plain causal softmax"})
    assert spec == AttentionSpec(causal=True)
    lin = AttentionSpec.from_dict({"causal": True, "linear": {"feature_map": "elu1"}}).linear
    assert lin == LinearBranch("elu1", None, None, False, 64)


def test_presets_are_the_papers_configurations():
    c = presets.clear(8)
    assert isinstance(c.window, GridWindow) and c.window.shape == "circle" and c.prefix == 512
    assert c.window.grid == (64, 64) and c.expected_length() == 512 + 64 * 64
    lz = presets.lizard()
    assert lz.window == Window1D(127, 0) and lz.sinks == 4 and lz.combine == "sum"
    assert lz.linear.feature_map == "hedgehog_exp" and lz.linear.gate == "scalar" and lz.linear.normalize
    lc = presets.lolcats()
    assert lc.window == TerracedWindow(64) and lc.combine == "shared" and lc.linear.feature_dim == 64
    assert presets.gla().linear.gate == "vector"
    for make in presets.PAPER_SPECS.values():
        spec = make()
        assert AttentionSpec.from_dict(spec.to_dict()) == spec
        assert repr(spec).startswith("AttentionSpec(")


def test_window_reach():
    assert Window1D(127, 0).reach(True) == 127
    assert TerracedWindow(64).reach(True) == 127
    # circle r=2 on a 5-wide grid: |dy| <= 1, |dx| <= 1 -> at most 1 row + 1 col back
    assert GridWindow((4, 5), 2, "circle").reach(True) == 1 * 5 + 1


BAD_SPECS = [
    ({"window": {"kind": "2x"}}, ValueError, "window.kind"),
    ({"window": {"kind": "1d", "left": -1}}, ValueError, "window.left"),
    ({"window": {"kind": "1d", "left": 1.5}}, TypeError, "window.left"),
    ({"window": {"kind": "1d"}}, ValueError, "window.left"),
    ({"window": {"kind": "terraced", "block": 0}}, ValueError, "window.block"),
    ({"window": {"kind": "2d", "grid": [4, 4], "radius": 0, "shape": "circle"}}, ValueError, "window.radius"),
    ({"window": {"kind": "2d", "grid": [4, 4, 4], "radius": 2}}, ValueError, "window.kind"),
    ({"window": {"kind": "2d", "grid": [4, 0], "radius": 2}}, ValueError, "window.grid"),
    ({"window": {"kind": "2d", "grid": [4, 4], "radius": 2, "shape": "hexagon"}}, ValueError, "window.shape"),
    ({"causal": "yes"}, TypeError, "causal"),
    ({"prefix": -3}, ValueError, "prefix"),
    ({"sinks": True}, TypeError, "sinks"),
    ({"linear": {"feature_map": "cosine"}}, ValueError, "linear.feature_map"),
    ({"linear": {"feature_map": "elu1", "feature_dim": 8}}, ValueError, "feature_dim"),
    ({"linear": {"feature_map": "identity", "gate": "scalar"}}, ValueError, "causal"),
    ({"linear": {"feature_map": "identity", "chunk_size": 0}, "causal": True}, ValueError, "chunk_size"),
    ({"linear": {"feature_map": "identity", "normalize": 1}}, TypeError, "normalize"),
    ({"window": {"kind": "1d", "left": 3}, "linear": {}}, ValueError, "combine"),
    ({"linear": {}, "combine": "sum"}, ValueError, "combine"),
    ({"window": {"kind": "1d", "left": 3}, "combine": "shared"}, ValueError, "combine"),
    ({"window": {"kind": "1d", "left": 3}, "linear": {}, "combine": "mean"}, ValueError, "combine"),
    ({"linear": {}, "sinks": 2}, ValueError, "sinks"),
    ({"window": {"kind": "1d", "left": 3}, "linear": {}, "combine": "shared", "sinks": 2}, ValueError, "sinks"),
    ({"windw": None}, ValueError, "window"),
    ({"window": {"kind": "1d", "left": 3, "rigth": 1}}, ValueError, "right"),
    ({"linear": {"feature_mapp": "elu1"}}, ValueError, "feature_map"),
]


@pytest.mark.parametrize("d, exc, field", BAD_SPECS)
def test_bad_specs_name_the_field(d, exc, field):
    with pytest.raises(exc) as info:
        AttentionSpec.from_dict(d)
    assert field in str(info.value)


def test_bad_json_is_a_value_error():
    with pytest.raises(ValueError, match="JSON"):
        AttentionSpec.from_json("{not json")
    with pytest.raises(TypeError, match="spec must be"):
        AttentionSpec.coerce(42)


def test_import_is_cheap():
    code = ("import sys, lincomp; lincomp.AttentionSpec; lincomp.presets.lizard(); "
            "heavy = [m for m in ('triton', 'tvm', 'transformers', 'diffusers') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
