"""Compile generated TVMScript for the host CPU, with an in-process memo and an on-disk module cache.

``build(funcs, tag)`` wraps PrimFunc texts into one ``@I.ir_module``, and returns a :class:`Built` (the
loaded runtime module plus the full source). The cache key is a hash of the source, the LLVM target and
the TVM version: a second process finds ``<cache>/tvm/<tag>-<hash>.so`` and loads it (milliseconds)
instead of parsing and compiling (a second or more). Files are written atomically (temp + fsync +
rename) with a signature ``<file>.so.sig`` (cache key + sha256 of the bytes) checked before every load:
a truncated file (which would kill the process with SIGBUS when loaded), a foreign module copied under
the name, or a file without signature is rebuilt, never loaded.

Target: ``{"kind": "llvm", "mcpu": <host cpu>, "num-cores": <usable cores>}``; a plain "llvm" target
would emit generic x86-64 code. ``LINCOMP_TVM_MCPU`` overrides the CPU name (e.g. "sapphirerapids").
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional

import tvm
from tvm.script import ir as I
from tvm.script import tirx as T

from lincomp._atomic import atomic_path, atomic_write_text
from lincomp.lower.tvmir import intrinsics, threads
from lincomp.lower.tvmir.codegen import HEADER
from lincomp.runtime.cache import cache_dir
from lincomp.runtime.cache import sha256_file as _sha256
from lincomp.runtime.cache import sig_path as _sig_path
from lincomp.runtime.cache import verified as _verified

# Bump when the generated code's meaning changes without its text changing (e.g. the exp2 lowering).
CODEGEN_VERSION = "2"   # 2: exp2 passes NaN through
_lock = threading.Lock()
_memo: Dict[str, "Built"] = {}
STATS = {"compiled": 0, "loaded": 0, "memo": 0, "rejected": 0, "compile_s": 0.0, "load_s": 0.0}


@dataclass
class Built:
    """A compiled module: ``fn(name)`` gets a PrimFunc, ``source`` is what ``kernel.source`` shows."""

    module: object
    source: str
    path: Optional[Path]
    how: str                      # "compiled", "loaded" (from disk) or "memo" (this process)
    seconds: float
    _fns: dict = field(default_factory=dict, repr=False)

    def fn(self, name: str):
        if name not in self._fns:
            self._fns[name] = self.module[name]
        return self._fns[name]


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@lru_cache(maxsize=None)
def host_cpu() -> str:
    name = os.environ.get("LINCOMP_TVM_MCPU")
    if name:
        return name
    try:
        return str(tvm.target.codegen.llvm_get_system_cpu())
    except Exception:  # pragma: no cover - very old LLVM
        return "generic"


_threads_set = False
SPIN_COUNT = 2000


def ensure_threads() -> None:
    """Run TVM's thread pool on every usable core (once, before the first kernel).

    TVM's default is hardware_concurrency / 2 (it assumes two hyper-threads per core): one thread on a
    2-vCPU machine. ``TVM_NUM_THREADS`` set by the user wins.
    """
    global _threads_set
    if _threads_set:
        return
    _threads_set = True
    # TVM's idle workers spin (sched_yield) 300000 times before they sleep: ~0.1 s after every kernel in
    # which they take the cores from the torch ops that follow it (measured: a compiled chunked GLA after
    # a lincomp kernel ran at 13-16 ms instead of 7). A short spin keeps back-to-back kernels cheap to
    # launch and leaves the cores to torch soon after. Read when the pool starts; a user's setting wins.
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", str(SPIN_COUNT))
    if os.environ.get("TVM_NUM_THREADS"):
        return
    n = usable_cores()
    os.environ["TVM_NUM_THREADS"] = str(n)
    config = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if config is not None and tvm.runtime.num_threads() != n:
        config(1, n)   # 1 = kBig (no pinning to "little" cores); n workers


@lru_cache(maxsize=None)
def target() -> "tvm.target.Target":
    return tvm.target.Target({"kind": "llvm", "mcpu": host_cpu(), "num-cores": usable_cores()})


# fp32 lanes per vector register by the widest x86 vector extension the target CPU has.
_X86_LANES = (("avx512f", 16), ("avx", 8), ("sse2", 4))


@lru_cache(maxsize=None)
def vector_lanes() -> int:
    """fp32 lanes of the widest vector register of the target (16 with AVX-512, 8 with AVX2).

    Read from the CPU's features: LLVM's ``llvm_get_vector_width`` says 512 bits for AMD Zen 3, which has
    no AVX-512, and micro-kernels sized for 16 lanes and 32 registers spill there (measured 1.5-2x slower).
    """
    try:
        features = tvm.target.codegen.llvm_get_cpu_features(target())
        for feature, lanes in _X86_LANES:
            if feature in features:
                return lanes
        return max(4, int(tvm.target.codegen.llvm_get_vector_width(target())) // 32)   # not x86
    except Exception:  # pragma: no cover
        return 8


@lru_cache(maxsize=None)
def bf16_dot() -> bool:
    """The target CPU has AVX-512 BF16 (``vdpbf16ps``): the bf16 window kernel's dot products."""
    try:
        return "avx512bf16" in tvm.target.codegen.llvm_get_cpu_features(target())
    except Exception:  # pragma: no cover
        return False


def vector_registers() -> int:
    """Architectural vector registers (32 with AVX-512, 16 otherwise)."""
    return 32 if vector_lanes() >= 16 else 16


def target_key() -> str:
    return f"llvm-{host_cpu()}-{usable_cores()}c-tvm{tvm.__version__}-cg{CODEGEN_VERSION}"


def module_text(funcs: List[str]) -> str:
    """The ``@I.ir_module`` holding the PrimFunc texts (what gets parsed)."""
    body = "\n".join("    " + line if line else "" for f in funcs for line in (f.rstrip("\n") + "\n").split("\n"))
    return "@I.ir_module\nclass Module:\n" + body


def full_source(funcs: List[str]) -> str:
    """The readable source shown to users: import header + the module."""
    return HEADER + "\n\n" + module_text(funcs)


def parse(funcs: List[str]):
    intrinsics.register()
    return tvm.script.from_source(module_text(funcs),
                                  extra_vars={"I": I, "T": T, "math": math, **intrinsics.SCRIPT_VARS})


def build(funcs: List[str], tag: str) -> Built:
    """Compile (or load from the disk cache) the module of ``funcs``. Thread-safe, memoised.

    The module's parallel loops run on torch's OpenMP threads (:mod:`lincomp.lower.tvmir.threads`),
    else on TVM's pool."""
    source = full_source(funcs)
    key = hashlib.sha256((target_key() + "\n" + intrinsics.FINGERPRINT + "\n" + source).encode()).hexdigest()[:20]
    with _lock:
        hit = _memo.get(key)
        if hit is not None:
            STATS["memo"] += 1
            return hit
        folder = cache_dir("tvm", _slug(target_key()))
        path = folder / f"{tag}-{key}.so"
        built = None
        if path.exists():
            t0 = time.perf_counter()
            try:
                if not _verified(path, key):   # truncated, foreign or unsigned: never dlopen it (SIGBUS)
                    raise OSError("content hash does not match")
                intrinsics.register()
                module = tvm.runtime.load_module(str(path))
                built = Built(module, source, path, "loaded", time.perf_counter() - t0)
                STATS["loaded"] += 1
                STATS["load_s"] += built.seconds
            except Exception:  # a damaged or foreign file: rebuild it (the rename below replaces it)
                built = None
                STATS["rejected"] += 1
        if built is None:
            t0 = time.perf_counter()
            ex = tvm.compile(parse(funcs), target=target())
            try:
                _export(ex, path, key)
                module = tvm.runtime.load_module(str(path))
            except Exception:  # no C toolchain to link a .so: keep the in-memory module (TVM's pool)
                module, path = ex.mod, None
            built = Built(module, source, path, "compiled", time.perf_counter() - t0)
            STATS["compiled"] += 1
            STATS["compile_s"] += built.seconds
        if not threads.attach(built.path):
            ensure_threads()
        _memo[key] = built
        return built


def _export(ex, path: Path, key: str) -> None:
    """``export_library`` to a temp name in the same folder, fsync, rename (readers never see half a file);
    then the signature ``<file>.sig``: the module's cache key and the sha256 of its bytes."""
    with atomic_path(path, suffix=".so") as tmp:
        ex.export_library(str(tmp))
        digest = _sha256(tmp)
    atomic_write_text(_sig_path(path), f"{key} {digest}\n")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in text)


def clear_memo() -> None:
    """Forget compiled modules of this process (tests use it to time a cold disk-cache load)."""
    with _lock:
        _memo.clear()
