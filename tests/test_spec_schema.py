"""The pydantic models of a spec dict (lincomp.spec_schema) and the exported JSON Schema: every preset and every
valid spec validates and round-trips; the models reject unknown keys at every level and wrong types; whatever
the field-by-field checks of AttentionSpec.from_dict accept, the schema accepts (it describes the accepted form)."""

import json
import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

import lincomp
from lincomp import presets
from lincomp.spec import AttentionSpec
from lincomp.spec_schema import SpecDict, check_spec_dict
from lincomp.testing import examples, spec_strategy

sys.path.insert(0, __import__("os").path.dirname(__file__))
from test_spec_fuzz import _mutate  # noqa: E402  (the fuzz suite's one-field mutations of a valid dict)


def _presets():
    return [presets.resolve(name) for name in presets.PAPER_SPECS] + [presets.clear_pool(), presets.sta(),
                                                                      presets.natten(), presets.gla("scalar")]


@pytest.mark.parametrize("spec", _presets(), ids=lambda s: s.summary())
def test_every_preset_validates_and_round_trips(spec):
    model = SpecDict.model_validate_json(spec.to_json())
    assert AttentionSpec.from_dict(model.model_dump(exclude_unset=True)) == spec


@examples(60)
@given(spec=spec_strategy())
def test_every_valid_spec_validates(spec):
    model = SpecDict.model_validate(spec.to_dict())
    assert AttentionSpec.from_dict(model.model_dump(exclude_unset=True)) == spec


@pytest.mark.parametrize("bad, where", [
    ({"causal": True, "casual": True}, "casual"),
    ({"window": {"kind": "1d", "left": 3, "rigth": 0}}, "window.rigth"),
    ({"window": {"kind": "1d", "left": 3}, "linear": {"feature_map": "elu1", "chunk": 8},
      "combine": "sum"}, "linear.chunk"),
    ({"window": {"kind": "1d", "left": True}}, "window.left"),
    ({"window": {"kind": "1d", "left": 3.0}}, "window.left"),
    ({"prefix": -1}, "prefix"),
    ({"window": {"kind": "2d", "grid": [4, 4], "radius": 2, "shape": "hexagon"}}, "window.shape"),
    ({"window": {"kind": "4d", "grid": [4, 4]}}, "window"),
    ({"linear": {"gate": "matrix"}, "causal": True}, "linear.gate"),
])
def test_schema_rejects_unknown_keys_and_wrong_types(bad, where):
    with pytest.raises(ValueError, match=rf"spec: {where}\b"):
        check_spec_dict(bad)
    with pytest.raises((ValueError, TypeError)):      # from_dict's own checks reject it too, naming the field
        AttentionSpec.from_dict(bad)


@examples(150)
@given(spec=spec_strategy(), data=st.data())
def test_schema_accepts_whatever_the_field_checks_accept(spec, data, monkeypatch_module):
    d = _mutate(spec.to_dict(), data)
    try:
        monkeypatch_module.setattr("lincomp.spec_schema.check_spec_dict", lambda d: None)
        AttentionSpec.from_dict(d)            # the field-by-field checks alone
    except (ValueError, TypeError):
        return
    finally:
        monkeypatch_module.undo()
    SpecDict.model_validate(d)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_exported_schema_and_cli():
    schema = lincomp.spec_json_schema()
    assert schema["additionalProperties"] is False and schema["title"] == "lincomp attention spec"
    assert all(d["additionalProperties"] is False for d in schema["$defs"].values())
    assert schema["$defs"]["Window1DDict"]["properties"]["left"]["minimum"] == 0
    out = subprocess.run([sys.executable, "-m", "lincomp.cli", "explain", "--schema"], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == schema
