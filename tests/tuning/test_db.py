"""The tuning database: format, buckets, lookup order, atomic + concurrent writes, bad files, CLI."""

import json
import multiprocessing
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from lincomp.spec import AttentionSpec
from lincomp.tuning import cli
from lincomp.tuning.db import (FORMAT, VERSION, TuningDB, TuningDBError, TuningDBWarning, parse_bucket,
                               shape_bucket, validate_paths)
from lincomp.tuning.device import device_slug

DEV = "NVIDIA H100 80GB HBM3"
KEY = dict(backend="triton", kernel="window_fwd", spec="w1d127.0_c-0123456789ab", dtype="float16")


@pytest.fixture(autouse=True)
def _no_real_home(tmp_path, monkeypatch):
    # Nothing here may touch the real ~/.cache or $LINCOMP_TUNING_DB.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LINCOMP_TUNING_DB", raising=False)


def make_db(tmp_path, name="user", shipped=None):
    return TuningDB(tmp_path / name, shipped=shipped)


def record(db, L=4096, config=None, time_ms=1.0, device=DEV, **over):
    key = dict(KEY, **over)
    return db.record(key["backend"], key["kernel"], key["spec"], key["dtype"], {"L": L, "D": 64, "H": 4},
                     config or {"BLOCK_M": 64}, time_ms, device=device, versions={"torch": "test"})


def lookup(db, L=4096, device=DEV, **kw):
    return db.lookup(KEY["backend"], KEY["kernel"], KEY["spec"], KEY["dtype"], {"L": L, "D": 64, "H": 4},
                     device=device, **kw)


def leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if not p.name.endswith((".json", ".json.lock")))


# ----------------------------------------------------------------------------------------- buckets
def test_shape_bucket():
    assert shape_bucket(L=3000, D=64, H=4) == shape_bucket(L=4000, D=64, H=4) == "D=64,H=4,L=4096"
    assert shape_bucket(L=4096, D=64) == "D=64,L=4096"
    assert shape_bucket(L=4097, D=64) == "D=64,L=8192"
    assert shape_bucket(D=100) == "D=100"  # non-length dims stay exact
    assert parse_bucket("D=64,H=4,L=4096") == {"D": 64, "H": 4, "L": 4096}
    for bad in ("L=3000", "L=4096,D=64", "L=x", "L"):  # not canonical / malformed
        with pytest.raises(ValueError):
            parse_bucket(bad)
    with pytest.raises(ValueError, match="positive int"):
        shape_bucket(L=0)


def test_device_slug():
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert device_slug("NVIDIA H200") != device_slug("NVIDIA H100 80GB HBM3")
    assert device_slug("Intel(R) Xeon(R) Platinum 8480+ x2cores") == "intel-xeon-platinum-8480plus-x2cores"
    assert device_slug("///") == "unknown-device"


def test_import_is_cheap_and_versions_come_from_metadata():
    code = ("import sys, lincomp, lincomp.tuning as t; v = t.library_versions(); "
            "assert 'triton' not in sys.modules and 'tvm' not in sys.modules, sys.modules.keys(); "
            "assert set(v) >= {'torch', 'triton', 'tvm'}; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ------------------------------------------------------------------------------------ round trip
def test_round_trip(tmp_path):
    db = make_db(tmp_path)
    stored = record(db, L=3000, config={"BLOCK_M": 128, "num_warps": 4, "stages": [2, 3]}, time_ms=0.25)
    path = tmp_path / "user" / f"{device_slug(DEV)}.json"
    assert stored.source == path and db.file_for(DEV) == path

    doc = json.loads(path.read_text())
    assert (doc["format"], doc["version"], doc["device"]) == (FORMAT, VERSION, DEV)
    (key, raw), = doc["entries"].items()
    assert key == "triton|window_fwd|w1d127.0_c-0123456789ab|float16|D=64,H=4,L=4096"
    assert raw["config"] == {"BLOCK_M": 128, "num_warps": 4, "stages": [2, 3]}
    assert raw["shape"] == {"L": 3000, "D": 64, "H": 4} and raw["versions"] == {"torch": "test"}
    assert raw["timestamp"].endswith("Z")

    hit = lookup(TuningDB(tmp_path / "user", shipped=None), L=4000)  # a fresh instance, same bucket
    assert hit.exact and hit.config == stored.config and hit.time_ms == 0.25 and hit.device == DEV
    hit.config["BLOCK_M"] = 1  # callers get a copy
    assert lookup(db, L=4000).config["BLOCK_M"] == 128
    assert [e.key for e in db.entries()] == [key]

    record(db, L=3000, config={"BLOCK_M": 32}, time_ms=0.2)  # same key: replaced, not duplicated
    assert len(db.entries()) == 1 and lookup(db).config == {"BLOCK_M": 32}


def test_spec_objects_dtypes_and_device_names(tmp_path):
    torch = pytest.importorskip("torch")
    db = make_db(tmp_path)
    spec = AttentionSpec.from_dict({"window": {"kind": "1d", "left": 127, "right": 0}, "causal": True})
    e = db.record("tvm", "window_fwd", spec, torch.float32, {"L": 512, "D": 64}, {"tile": 32}, 3.0,
                  device="cpu")
    assert e.spec == spec.key() and e.dtype == "float32" and e.spec_dict["window"]["left"] == 127
    from lincomp.tuning.device import device_name
    assert e.device == device_name("cpu") and "cores" in e.device
    hit = db.lookup("tvm", "window_fwd", spec.to_dict(), "float32", "D=64,L=512", device=device_name("cpu"))
    assert hit is not None and hit.config == {"tile": 32}
    with pytest.raises(TypeError, match="JSON"):
        db.record("tvm", "k", spec, "float32", {"L": 8}, {"tile": (1, 2)}, 1.0, device="cpu")
    with pytest.raises(ValueError, match="time_ms"):
        db.record("tvm", "k", spec, "float32", {"L": 8}, {"tile": 1}, float("nan"), device="cpu")


# ------------------------------------------------------------------------------------------ lookup
def test_lookup_exact_nearest_none(tmp_path):
    db = make_db(tmp_path)
    record(db, L=1024, config={"B": 1})
    record(db, L=8192, config={"B": 8})
    assert lookup(db, L=1000).config == {"B": 1} and lookup(db, L=1000).exact
    near = lookup(db, L=4096)  # log2 distance 2 to 1024, 1 to 8192
    assert near.config == {"B": 8} and not near.exact and near.bucket == "D=64,H=4,L=8192"
    assert lookup(db, L=2048).config == {"B": 1}
    assert lookup(db, L=4096, nearest=False) is None
    assert lookup(db, device="NVIDIA H200") is None  # another device never borrows H100 configs
    assert db.lookup("triton", "window_fwd", KEY["spec"], "float16", {"L": 4096, "D": 128, "H": 4},
                     device=DEV) is None  # other non-length dims differ: not comparable
    assert db.lookup("triton", "window_fwd", KEY["spec"], "float32", {"L": 1024, "D": 64, "H": 4},
                     device=DEV) is None
    assert db.lookup("triton", "window_bwd", KEY["spec"], "float16", {"L": 1024, "D": 64, "H": 4},
                     device=DEV) is None


def test_nearest_tie_prefers_longer_bucket(tmp_path):
    db = make_db(tmp_path)
    record(db, L=1024, config={"B": 1})
    record(db, L=16384, config={"B": 16})
    assert lookup(db, L=4096).config == {"B": 16}


def test_user_folder_is_read_before_shipped(tmp_path):
    shipped = make_db(tmp_path, "shipped")
    record(shipped, L=1024, config={"from": "shipped"})
    record(shipped, L=2048, config={"from": "shipped"})
    db = TuningDB(tmp_path / "user", shipped=tmp_path / "shipped")
    record(db, L=1024, config={"from": "user"})
    assert lookup(db, L=1024).config == {"from": "user"}
    assert lookup(db, L=2048).config == {"from": "shipped"}
    assert lookup(db, L=512).config == {"from": "user"}  # nearest: found in both folders
    assert [e.config["from"] for e in db.entries()] == ["user", "shipped"]
    assert not (tmp_path / "shipped" / f"{device_slug(DEV)}.json").read_text().count("user")


def test_default_folder_from_env(tmp_path, monkeypatch):
    assert TuningDB().path == tmp_path / "home" / ".cache" / "lincomp" / "tuning_db"
    monkeypatch.setenv("LINCOMP_TUNING_DB", str(tmp_path / "env"))
    assert TuningDB().path == tmp_path / "env"


# -------------------------------------------------------------------------------------- writes
def test_atomic_write_leaves_no_temp_files(tmp_path):
    db = make_db(tmp_path)
    for L in (256, 512, 1024):
        record(db, L=L)
    assert leftovers(tmp_path / "user") == []


def test_crash_mid_write_keeps_old_file(tmp_path, monkeypatch):
    db = make_db(tmp_path)
    record(db, L=1024, config={"B": 1})
    path = db.file_for(DEV)
    before = path.read_bytes()

    import lincomp._atomic

    def crash(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(lincomp._atomic.os, "fsync", crash)  # after the temp file is written
    with pytest.raises(OSError, match="simulated"):
        record(db, L=2048, config={"B": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before and leftovers(tmp_path / "user") == []
    assert lookup(db, L=1024).config == {"B": 1} and lookup(db, L=2048, nearest=False) is None


def _writer(folder, worker, barrier):
    db = TuningDB(folder, shipped=None)
    barrier.wait()  # all four start together, so their writes really interleave
    for i in range(25):
        db.record("triton", f"kernel{worker}", "spec", "float16", {"L": 1024, "D": i + 1}, {"i": i, "w": worker},
                  0.1 * (i + 1), device=DEV, versions={})


def test_concurrent_writers_lose_nothing(tmp_path):
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_writer, args=(tmp_path / "user", w, barrier)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    path = tmp_path / "user" / f"{device_slug(DEV)}.json"
    doc = json.loads(path.read_text())  # valid JSON
    assert len(doc["entries"]) == 100
    db = TuningDB(tmp_path / "user", shipped=None)
    assert {(e.kernel, e.config["i"]) for e in db.entries()} == {(f"kernel{w}", i) for w in range(4) for i in range(25)}
    assert db.validate() == [] and leftovers(tmp_path / "user") == []


# ---------------------------------------------------------------------------------- bad files
def _write(folder, text, device=DEV):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{device_slug(device)}.json"
    path.write_text(text)
    return path


def test_corrupt_file_is_reported_and_ignored(tmp_path):
    path = _write(tmp_path / "user", '{"format": "lincomp-tuning-db", "vers')
    db = make_db(tmp_path)
    with pytest.warns(TuningDBWarning, match=str(path.name) + ".*not valid JSON"):
        assert lookup(db) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file version, not on every lookup
        assert lookup(db) is None
    problems = db.validate()
    assert len(problems) == 1 and problems[0].path == path and "corrupt" in problems[0].message

    with pytest.warns(TuningDBWarning, match="moved it to"):  # a write keeps the damaged bytes aside
        record(db, L=1024)
    assert lookup(db, L=1024) is not None and db.validate() == []
    assert len(list((tmp_path / "user").glob("*.corrupt-*"))) == 1


@pytest.mark.parametrize("doc, why", [
    ({"format": FORMAT, "version": 2, "device": DEV, "entries": {}}, "unsupported version 2"),
    ({"format": "someone-else", "version": 1, "device": DEV, "entries": {}}, "foreign file"),
])
def test_foreign_file_is_ignored_and_not_overwritten(tmp_path, doc, why):
    text = json.dumps(doc)
    path = _write(tmp_path / "user", text)
    db = make_db(tmp_path)
    with pytest.warns(TuningDBWarning, match=why):
        assert lookup(db) is None
    assert why in str(db.validate()[0])
    with pytest.raises(TuningDBError, match="not overwritten"):
        record(db)
    assert path.read_text() == text


def test_invalid_entry_is_skipped_others_kept(tmp_path):
    db = make_db(tmp_path)
    record(db, L=1024, config={"B": 1})
    path = db.file_for(DEV)
    doc = json.loads(path.read_text())
    good_key = next(iter(doc["entries"]))
    bad_key = good_key.replace("L=1024", "L=2048")
    doc["entries"][bad_key] = dict(doc["entries"][good_key], bucket="D=64,H=4,L=2048", time_ms="fast")
    path.write_text(json.dumps(doc))
    with pytest.warns(TuningDBWarning, match="time_ms"):
        assert lookup(db, L=2048).bucket == "D=64,H=4,L=1024"  # the bad entry is not used
    (problem,) = db.validate()
    assert problem.entry == bad_key
    record(db, L=4096)  # merging keeps the invalid entry as it was, for a human to look at
    assert json.loads(path.read_text())["entries"][bad_key]["time_ms"] == "fast"


# ------------------------------------------------------------------------------------------- CLI
def test_cli_show_and_validate(tmp_path, capsys):
    db = make_db(tmp_path)
    record(db, L=3000, config={"BLOCK_M": 64}, time_ms=0.5)
    args = ["--db", str(tmp_path / "user"), "--no-shipped"]
    assert cli.main(["db", "show", *args]) == 0
    out = capsys.readouterr().out
    for text in ("device", "bucket", "config", DEV, "triton/window_fwd", "w1d127.0_c", "D=64,H=4,L=4096",
                 "BLOCK_M=64", "0.5", "user"):
        assert text in out
    assert max(map(len, out.splitlines())) <= 100    # fits a terminal
    assert "0123456789ab" not in out                  # the spec is named, not hashed
    assert cli.main(["show", *args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["config"] == {"BLOCK_M": 64}
    assert cli.main(["db", "show", *args, "--device", "NVIDIA H200"]) == 0
    assert "no entries" in capsys.readouterr().out

    assert cli.main(["db", "validate", *args]) == 0
    assert "ok: 1 file(s), 1 entry" in capsys.readouterr().out

    bad = _write(tmp_path / "user", "not json", device="NVIDIA H200")
    assert cli.main(["db", "validate", *args]) == 1
    out = capsys.readouterr().out
    assert str(bad) in out and "corrupt" in out
    assert cli.main(["db", "show", *args]) == 0  # show still works and points at validate
    captured = capsys.readouterr()
    assert DEV in captured.out and "lincomp db validate" in captured.err
    assert cli.main(["db", "validate", str(db.file_for(DEV))]) == 0


def test_cli_registers_into_a_parent_parser():
    import argparse
    parser = argparse.ArgumentParser(prog="lincomp")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["db", "validate", "some/dir"])
    assert args.func is cli.cmd_validate and args.paths == ["some/dir"]


def test_deeply_nested_json_in_a_db_folder_is_a_problem_not_a_crash(tmp_path):
    """Any JSON file can sit in a folder given to ``db validate`` (e.g. /tmp); nesting past Python's
    recursion limit is reported like any other corrupt file."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    problems, n_files, n_entries = validate_paths([folder])
    assert n_files == 1 and n_entries == 0
    assert len(problems) == 1 and "nested too deeply" in str(problems[0])


def test_cli_show_names_presets_and_says_which_entries_are_shipped(tmp_path, capsys):
    from lincomp import presets
    shipped = tmp_path / "shipped"
    user = TuningDB(tmp_path / "user", shipped=None)
    ship = TuningDB(shipped, shipped=None)
    ship.record("tvm", "window_fwd", presets.lizard().key(), "float32", {"L": 4096, "H": 4, "D": 64}, {"block_m": 64},
                1.5, device=DEV)
    user.record("tvm", "linear_fwd", presets.gla("scalar").key(), "float32", {"L": 1024, "H": 4, "D": 64},
                {"chunk": 16}, 0.25, device=DEV)
    assert cli.main(["db", "show", "--db", str(tmp_path / "user"), "--shipped", str(shipped)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip().startswith("tvm/")}
    assert "lizard" in rows["tvm/window_fwd"] and rows["tvm/window_fwd"].rstrip().endswith("shipped")
    assert "gla-scalar" in rows["tvm/linear_fwd"] and rows["tvm/linear_fwd"].rstrip().endswith("user")
    assert f"device: {DEV}" in out and str(tmp_path / "user") in out


# ------------------------------------------------------------------------------- CPU ISA levels
def test_cpu_names_carry_the_isa_level(monkeypatch):
    from lincomp.tuning import device as dev
    name = dev.device_name("cpu")
    assert name.endswith(" " + dev.cpu_isa()) and "cores " in name and not dev.legacy_cpu_name(name)
    for flags, level in (({"sse2", "avx", "avx2", "avx512f", "avx512_bf16"}, "avx512"),
                         ({"sse2", "avx", "avx2"}, "avx2"), ({"fp", "asimd"}, "neon"), ({"fp", "asimd", "sve"}, "sve")):
        monkeypatch.setattr(dev, "_cpu_flags", lambda flags=flags: flags)
        assert dev.cpu_isa() == level
    assert dev.legacy_cpu_name("AMD EPYC x2cores") and not dev.legacy_cpu_name("AMD EPYC x2cores avx2")
    assert device_slug("AMD EPYC x2cores avx512") == "amd-epyc-x2cores-avx512"


def test_legacy_cpu_entries_are_listed_and_marked_but_never_looked_up(tmp_path, capsys):
    """A file from before the ISA level ("AMD EPYC x2cores") stays valid and listed; the same CPU's lookups, now
    named with their level, never read it (its host's vector width is unknown)."""
    db = make_db(tmp_path)
    record(db, device="AMD EPYC x2cores", config={"block_m": 64})
    assert lookup(db, device="AMD EPYC x2cores avx2") is None and lookup(db, device="AMD EPYC x2cores avx512") is None
    assert lookup(db, device="AMD EPYC x2cores").config == {"block_m": 64}   # only under its own name
    assert validate_paths([tmp_path / "user"])[0] == []
    assert cli.main(["db", "show", "--db", str(tmp_path / "user"), "--no-shipped"]) == 0
    out = capsys.readouterr().out
    assert "device: AMD EPYC x2cores (a CPU name without its ISA level" in out and "lookups do not use" in out


def test_shipped_cpu_entries_name_their_isa_level():
    from lincomp.tuning.db import SHIPPED_DB
    from lincomp.tuning.device import legacy_cpu_name
    files = sorted(SHIPPED_DB.glob("*.json"))
    devices = [json.loads(f.read_text())["device"] for f in files]
    assert devices and not [d for d in devices if legacy_cpu_name(d)]
    assert validate_paths([SHIPPED_DB])[0] == []
