"""Grid windows on the CPU: CLEAR with pooled keys/values (``window.pool``) and sliding tiles, lincomp TVM vs
compiled FlexAttention.

    python benchmarks/bench_pool.py [--reps 10] [--unpooled] [--sta] [--out benchmarks/results/pool_cpu.md]

Case: CLEAR r=8 circle on a 64x64 grid + 64 prefix tokens, pooling factor 4 (CLEAR's df=4 checkpoints),
B=1, H=4, D=64, fp32. The peer is torch.compile(flex_attention) on the same mask with the P = 256 pooled
keys appended after the L tokens (keys = L + P; grid queries see all of them, prefix queries none), its
block mask built once outside the timing; both sides pool k and v inside the timed call. The FLOP floor
counts the visible pairs only (window + prefix + pooled). Timing method and table: ``bench_cpu.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cpu as bc  # noqa: E402  (sets the allocator policy before torch loads)

import torch  # noqa: E402

from lincomp import presets  # noqa: E402
from lincomp.reference import window_mask  # noqa: E402
from lincomp.ir.flex import pooled_mask_mod  # noqa: E402
from lincomp.runtime.pool import pooled_kv  # noqa: E402
from lincomp.testing import random_inputs, rel_err  # noqa: E402


def clear_pool(bench: bc.Bench, radius: int = 8, grid=(64, 64), prefix: int = 64, factor: int = 4):
    spec = presets.clear_pool(radius, factor, grid, text_tokens=prefix)
    L, P = spec.expected_length(), spec.window.pooled_tokens
    x = random_inputs(spec, B=bc.B, H=bc.H, D=bc.D, seed=4)
    q, k, v, w = x["q"], x["k"], x["v"], x["pool_weight"]
    pairs = int(window_mask(spec, L).sum()) + (L - prefix) * P
    ours = bench.ours(spec, x)
    flex, built = bc.flex_peer(pooled_mask_mod(spec), L, kv_len=L + P)

    def peer():
        kp, vp = pooled_kv(spec, k, v, w)
        return flex(q, torch.cat([k, kp], 2), torch.cat([v, vp], 2))
    with torch.no_grad():
        o_flex = peer()
    notes = {"torch.compile(flex_attention)": f"keys L + P = {L} + {P}, row-major 128-blocks; block mask "
                                              f"{built:.1f}s; rel diff vs ours {rel_err(ours[1], o_flex):.1e}"}
    bench.windowed(f"clear r={radius} pool {factor} {grid[0]}x{grid[1]}+{prefix}", ours, x,
                   4 * bc.D * pairs * bc.B * bc.H, {"torch.compile(flex_attention)": peer}, notes,
                   goal_flex=5.0, goal_floor=2.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--unpooled", action="store_true", help="also time unpooled CLEAR r=8 (bench_cpu.py's case)")
    ap.add_argument("--sta", action="store_true", help="also time the sta-video sliding-tile window (8x16x16 grid, "
                    "tiles 2x4x4, kernel 3x3x3) against FlexAttention on the same mask")
    ap.add_argument("--out", default=str(bc.ROOT / "benchmarks" / "results" / "pool_cpu.md"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    torch.manual_seed(0)
    from lincomp.lower.tvmir.build import host_cpu, usable_cores
    torch.set_num_threads(usable_cores())
    bench = bc.Bench(args.reps, False)
    meta = {"cpu": bc.cpu_model(), "mcpu": host_cpu(), "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    if args.unpooled:   # the same machine state for the unpooled case (bench_cpu.py's CLEAR row)
        bench.clear()
    clear_pool(bench)
    if args.sta:   # issue goal: >= 5x compiled FlexAttention, 100% of the computed pairs useful
        bench.grid_window(presets.PAPER_SPECS["sta-video"](), "sta-video 8x16x16 tiles 2x4x4 kernel 3x3x3",
                          goal_flex=5.0)
    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    import tvm
    meta["tvm_threads"] = tvm.runtime.num_threads()
    bc.write_table(bench, Path(args.out), meta, title="Grid windows on the CPU: CLEAR pooled keys/values, sliding tiles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
