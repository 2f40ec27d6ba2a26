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
from pathlib import Path
from types import ModuleType

from lincomp._atomic import atomic_write_text


def cache_dir(*parts: str) -> Path:
    """``$LINCOMP_CACHE_DIR`` (default ``~/.cache/lincomp``) / parts, created on demand."""
    root = Path(os.environ.get("LINCOMP_CACHE_DIR", Path.home() / ".cache" / "lincomp"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


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
