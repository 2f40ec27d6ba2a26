"""Device identity for the tuning database: which exact chip a tuned config belongs to.

The database is keyed by the device *model* name, not the architecture: an H100 and an H200 share
sm_90 but not their best tile sizes. Nothing here imports triton or tvm (versions come from package
metadata), and torch is imported only when a device has to be queried.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from typing import Any

# Device types torch understands; a string outside these is taken to be a device *name* already.
_TORCH_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu|hip)(:\d+)?$")

# Distribution names each library ships under (first one installed wins).
_DISTRIBUTIONS = {
    "torch": ("torch",),
    "triton": ("triton", "pytorch-triton", "pytorch-triton-rocm", "triton-windows"),
    "tvm": ("apache-tvm", "tvm", "mlc-ai-nightly", "mlc-ai-nightly-cpu"),
}


def device_name(device: Any = None) -> str:
    """A stable human name for ``device`` (a torch.device, "cuda:1", "cpu", an index, or None).

    CUDA/ROCm: the driver's model name, e.g. "NVIDIA H100 80GB HBM3". CPU: the processor model, the cores
    this process may use and the vector ISA level, e.g. "AMD EPYC x2cores avx2" (core count and vector width
    change the best schedule; see :func:`cpu_name`).
    None means the current default: the current CUDA device if there is one, else the CPU.
    """
    import torch

    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    elif isinstance(device, int):
        device = torch.device("cuda", device)
    else:
        device = torch.device(device)
    if device.type == "cpu":
        return cpu_name()
    if device.type == "mps":
        return f"Apple MPS ({cpu_name()})"
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, ...
    if backend is None or not hasattr(backend, "get_device_name"):
        return f"{device.type} ({platform.machine() or 'unknown'})"
    index = device.index if device.index is not None else backend.current_device()
    return str(backend.get_device_name(index)).strip()


def resolve_device_name(device: Any = None) -> str:
    """``device`` as a database name: strings that are not torch device specs pass through as names."""
    if isinstance(device, str) and not _TORCH_DEVICE.match(device.strip()):
        name = device.strip()
        if not name:
            raise ValueError("device name must not be empty; pass a torch device or a name such as 'NVIDIA H100'")
        return name
    return device_name(device)


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    """The CPU model name, usable core count and vector ISA level, e.g. "Intel(R) Xeon(R) Platinum 8480+ x2cores
    avx512". The level is part of the name because one model name covers hosts with different vector units (a
    cloud "AMD EPYC" is Zen 2, 3 or 4: AVX2 or AVX-512), and the TVM kernels' micro-kernels are sized by it."""
    return f"{_cpu_model()} x{_cpu_cores()}cores {cpu_isa()}"


# x86 vector ISA levels, widest first, by the /proc/cpuinfo flag that defines each: what the TVM kernels are
# sized by (fp32 lanes and vector registers). bf16 / VNNI extensions are not part of the level: no CPU kernel
# uses them (bf16 inputs are widened to fp32).
_X86_LEVELS = (("avx512f", "avx512"), ("avx2", "avx2"), ("avx", "avx"), ("sse2", "sse2"))
# A CPU name as lincomp wrote it before the ISA level was added ("AMD EPYC x2cores"): see legacy_cpu_name.
_LEGACY_CPU = re.compile(r"^\S.* x\d+cores$")


def cpu_isa() -> str:
    """The CPU's vector ISA level: "avx512", "avx2", "avx" or "sse2" on x86; "sve" or "neon" on Arm; else the
    machine name. Read from the kernel's CPU flags (no tvm import); the same flags that size the kernels."""
    flags = _cpu_flags()
    for flag, level in _X86_LEVELS:
        if flag in flags:
            return level
    for flag, level in (("sve", "sve"), ("asimd", "neon"), ("neon", "neon")):
        if flag in flags:
            return level
    return (platform.machine() or "unknown").lower()


def legacy_cpu_name(name: str) -> bool:
    """True for a CPU name without an ISA level ("AMD EPYC x2cores"), as lincomp named CPUs before it added the
    level. Its tuned configs may come from a host with other vector units, so lookups never use them: no
    current device has such a name. Re-tune (``lincomp tune``), or, knowing the host it was tuned on, rename
    the file's device (and the file) to the name with that host's level."""
    return bool(_LEGACY_CPU.match(name))


def _cpu_flags() -> set:
    """The CPU feature flags of /proc/cpuinfo ("flags" on x86, "Features" on Arm); empty when unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                field, _, value = line.partition(":")
                if field.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                field, _, value = line.partition(":")
                # x86 says "model name"; some ARM kernels only say "Hardware" or "Processor".
                if field.strip() in ("model name", "Hardware", "Processor") and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_cores() -> int:
    # The cores this process may run on (a container limited to 2 of 128 cores is a different
    # tuning target than the whole machine).
    if hasattr(os, "sched_getaffinity"):
        try:
            return len(os.sched_getaffinity(0))
        except OSError:
            pass
    return os.cpu_count() or 1


def device_slug(name: str) -> str:
    """A filesystem-safe, lowercase slug of a device name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    s = name.lower()
    s = re.sub(r"\((r|tm|c)\)", " ", s)  # Intel(R), Core(TM): noise in a file name
    s = s.replace("+", "plus")  # keep "8480+" distinct from "8480"
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s[:120].rstrip("-") or "unknown-device"


def library_versions() -> dict:
    """Versions of the libraries a tuned config depends on ({"torch": "2.13.0", "triton": ..., "tvm": ...}).

    Read from package metadata so that neither triton nor tvm gets imported; None when not installed.
    """
    versions = {"python": platform.python_version()}
    for lib, dists in _DISTRIBUTIONS.items():
        versions[lib] = None
        for dist in dists:
            try:
                versions[lib] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions

