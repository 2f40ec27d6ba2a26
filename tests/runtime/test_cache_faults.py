"""Fault injection on the compiled-code cache (issue 19): damaged, foreign, unwritable, concurrent and
killed writers. A cached module is trusted only when its signature (cache key + sha256) matches its bytes;
anything else is rebuilt, never loaded, and no fault makes a call crash or return a wrong result."""

import multiprocessing as mp
import os
import signal
import stat
import threading
import time
import warnings

import pytest
import torch

pytest.importorskip("tvm")

from lincomp._atomic import STALE_TMP_S, atomic_write_text  # noqa: E402
from lincomp.runtime import cache as cache_mod  # noqa: E402

SRC = '''@T.prim_func
def times(a: T.Buffer((8,), "float32"), o: T.Buffer((8,), "float32")):
    T.func_attr({{"global_symbol": "times", "tir.noalias": True}})
    for i in range(8):
        o[i] = a[i] * T.float32({factor})
'''


def _build(factor: float, tag: str = "fault"):
    from lincomp.lower.tvmir import build
    build.clear_memo()
    return build.build([SRC.format(factor=factor)], tag)


def _times(built, factor):
    a, o = torch.arange(8, dtype=torch.float32), torch.full((8,), float("nan"))
    built.fn("times")(a, o)
    assert torch.equal(o, torch.arange(8, dtype=torch.float32) * factor)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LINCOMP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _damage(path, data: bytes) -> None:
    """Put ``data`` at ``path`` as a new file (this process has the old one mapped: truncating that inode
    in place would SIGBUS the test itself, not the code under test)."""
    tmp = path.with_name(path.name + ".damage")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sig_ok(path):
    from lincomp.lower.tvmir.build import _verified
    key = path.name.rsplit("-", 1)[1][:-len(".so")]
    return _verified(path, key)


def _child_build(cache_dir, factor, q):
    os.environ["LINCOMP_CACHE_DIR"] = cache_dir
    try:
        b = _build(factor)
        _times(b, factor)
        q.put(b.how)
    except BaseException as e:   # report, so the parent sees more than an exit code
        q.put(f"error {type(e).__name__}: {e}")


def _in_child(cache_dir, factor) -> str:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_build, args=(str(cache_dir), factor, q))
    p.start()
    p.join(300)
    assert p.exitcode == 0, f"the child died with {p.exitcode} (a negative code is a signal: SIGBUS = -7)"
    return q.get(timeout=5)


def test_truncated_module_is_rebuilt_not_loaded(cache):
    """Issue 19 repro: a truncated .so killed every later run with SIGBUS (the child runs the load)."""
    b = _build(2.0)
    assert b.how == "compiled" and _sig_ok(b.path)
    data = b.path.read_bytes()
    _damage(b.path, data[: len(data) // 3])
    assert _in_child(cache, 2.0) == "compiled"
    assert _sig_ok(b.path)
    assert _build(2.0).how == "loaded"


def test_foreign_module_under_the_name_is_rebuilt(cache):
    """Issue 19 repro: a valid .so of another spec placed under a spec's cache name was used unchecked."""
    two, three = _build(2.0), _build(3.0)
    _damage(two.path, three.path.read_bytes())                 # the module alone: its hash does not match
    b = _build(2.0)
    assert b.how == "compiled"
    _times(b, 2.0)
    for suffix in ("", ".sig"):                                # module and signature: the key does not match
        theirs = three.path.parent / (three.path.name + suffix)
        _damage(two.path.parent / (two.path.name + suffix), theirs.read_bytes())
    b = _build(2.0)
    assert b.how == "compiled" and _sig_ok(b.path) and b.path.read_bytes() != three.path.read_bytes()
    _times(b, 2.0)


def test_unsigned_module_is_rebuilt(cache):
    b = _build(2.0)
    (b.path.parent / (b.path.name + ".sig")).unlink()
    assert _build(2.0).how == "compiled" and _sig_ok(b.path)


def test_cache_dir_that_is_a_file_falls_back_with_one_warning(tmp_path, monkeypatch):
    """Issue 19 repro: LINCOMP_CACHE_DIR (or HOME) misplaced raised NotADirectoryError on every call."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("LINCOMP_CACHE_DIR", str(blocker / "sub"))
    monkeypatch.setattr(cache_mod, "_warned_roots", set())
    monkeypatch.setattr(cache_mod, "_fallback_root", lambda: tmp_path / "fallback")
    with pytest.warns(cache_mod.CacheDirWarning, match="not a writable folder"):
        b = _build(5.0)
    _times(b, 5.0)
    assert str(b.path).startswith(str(tmp_path / "fallback"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # once per configured folder, not per call
        cache_mod.cache_dir("tvm")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache_dir_falls_back(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        monkeypatch.setenv("LINCOMP_CACHE_DIR", str(ro))
        monkeypatch.setattr(cache_mod, "_warned_roots", set())
        monkeypatch.setattr(cache_mod, "_fallback_root", lambda: tmp_path / "fallback")
        with pytest.warns(cache_mod.CacheDirWarning):
            _times(_build(6.0), 6.0)
    finally:
        ro.chmod(stat.S_IRWXU)


def test_concurrent_builders_agree(cache):
    """Three processes compile the same module at once into an empty cache: every one gets a correct module,
    and the file left behind is signed and verified."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_child_build, args=(str(cache), 7.0, q)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0] * 3
    hows = [q.get(timeout=5) for _ in procs]
    assert all(h in ("compiled", "loaded") for h in hows), hows
    b = _build(7.0)
    assert b.how == "loaded" and _sig_ok(b.path)


def _kill_builders(cache, delays):
    ctx = mp.get_context("spawn")
    for delay in delays:
        q = ctx.Queue()
        p = ctx.Process(target=_child_build, args=(str(cache), 8.0 + delay, q))
        p.start()
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        b = _build(8.0 + delay)      # whatever the killed writer left: a correct, signed module
        _times(b, 8.0 + delay)
        assert b.path is None or _sig_ok(b.path)


def test_builder_killed_mid_write_leaves_nothing_wrong(cache):
    """SIGKILL a builder while it imports / compiles / writes: the next build is correct and signed."""
    _kill_builders(cache, [4.0])


@pytest.mark.slow
def test_builders_killed_at_many_points(cache):
    _kill_builders(cache, [0.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0])


def test_stale_temp_files_are_removed_by_age(tmp_path):
    """Issue 19 repro: killed writers left temp files forever. Old ones go at the next write; a fresh one
    (a live writer's) stays."""
    target = tmp_path / "db.json"
    old, fresh = tmp_path / ".db.json.abc123.tmp", tmp_path / ".db.json.def456.tmp"
    other = tmp_path / ".other.json.abc.tmp"
    for p in (old, fresh, other):
        p.write_text("partial")
    past = time.time() - STALE_TMP_S - 10
    os.utime(old, (past, past))
    os.utime(other, (past, past))
    atomic_write_text(target, "{}")
    assert not old.exists() and fresh.exists() and other.exists() and target.read_text() == "{}"


def _umask_now() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the umask from /proc")
def test_atomic_writes_never_change_the_process_umask(tmp_path):
    """Issue 19 repro: atomic_path set os.umask(0) process-wide; another thread made 0666 files meanwhile."""
    seen, stop = set(), threading.Event()

    def watch():
        while not stop.is_set():
            seen.add(_umask_now())

    t = threading.Thread(target=watch)
    t.start()
    try:
        for n in range(200):
            atomic_write_text(tmp_path / f"f{n}", "x")
    finally:
        stop.set()
        t.join()
    mask = os.umask(0o022)
    os.umask(mask)
    assert seen == {mask}
    assert stat.S_IMODE((tmp_path / "f0").stat().st_mode) == 0o666 & ~mask
