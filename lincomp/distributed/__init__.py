"""Sequence and patch parallelism for lincomp attention over ``torch.distributed`` (gloo or NCCL).

    import lincomp.distributed as ld
    layout = ld.Layout.for_spec(spec, world_size)            # slices (1D) or patches (2D/3D grids)
    q_local = ld.shard(q, layout, rank)                       # prefix (replicated) + own tokens
    o_local = ld.attention(spec, q_local, k_local, v_local, layout=layout, **tensors)
    o = ld.gather(o_local, layout)                            # the whole output on every rank

Windows exchange only the halo their reach needs (overlapped with the interior rows); causal linear
branches scan per-rank states; prefix tokens are replicated (exact or CLEAR's approximate mode). Packed rows
(``cu_seqlens``) may have documents crossing rank borders.
Forward and backward are exact. ``run_local`` spawns N local processes (tests, benchmarks).
"""

from lincomp.distributed.engine import PREFIX_MODES, attention
from lincomp.distributed.layout import Layout, gather, shard, unshard
from lincomp.distributed.launch import free_port, run_local
from lincomp.distributed.plan import global_plan, traffic

__all__ = ["attention", "Layout", "shard", "unshard", "gather", "run_local", "free_port", "global_plan", "traffic",
           "PREFIX_MODES"]
