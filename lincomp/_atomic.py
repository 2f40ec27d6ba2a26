"""Atomic file writes: write a temp file in the same folder, fsync it, then rename it over the target."""

from __future__ import annotations

import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Temp files older than this are leftovers of a killed writer (a writer takes seconds) and are removed.
STALE_TMP_S = 3600.0


def _proc_umask():
    """The process umask from /proc/self/status (Linux), read without changing it; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _import_umask() -> int:
    # os.umask can only be read by setting it: done once, at import, never per write (a per-write
    # set-and-restore lets another thread create files with mode 0666 in between).
    mask = _proc_umask()
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _import_umask()


def _umask() -> int:
    mask = _proc_umask()
    return _UMASK_AT_IMPORT if mask is None else mask


def _remove_stale(folder: Path, name: str, suffix: str) -> None:
    """Remove ``.<name>.*<suffix>`` temp files of killed writers (only old ones: a live writer's stays)."""
    pattern = re.compile(re.escape(f".{name}.") + r"[^/]*" + re.escape(suffix) + "$")
    now = time.time()
    try:
        candidates = [p for p in folder.iterdir() if pattern.match(p.name)]
    except OSError:
        return
    for p in candidates:
        try:
            if now - p.stat().st_mtime > STALE_TMP_S:
                p.unlink()
        except OSError:   # another process removed it first, or no permission: not ours to fix
            pass


@contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside ``path`` for a writer to fill (any tool: ``export_library``, numpy, ...);
    fsync it and rename it over ``path`` when the block ends, remove it if the block raises. Readers of
    ``path`` see the old file or the new one, never half of one, even after a crash or power loss. The
    file gets the mode a plain open() would give (0666 & ~umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path.parent, path.name, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())   # mkstemp creates 0600
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _fsync_file(path) -> None:
    """Flush a file the writer may have closed without fsync (e.g. a linker's output)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every file system lets a folder be fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
