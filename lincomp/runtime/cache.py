"""Where generated code and compiled modules live on disk, and how generated Python is imported.

Triton's interpreter re-reads kernel source with ``inspect``, so generated kernels must be real
``.py`` files that are imported, never ``exec``'d strings. Files are named by a hash of their
source, written atomically, and shared by every process on the machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from types import ModuleType

from lincomp._atomic import atomic_write_text


class CacheDirWarning(UserWarning):
    """The configured cache folder is unusable; a per-user temp folder is used instead."""


_warned_roots: set = set()
_lock = threading.Lock()


def configured_cache_root() -> Path:
    """``$LINCOMP_CACHE_DIR``, else ``~/.cache/lincomp`` (read at call time)."""
    env = os.environ.get("LINCOMP_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    try:
        return Path.home() / ".cache" / "lincomp"
    except (RuntimeError, KeyError):   # no HOME and no passwd entry
        return _fallback_root()


def _fallback_root() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"lincomp-cache-{uid}"


def _claim(root: Path) -> None:
    """The shared temp folder must be ours (0700): another user could plant compiled code in it."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = root.lstat()
    except OSError:
        return
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or not root.is_dir() or root.is_symlink()):
        raise OSError(f"lincomp: {str(root)!r} belongs to another user (or is a link); set LINCOMP_CACHE_DIR "
                      "to a writable folder of yours")


def _usable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:              # read-only parent, a file in the way (NotADirectoryError), ...
        return False
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def cache_dir(*parts: str) -> Path:
    """``$LINCOMP_CACHE_DIR`` (default ``~/.cache/lincomp``) / parts, created on demand.

    A read-only or misplaced folder (a file in the way, no HOME) never stops a kernel call: the cache
    moves to ``<tmp>/lincomp-cache-<uid>`` with one warning per configured folder.
    """
    root = configured_cache_root()
    path = root.joinpath(*parts)
    if _usable(path):
        return path
    fallback = _fallback_root().joinpath(*parts)
    _claim(_fallback_root())
    with _lock:
        if str(root) not in _warned_roots:
            _warned_roots.add(str(root))
            warnings.warn(f"lincomp: the cache folder {str(root)!r} is not a writable folder; caching in "
                          f"{str(_fallback_root())!r} instead (set LINCOMP_CACHE_DIR to a writable folder)",
                          CacheDirWarning, stacklevel=2)
    if not _usable(fallback):
        raise OSError(f"lincomp: neither {str(path)!r} nor {str(fallback)!r} is a writable folder; set "
                      "LINCOMP_CACHE_DIR to one")
    return fallback


def load_generated_module(source: str, stem: str, folder: str = "generated") -> ModuleType:
    """Write ``source`` to ``cache_dir(folder)/<stem>_<hash>.py`` (once) and import it."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    name = f"{stem}_{digest}"
    modname = f"lincomp_generated.{folder}.{name}"
    if modname in sys.modules:
        return sys.modules[modname]
    path = cache_dir(folder) / f"{name}.py"
    if not path.exists() or path.read_text() != source:
        atomic_write_text(path, source)
    spec = importlib.util.spec_from_file_location(modname, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[modname]
        raise
    return module


# ---------------------------------------------------------------------------- signed binary files
def sig_path(path: Path) -> Path:
    """The signature file next to a compiled binary: ``<name>.sig`` holding "<cache key> <sha256>"."""
    return path.with_name(path.name + ".sig")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verified(path: Path, key: str) -> bool:
    """True when ``path``'s signature names this cache key and its bytes hash to the signed digest: a
    truncated file (a crash mid-write), another spec's module copied over it, or any edit fails."""
    try:
        signed_key, digest = sig_path(path).read_text().split()
    except (OSError, ValueError):
        return False
    return signed_key == key and sha256_file(path) == digest
