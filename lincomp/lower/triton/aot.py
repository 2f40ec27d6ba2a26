"""Compile a generated kernel launch for a GPU target on a machine without a GPU (a development check).

``compile_launch(launch, arch=90)`` runs Triton's whole compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin
with the bundled ptxas) on the exact arguments a launch would get, specialised the way the JIT would
(alignment, constexprs), and returns what the compiled kernel needs: registers, spills, shared memory.
It catches what the interpreter cannot: code the compiler rejects, configs that overflow shared
memory, register spills. It uses Triton internals (``create_function_from_signature``,
``JITFunction._pack_args``), checked against triton 3.6 / 3.7.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path


def compile_launch(launch, arch: int = 90, ptxas_verbose: bool = True) -> dict:
    """{"name", "shared" (bytes), "num_warps", "registers", "spill_bytes", "ptx_lines"} for ``launch``
    (a :class:`lincomp.lower.triton.window.Launch` of a module loaded with ``mode="jit"``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    if not hasattr(fn, "params"):
        raise TypeError("compile_launch needs a compiled-mode kernel (load_kernels(spec, mode='jit'))")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs, debug=False)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    kernel = compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    md = kernel.metadata
    out = {"name": md.name, "shared": int(md.shared), "num_warps": int(md.num_warps),
           "ptx_lines": kernel.asm["ptx"].count("\n")}
    if ptxas_verbose:
        out.update(_ptxas_stats(kernel.asm["ptx"], arch))
    return out


def _ptxas_stats(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from ``ptxas -v`` on the PTX (the cubin Triton built used the same ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch) if _takes_arch() else get_ptxas()
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d, "k.ptx")
        src.write_text(ptx)
        res = subprocess.run([ptxas.path, "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o", str(Path(d, "k.o"))],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spill.group(1)) if spill else None}


def _takes_arch() -> bool:
    import inspect

    from triton.backends.nvidia.compiler import get_ptxas
    return len(inspect.signature(get_ptxas).parameters) > 0
