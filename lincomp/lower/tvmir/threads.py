"""Run the TVM kernels' parallel loops on torch's OpenMP threads, so one process has one thread pool.

Why: torch's CPU ops run on OpenMP (libgomp in the pip wheels) and TVM's runtime brings its own pthread
pool. In a model both run by turns, and each pool's idle workers spin for a while after their last job
(libgomp's default: ~300000 polls, milliseconds) on the cores the other pool's next job needs: on a 2-core
VM the causal sliding window at L=4096 ran 14.3 ms after torch ops against 8.1 ms with torch's workers
sleeping (``OMP_WAIT_POLICY=PASSIVE``, which libgomp reads only when it loads, i.e. before ``import torch``).

How: a generated module calls its parallel loops through the function pointer
``__TVMBackendParallelLaunch`` that the module exports and TVM fills in when it loads it. After loading
one of lincomp's modules, :func:`attach` points it at a 20-line C function (compiled once into the
cache folder) that runs the loop's tasks as one ``GOMP_parallel`` region of the OpenMP runtime torch
loaded. The tasks and their split are TVM's own (task ``i`` of ``n`` computes the same rows), so results
are bit-identical; the thread count is torch's (``torch.set_num_threads``), and a kernel called inside
a parallel region runs on one thread, as nested torch ops do. Other TVM modules in the process are
untouched.

``LINCOMP_TVM_POOL=tvm`` keeps TVM's own pool (then ``TVM_NUM_THREADS`` sizes it); the default ``auto``
uses OpenMP whenever torch's OpenMP runtime is found and a C compiler can build the launcher, and falls
back to TVM's pool (with a short spin, :func:`lincomp.lower.tvmir.build.ensure_threads`) otherwise.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Optional

from lincomp._atomic import atomic_path, atomic_write_text

ENV = "LINCOMP_TVM_POOL"
CHOICES = ("auto", "openmp", "tvm")

# TVMParallelGroupEnv / FTVMParallelLambda as in tvm/runtime/c_backend_api.h. The OpenMP entry points are
# passed in as pointers (not linked), so the launcher uses exactly the runtime torch loaded.
LAUNCHER_C = r"""
#include <stdint.h>
typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);
typedef void (*gomp_parallel_t)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
typedef int (*omp_int_t)(void);
typedef void (*gomp_barrier_t)(void);
static gomp_parallel_t p_parallel;
static omp_int_t p_thread_num, p_num_threads;
static gomp_barrier_t p_barrier;

void lincomp_omp_init(void* parallel, void* thread_num, void* num_threads, void* barrier) {
  p_parallel = (gomp_parallel_t)parallel;
  p_thread_num = (omp_int_t)thread_num;
  p_num_threads = (omp_int_t)num_threads;
  p_barrier = (gomp_barrier_t)barrier;
}

struct job { FTVMParallelLambda f; void* cdata; int num_task; volatile int failed; };

static void run_tasks(void* arg) {
  struct job* j = (struct job*)arg;
  int tid = p_thread_num(), team = p_num_threads();
  /* num_task 0: one task per thread of the team (TVM's meaning); a smaller team than asked (nested
     parallelism, thread limits) runs several tasks per thread, the same tasks. */
  int n = j->num_task > 0 ? j->num_task : team;
  TVMParallelGroupEnv env = {0, n};
  for (int t = tid; t < n; t += team)
    if (j->f(t, &env, j->cdata) != 0) j->failed = 1;
}

int lincomp_parallel_launch(FTVMParallelLambda f, void* cdata, int num_task) {
  struct job j = {f, cdata, num_task, 0};
  p_parallel(run_tasks, &j, num_task > 0 ? (unsigned)num_task : 0u, 0u);
  return j.failed ? -1 : 0;
}

int lincomp_parallel_barrier(int task_id, TVMParallelGroupEnv* penv) {
  (void)task_id;
  if (p_num_threads() != penv->num_task) return -1;   /* several tasks per thread: a barrier would hang */
  p_barrier();
  return 0;
}
"""

_lock = threading.Lock()
_state = {"launcher": None, "why": None, "runtime": None, "tried": False}


def choice() -> str:
    """``$LINCOMP_TVM_POOL`` (``auto`` when unset), checked."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(CHOICES)} (auto: torch's OpenMP threads "
                         "when available; tvm: TVM's own thread pool)")
    return value


def openmp_runtime() -> Optional[str]:
    """Path of the OpenMP runtime loaded in this process (torch's libgomp / libiomp5 / libomp), else None."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if ".so" in line and "/" in line}
    except OSError:   # not Linux
        return None
    for pattern in (r"libgomp[^/]*\.so[^/]*$", r"libiomp5[^/]*\.so[^/]*$", r"libomp[^/]*\.so[^/]*$"):
        hits = sorted(p for p in paths if re.search(pattern, os.path.basename(p)))
        if hits:
            return hits[0]
    return None


def _compile_launcher() -> Path:
    """Build the launcher .so into the cache (once per source; signed like the kernel modules)."""
    from lincomp.runtime.cache import cache_dir, sha256_file, sig_path, verified
    key = hashlib.sha256(LAUNCHER_C.encode()).hexdigest()[:20]
    path = cache_dir("tvm", "openmp") / f"launcher-{key}.so"
    if verified(path, key):
        return path
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc / gcc / $CC) to build the OpenMP launcher")
    src = path.with_suffix(".c")
    atomic_write_text(src, LAUNCHER_C)
    with atomic_path(path, suffix=".so") as tmp:
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src)], check=True,
                       capture_output=True, timeout=120)
        digest = sha256_file(tmp)
    atomic_write_text(sig_path(path), f"{key} {digest}\n")
    return path


def _addr(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def launcher():
    """The loaded launcher (a ctypes library), or None when TVM's pool is used; see :func:`status`."""
    with _lock:
        if _state["tried"]:
            return _state["launcher"]
        _state["tried"] = True
        if choice() == "tvm":
            _state["why"] = f"{ENV}=tvm"
            return None
        try:
            import torch  # noqa: F401  (loads the OpenMP runtime whose threads the kernels share)
            runtime = openmp_runtime()
            if runtime is None:
                raise OSError("torch's OpenMP runtime is not loaded in this process")
            omp = ctypes.CDLL(runtime)
            entry = [_addr(getattr(omp, name)) for name in
                     ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads", "GOMP_barrier")]
            lib = ctypes.CDLL(str(_compile_launcher()))
            lib.lincomp_omp_init(*(ctypes.c_void_p(a) for a in entry))
        except (OSError, AttributeError, subprocess.SubprocessError) as e:
            if choice() == "openmp":
                raise RuntimeError(f"{ENV}=openmp, but the OpenMP launcher is unavailable: {e}") from e
            _state["why"] = f"TVM's own pool ({e})"
            return None
        _state["launcher"], _state["runtime"] = lib, runtime
        return lib


def attach(path) -> bool:
    """Point the loaded module at ``path`` at the OpenMP launcher; False (TVM's pool stays) when not used."""
    lib = launcher()
    if lib is None or path is None:
        return False
    module = ctypes.CDLL(str(path))   # the handle TVM's dlopen got: same file, same instance
    for symbol, fn in (("__TVMBackendParallelLaunch", lib.lincomp_parallel_launch),
                       ("__TVMBackendParallelBarrier", lib.lincomp_parallel_barrier)):
        try:
            ctypes.c_void_p.in_dll(module, symbol).value = _addr(fn)
        except ValueError:   # the module has no parallel loop (or no barrier): nothing to point
            pass
    return True


def status() -> str:
    """One line for benchmark tables: which pool runs the kernels' parallel loops."""
    lib = launcher()
    if lib is not None:
        return f"torch's OpenMP threads ({os.path.basename(_state['runtime'])})"
    return _state["why"] or "TVM's own pool"
