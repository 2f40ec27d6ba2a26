"""Fuzz AttentionSpec.from_dict / from_json (issue 19): any dict or JSON text either builds a spec that
round-trips, or is rejected with ValueError / TypeError whose message names the offending field. Never
another exception (KeyError, RecursionError, UnicodeDecodeError, ...), never a silently dropped key."""

import json

import pytest
from hypothesis import given, strategies as st

from lincomp.spec import AttentionSpec
from lincomp.testing import examples, spec_strategy

FIELDS = ("window", "causal", "prefix", "sinks", "linear", "combine", "kind", "left", "right", "block", "grid",
          "radius", "shape", "feature_map", "feature_dim", "gate", "normalize", "chunk_size", "name")
# JSON text and files may also fail as a whole (does not parse, not an object, not UTF-8): the message
# then names the JSON or the file
WHOLE = ("spec JSON", "spec file")
KEYS = ["window", "causal", "prefix", "sinks", "linear", "combine", "name", "description", "kind", "left", "right",
        "block", "grid", "radius", "shape", "feature_map", "feature_dim", "gate", "normalize", "chunk_size",
        "window_size", "scale", "pool", "tile", "casual", "sink", "gate_type"]
atoms = st.one_of(st.none(), st.booleans(), st.integers(-3, 2 ** 64), st.floats(allow_nan=True),
                  st.text(max_size=6), st.sampled_from(["1d", "2d", "3d", "terraced", "circle", "square", "elu1",
                                                        "hedgehog", "scalar", "vector", "shared", "sum"]))
values = st.recursive(atoms, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
                      max_leaves=12)


def _mutate(d: dict, data) -> dict:
    """A valid spec dict with one field replaced, removed or added (at the top or one level down)."""
    d = json.loads(json.dumps(d))
    target = d
    nested = [k for k in ("window", "linear") if isinstance(d.get(k), dict)]
    if nested and data.draw(st.booleans(), label="nested"):
        target = d[data.draw(st.sampled_from(nested), label="where")]
    action = data.draw(st.sampled_from(["replace", "remove", "add"]), label="action")
    key = data.draw(st.sampled_from(sorted(target) if action != "add" and target else KEYS), label="key")
    if action == "remove":
        target.pop(key, None)
    else:
        target[key] = data.draw(values, label="value")
    return d


def _check(build, names=FIELDS):
    try:
        spec = build()
    except (ValueError, TypeError) as e:
        msg = str(e)
        assert any(f in msg for f in names), f"the message does not name a field: {msg!r}"
        return None
    assert AttentionSpec.from_dict(spec.to_dict()) == spec      # whatever is accepted round-trips
    return spec


@examples(150)
@given(d=st.dictionaries(st.sampled_from(KEYS), values, max_size=7))
def test_random_dicts(d):
    _check(lambda: AttentionSpec.from_dict(d))


@examples(150)
@given(spec=spec_strategy(), data=st.data())
def test_mutated_valid_specs(spec, data):
    d = _mutate(spec.to_dict(), data)
    got = _check(lambda: AttentionSpec.from_dict(d))
    if got is not None:   # an accepted mutation kept every key it carried (no key is ever dropped)
        for k, v in d.items():
            if k in ("window", "linear") and isinstance(v, dict):
                assert set(v) <= set(got.to_dict()[k] or {}) | {"name", "description", "paper"}


@examples(100)
@given(text=st.one_of(st.text(max_size=40), st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
                      values.map(lambda v: json.dumps(v, allow_nan=True))))
def test_random_json_text(text):
    _check(lambda: AttentionSpec.from_json(text if text.lstrip().startswith("{") else "{" + text), FIELDS + WHOLE)


@examples(40)
@given(raw=st.one_of(st.binary(max_size=64), values.map(lambda v: json.dumps(v).encode()),
                     spec_strategy().map(lambda s: b"\xef\xbb\xbf" + s.to_json().encode())))
def test_random_json_files(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("fuzz") / "spec.json"
    path.write_bytes(raw)
    _check(lambda: AttentionSpec.from_json(path), FIELDS + WHOLE)


@pytest.mark.slow
@examples(5000)
@given(spec=spec_strategy(), data=st.data())
def test_mutated_valid_specs_long(spec, data):
    test_mutated_valid_specs.hypothesis.inner_test(spec, data)
