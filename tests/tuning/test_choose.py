"""The one config chooser: fixed > db exact > nearest bucket > tuned on first use > default, one schema."""

import pytest

from lincomp import presets
from lincomp.tuning import TuningDB
from lincomp.tuning.choose import SOURCES, choose

SPEC = presets.sliding_window(64)
DEV = "Test CPU x2cores"


def _normalize(cfg):
    if cfg.get("block", 16) % 16:
        raise ValueError("block must be a multiple of 16")
    return {"block": 16, **cfg}


def _choose(db, L, **kw):
    return choose("tvm", "window_fwd", SPEC, "float32", {"L": L, "D": 64}, device=DEV, default=lambda: {"block": 32},
                  normalize=_normalize, db=db, **kw)


def test_order_and_schema(tmp_path):
    db = TuningDB(tmp_path / "db", shipped=None)
    tuned = []

    def tune():
        tuned.append(1)
        db.record("tvm", "window_fwd", SPEC, "float32", {"L": 1000, "D": 64}, {"block": 48}, 1.0, device=DEV)
        return {"block": 48}

    first = _choose(db, 1000, tune=tune)
    assert first.source == "tuned" and first.params == {"block": 48} and tuned == [1]
    again = _choose(db, 1000, tune=tune)   # the stored entry: no second tuning
    assert again.source == "db" and again.params == {"block": 48} and tuned == [1]
    assert again.origin and again.origin.endswith(".json")
    near = _choose(db, 3000)               # another length bucket of the same problem
    assert near.source == "nearest" and near.params == {"block": 48}
    assert _choose(db, 1000, fixed={"block": 64}).source == "fixed"
    other = choose("tvm", "window_fwd", SPEC, "float32", {"L": 1000, "D": 32}, device=DEV,
                   default=lambda: {"block": 32}, normalize=_normalize, db=db)
    assert other.source == "default" and other.params == {"block": 32}   # D is not a length: no nearest
    d = again.as_dict()
    assert set(d) == {"source", "params", "key", "origin"} and d["source"] in SOURCES
    assert d["key"] == {"backend": "tvm", "kernel": "window_fwd", "device": DEV, "dtype": "float32",
                        "bucket": "D=64,L=1024"}


def test_rejected_or_unreadable_entries_are_misses(tmp_path):
    db = TuningDB(tmp_path / "db", shipped=None)
    db.record("tvm", "window_fwd", SPEC, "float32", {"L": 1000, "D": 64}, {"block": 40}, 1.0, device=DEV)
    assert _choose(db, 1000).source == "default"          # normalize rejects a stale entry

    class Broken:
        def lookup(self, *a, **k):
            raise OSError("disk gone")
    assert _choose(Broken(), 1000).source == "default"    # a broken database never stops a call
    with pytest.raises(ValueError, match="multiple of 16"):
        _choose(db, 1000, fixed={"block": 40})              # a bad pinned config is the caller's error
