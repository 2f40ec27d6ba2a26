"""Sequence / patch parallel attention with lincomp.distributed.

    torchrun --nproc-per-node 4 examples/distributed_attention.py                  # CLEAR: 2D patches + text
    torchrun --nproc-per-node 2 examples/distributed_attention.py --spec lizard    # 1D slices, hybrid
    torchrun --nproc-per-node 2 examples/distributed_attention.py --check          # compare with one process

Every rank builds the same global q/k/v (fixed seed), keeps its shard (the text tokens replicated,
its slice or patch of the rest), runs forward and backward through ``lincomp.distributed.attention``
and reports time and bytes sent against an all-gather of the full K/V. NCCL when every rank has a
GPU, gloo otherwise.
"""

import argparse
import os
import time
from collections import Counter

import torch
import torch.distributed as dist

import lincomp
import lincomp.distributed as ld
from lincomp.testing import random_inputs, rel_err


def make_spec(a):
    if a.spec == "clear":
        return lincomp.presets.clear(radius=a.radius, grid=(a.size, a.size), text_tokens=a.text)
    if a.spec == "lizard":
        return lincomp.presets.lizard(window=a.window, feature_dim=a.dim // 2)
    if a.spec == "lolcats":
        return lincomp.presets.lolcats(block=a.window // 2, feature_dim=a.dim // 2)
    return lincomp.presets.gla("scalar")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", choices=["clear", "lizard", "lolcats", "gla"], default="clear")
    p.add_argument("--size", type=int, default=16, help="grid side (clear) or sequence length / 16 (others)")
    p.add_argument("--radius", type=int, default=4)
    p.add_argument("--text", type=int, default=16, help="text (prefix) tokens of clear")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--prefix-mode", choices=ld.PREFIX_MODES, default="exact")
    p.add_argument("--target", default="auto", help="lincomp.compile target of the local kernels")
    p.add_argument("--iters", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--check", action="store_true", help="compare with the single-process reference")
    a = p.parse_args()

    gpu = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if gpu else "cpu")
    if gpu:
        torch.cuda.set_device(device)

    spec = make_spec(a)
    inputs = random_inputs(spec, B=1, H=a.heads, D=a.dim, L=16 * a.size, seed=0, device=device)
    L = inputs["q"].shape[2]
    layout = ld.Layout.for_spec(spec, world, length=L)
    local = {k: ld.shard(t, layout, rank) if k in ("q", "k", "v", "g") else t for k, t in inputs.items()}
    for k in ("q", "k", "v"):
        local[k].requires_grad_(True)

    times = []
    for step in range(a.iters + 1):                 # step 0 warms up (kernel builds, allocator)
        stats = Counter()
        for t in local.values():
            if isinstance(t, torch.Tensor):
                t.grad = None
        dist.barrier()
        t0 = time.perf_counter()
        o = ld.attention(spec, **local, layout=layout, prefix_mode=a.prefix_mode, target=a.target, stats=stats)
        o.square().mean().backward()
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = sorted(times[1:])[len(times[1:]) // 2] if a.iters else times[0]

    own = layout.local_length(rank) - layout.prefix
    kv_bytes = own * (local["k"].shape[1] * (local["k"].shape[3] + local["v"].shape[3])) * local["k"].element_size()
    report = {"rank": rank, "patch": layout.box(rank), "s": seconds, "sent": sum(stats.values()),
              "allgather": (world - 1) * kv_bytes, "kinds": dict(stats)}
    reports = [None] * world
    dist.all_gather_object(reports, report)
    full = ld.gather(o, layout)
    if rank == 0:
        print(f"{spec!r}\n{world} ranks ({dist.get_backend()}), layout {layout}, L = {L}")
        for r in reports:
            print(f"  rank {r['rank']}: box {r['patch']}, fwd+bwd {r['s'] * 1e3:7.1f} ms, sent {r['sent'] / 1e3:8.1f} kB "
                  f"(all-gather of K/V: {r['allgather'] / 1e3:8.1f} kB)  {r['kinds']}")
        if a.check:
            ref = lincomp.reference(spec, **inputs)
            n = spec.prefix
            if a.prefix_mode == "approximate" and not spec.causal:
                ref, full = ref[:, :, n:], full[:, :, n:]      # approximate mode changes only the text rows
            print(f"max relative error against one process: {rel_err(full, ref):.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
