"""Fault injection on the tuning database (issue 19): truncated, foreign, out-of-range, unreadable files,
concurrent writers and writers killed mid-write. Nothing a writer finished is lost, a damaged file never
raises into a lookup, and every damaged file is kept for a human under a unique name."""

import json
import multiprocessing as mp
import os
import signal
import time

import pytest

from lincomp.tuning.db import FORMAT, VERSION, TuningDB, TuningDBError, TuningDBWarning

DEV = "Fault Injection GPU"
SPEC = "w1d3.0_c-0123456789ab"


def _record(db, n, config=None):
    """Entry number ``n`` (its own key: H is an exact bucket dim)."""
    return db.record("triton", "window_fwd", SPEC, "float16", {"L": 4096, "D": 64, "H": n}, config or {"block_m": 64},
                     1.0, device=DEV, versions={})


def _lookup(db, n):
    return db.lookup("triton", "window_fwd", SPEC, "float16", {"L": 4096, "D": 64, "H": n}, device=DEV,
                     nearest=False)


def _writer(folder, first, n, log):
    """Record n entries, appending each length to ``log`` (fsynced) only after record() returned."""
    db = TuningDB(folder, shipped=None)
    for h in range(first, first + n):
        _record(db, h)
        with open(log, "a") as f:
            f.write(f"{h}\n")
            f.flush()
            os.fsync(f.fileno())


def _stored(folder) -> set:
    doc = json.loads(next(folder.glob("*.json")).read_text())
    return {e["shape"]["H"] for e in doc["entries"].values()}


def test_concurrent_writers_lose_nothing(tmp_path):
    ctx = mp.get_context("fork")
    log = tmp_path / "done.log"
    procs = [ctx.Process(target=_writer, args=(tmp_path / "db", 1000 * w + 1, 8, log)) for w in range(5)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 5
    assert _stored(tmp_path / "db") == {int(x) for x in log.read_text().split()} and len(_stored(tmp_path / "db")) == 40


def test_writers_killed_mid_write_lose_nothing_they_finished(tmp_path):
    """SIGKILL writers at random points: the file always parses, every entry whose record() returned is
    there, and the killed writers' temp files go away once they are old."""
    ctx = mp.get_context("fork")
    folder, log = tmp_path / "db", tmp_path / "done.log"
    procs = [ctx.Process(target=_writer, args=(folder, 1000 * w + 1, 400, log)) for w in range(4)]
    for p in procs:
        p.start()
    for n, p in enumerate(procs):
        time.sleep(0.15 + 0.1 * n)
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
    done = {int(x) for x in log.read_text().split()} if log.exists() else set()
    assert not TuningDB(folder, shipped=None).validate()    # never half-written: the file parses, every entry valid
    assert done <= _stored(folder)
    past = time.time() - 7200
    temps = list(folder.glob(".*.tmp"))
    for t in temps:
        os.utime(t, (past, past))
    _record(TuningDB(folder, shipped=None), 99999)   # the next writer sweeps old temp files
    assert not [t for t in temps if t.exists()]
    assert done | {99999} <= _stored(folder)


def _write_doc(folder, entries):
    folder.mkdir(parents=True, exist_ok=True)
    from lincomp.tuning.device import device_slug
    path = folder / f"{device_slug(DEV)}.json"
    path.write_text(json.dumps({"format": FORMAT, "version": VERSION, "device": DEV, "entries": entries}))
    return path


def test_truncated_file_warns_never_raises_and_backups_are_unique(tmp_path):
    """Issue 19 repro: two .corrupt-<time> backups made within one second overwrote each other."""
    db = TuningDB(tmp_path / "db", shipped=None)
    _record(db, 1)
    path = next((tmp_path / "db").glob("*.json"))
    for n in range(3):
        path.write_text(path.read_text()[: 40] if path.exists() else '{"format": "lincomp-tuning-db", "ver')
        with pytest.warns(TuningDBWarning):
            assert _lookup(db, 1) is None
        with pytest.warns(TuningDBWarning, match="moved it to"):
            _record(db, 2 + n)
    backups = list((tmp_path / "db").glob("*.corrupt-*"))
    assert len(backups) == 3 and len({b.name for b in backups}) == 3


def test_foreign_file_is_never_clobbered(tmp_path):
    db = TuningDB(tmp_path / "db", shipped=None)
    path = _write_doc(tmp_path / "db", {})
    doc = json.loads(path.read_text())
    doc["format"] = "someone-elses"
    path.write_text(json.dumps(doc))
    with pytest.raises(TuningDBError, match="not overwritten"):
        _record(db, 1)
    assert json.loads(path.read_text())["format"] == "someone-elses"


@pytest.mark.parametrize("config", [{"block_m": float("nan")}, {"block_m": float("inf")},
                                    {"block_m": {"nested": 1}}, {"tile": [1, [2]]}])
def test_non_finite_or_nested_config_values_are_rejected_at_load(tmp_path, config):
    """Issue 19 repro: configs that parse but cannot be a config reached the kernels."""
    good = {"backend": "triton", "kernel": "window_fwd", "spec": SPEC, "dtype": "float16",
            "bucket": "D=64,H=1,L=4096", "config": {"block_m": 64}, "time_ms": 1.0}
    bad = dict(good, bucket="D=64,H=2,L=4096", config=config)
    _write_doc(tmp_path / "db", {f"triton|window_fwd|{SPEC}|float16|D=64,H=1,L=4096": good,
                                 f"triton|window_fwd|{SPEC}|float16|D=64,H=2,L=4096": bad})
    db = TuningDB(tmp_path / "db", shipped=None)
    with pytest.warns(TuningDBWarning, match="config"):
        assert _lookup(db, 1).config == {"block_m": 64}
    assert _lookup(db, 2) is None
    assert any("config" in p.message for p in db.validate())


@pytest.mark.parametrize("extra, field", [({"time_ms_": 1.0}, "time_ms_"),
                                           ({"candidates": [{"config": {}, "time_ms": 1.0, "runof_ms": 1.0}]},
                                            "candidates.0.runof_ms")])
def test_unknown_or_invalid_entry_fields_are_rejected_at_load(tmp_path, extra, field):
    """Entries are pydantic records with extra="forbid": a misspelt or foreign field is never silently kept."""
    good = {"backend": "triton", "kernel": "window_fwd", "spec": SPEC, "dtype": "float16",
            "bucket": "D=64,H=1,L=4096", "config": {"block_m": 64}, "time_ms": 1.0,
            "candidates": [{"config": {"block_m": 64}, "time_ms": 1.0, "runoff_ms": 0.9}, {"config": {}, "error": "x"}]}
    bad = dict(good, bucket="D=64,H=2,L=4096", **extra)
    _write_doc(tmp_path / "db", {f"triton|window_fwd|{SPEC}|float16|D=64,H=1,L=4096": good,
                                 f"triton|window_fwd|{SPEC}|float16|D=64,H=2,L=4096": bad})
    db = TuningDB(tmp_path / "db", shipped=None)
    with pytest.warns(TuningDBWarning, match=field):
        assert _lookup(db, 1).config == {"block_m": 64}
    assert _lookup(db, 2) is None
    assert [p.entry.endswith("H=2,L=4096") and repr(field) in p.message for p in db.validate()] == [True]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads unreadable files")
def test_unreadable_file_warns_and_lookups_go_on(tmp_path):
    db = TuningDB(tmp_path / "db", shipped=None)
    _record(db, 1)
    path = next((tmp_path / "db").glob("*.json"))
    path.chmod(0)
    try:
        with pytest.warns(TuningDBWarning, match="unreadable"):
            assert _lookup(db, 1) is None
    finally:
        path.chmod(0o644)


def _hold_lock(lock_path, ready, seconds):
    from filelock import FileLock
    with FileLock(str(lock_path)):
        open(ready, "w").close()
        time.sleep(seconds)


def test_a_stuck_writer_gives_a_clear_error_not_a_hang(tmp_path, monkeypatch):
    """Another process holding the write lock past the timeout: record() raises TuningDBError naming the
    file and what to do (tuning then warns and keeps its result); once it lets go, writing works."""
    import lincomp.tuning.db as dbmod

    db = TuningDB(tmp_path / "db", shipped=None)
    path = db.file_for(DEV)
    path.parent.mkdir(parents=True)
    ready = tmp_path / "ready"
    holder = mp.get_context("fork").Process(target=_hold_lock,
                                            args=(path.with_name(path.name + ".lock"), ready, 3.0))
    holder.start()
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        monkeypatch.setattr(dbmod, "LOCK_TIMEOUT_S", 0.3)
        with pytest.raises(TuningDBError, match="held the write lock"):
            _record(db, 1)
    finally:
        holder.join(30)
    assert holder.exitcode == 0
    _record(db, 2)
    assert _lookup(db, 2) is not None and _lookup(db, 1) is None
