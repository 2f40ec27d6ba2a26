"""Run a function on N local processes joined in a process group (tests, benchmarks, notebooks).

``run_local(fn, nprocs, *args)`` spawns ``nprocs`` processes on 127.0.0.1 (a free port, gloo by
default), calls ``fn(rank, world_size, *args)`` in each, and returns the ranks' return values (any
``torch.save``-able object). For real jobs use ``torchrun`` (see examples/distributed_attention.py).
"""

from __future__ import annotations

import os
import socket
import tempfile
from datetime import timedelta
from typing import Callable, List


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable, world: int, port: int, backend: str, timeout_s: float, threads: int,
            out_dir: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")     # stay on the loopback interface
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_local(fn: Callable, nprocs: int, *args, backend: str = "gloo", timeout_s: float = 120.0,
              threads: int = 1) -> List:
    """``[fn(0, nprocs, *args), ..., fn(nprocs - 1, nprocs, *args)]`` computed by ``nprocs`` processes.

    ``fn`` must be importable (a module-level function). A collective that waits longer than
    ``timeout_s`` raises in the process (a deadlock fails instead of hanging). ``threads``: torch
    threads per process.
    """
    import torch
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory(prefix="lincomp-dist-") as out_dir:
        mp.start_processes(_worker, args=(fn, nprocs, free_port(), backend, timeout_s, threads, out_dir, args),
                           nprocs=nprocs, join=True, start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False) for r in range(nprocs)]
