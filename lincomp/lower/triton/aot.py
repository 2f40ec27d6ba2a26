"""Compile the generated window kernels for a GPU target on a machine without a GPU (a development check).

Triton's whole compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin with its bundled ptxas) runs on the
exact arguments a launch would get, specialised the way the JIT specialises them (alignment,
constexprs), and reports what the compiled kernel needs: registers, spilled bytes, shared memory.
This catches what the interpreter cannot: code only the interpreter accepts, configs that overflow
shared memory, register spills.

``compile_cases(cases)`` runs the compiler in a fresh subprocess: a process that imported triton with
TRITON_INTERPRET=1 has interpreted copies of triton's own library functions (tl.max, tl.sum) and
cannot compile. Uses Triton internals (``create_function_from_signature``, ``JITFunction._pack_args``),
checked with triton 3.7.

    python -m lincomp.lower.triton.aot '[{"spec": {...}, "kernel": "window_fwd", "D": 128}]'
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional


def compile_launch(launch, arch: int = 90) -> dict:
    """{"name", "shared" (bytes), "num_warps", "registers", "spill_bytes"} of one launch (a
    ``window.Launch`` of a module loaded with ``mode="jit"``), compiled in this process."""
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not isinstance(tl.standard.sum, JITFunction) or not isinstance(launch.kernel, JITFunction):
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1 in this process; use compile_cases "
                           "(a clean subprocess)")
    fn = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs, debug=False)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    kernel = compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    md = kernel.metadata
    out = {"name": md.name, "shared": int(md.shared), "num_warps": int(md.num_warps)}
    out.update(_ptxas_stats(kernel.asm["ptx"], arch))
    return out


def _ptxas_stats(ptx: str, arch: int) -> dict:
    """Registers and spilled bytes from ``ptxas -v`` (the ptxas Triton used for the cubin)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d, "k.ptx")
        src.write_text(ptx)
        res = subprocess.run([ptxas.path, "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}", str(src),
                              "-o", str(Path(d, "k.o"))], capture_output=True, text=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spill.group(1)) if spill else None}


def case_launches(case: dict) -> list:
    """The launches of one case: {"spec", "kernel" ("window_fwd" | "window_bwd"), "D", optional "dtype"
    ("bfloat16"), "config" (default: the heuristic), "sinks", "kpm" (bool), "L" (1024), "H" (4), "Hkv" (2)}."""
    import torch

    from lincomp.lower.triton import window_launch as W
    from lincomp.spec import AttentionSpec

    spec = AttentionSpec.coerce(case["spec"])
    D, kernel = int(case["D"]), case["kernel"]
    dtype = getattr(torch, case.get("dtype", "bfloat16"))
    L = spec.expected_length() or int(case.get("L", 1024))
    H, Hkv = int(case.get("H", 4)), int(case.get("Hkv", 2))
    cfg = W.normalize_config(spec, case["config"]) if case.get("config") else W.heuristic_config(kernel, spec, D, D)
    q = torch.randn(1, H, L, D, dtype=dtype)
    k, v = torch.randn(1, Hkv, L, D, dtype=dtype), torch.randn(1, Hkv, L, D, dtype=dtype)
    sink = torch.randn(H, spec.sinks) if case.get("sinks") and spec.sinks else None
    mask = torch.ones(1, L, dtype=torch.bool) if case.get("kpm") else None
    mod = W.load_kernels(spec, mode="jit")
    if kernel == "window_fwd":
        return [W.forward_launch(mod, spec, q, k, v, sink, mask, 0.1, cfg)[0]], cfg
    o, lse = torch.randn_like(q), torch.randn(1, H, L)
    return W.backward_launches(mod, spec, o, q, k, v, o, lse, lse, mask, 0.1, cfg)[0], cfg


def compile_cases(cases: list, arch: int = 90, timeout: Optional[float] = 1800) -> list:
    """Compile every launch of ``cases`` (see :func:`case_launches`) in a clean subprocess; one dict per
    launch: compile_launch's fields + "case" (its index) + "config", or "error"."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "lincomp.lower.triton.aot", "--arch", str(arch), json.dumps(cases)],
                         capture_output=True, text=True, env=env, timeout=timeout)
    rows = [json.loads(line[len("AOT "):]) for line in res.stdout.splitlines() if line.startswith("AOT ")]
    if res.returncode != 0 and not rows:
        raise RuntimeError(f"aot compile subprocess failed:\n{res.stderr[-3000:]}")
    return rows


def _main(argv) -> int:
    arch = 90
    if argv[:1] == ["--arch"]:
        arch, argv = int(argv[1]), argv[2:]
    cases = json.loads(argv[0])
    for n, case in enumerate(cases):
        try:
            launches, cfg = case_launches(case)
            for launch in launches:
                try:
                    row = compile_launch(launch, arch)
                except Exception as e:  # report, keep going
                    row = {"name": getattr(launch.kernel, "__name__", "?"), "error": f"{type(e).__name__}: {e}"[-800:]}
                print("AOT " + json.dumps(dict(row, case=n, config=cfg)), flush=True)
        except Exception as e:
            print("AOT " + json.dumps({"case": n, "error": f"{type(e).__name__}: {e}"[-800:]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
