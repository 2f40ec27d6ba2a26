"""Why lincomp's CPU kernels use a small hand-written schedule space instead of MetaSchedule.

    python benchmarks/metaschedule_vs_handwritten.py [--trials 16]

The same computation -- the score tile of the window kernel, ``S[n] = K[n] @ Q[n]^T`` for n tiles of
64 x 64 x 64 -- scheduled two ways, timed side by side in one process:

1. MetaSchedule (``tune_tir``, evolutionary search, ``--trials`` measured candidates) on a plain
   sblock PrimFunc; reports the tuning wall time and the best schedule's speed.
2. lincomp's micro-kernel (``codegen.emit_gemm_tile``: MR rows x a vectorised width, accumulators in
   registers), the schedule every template uses, with no search.

The window kernel itself cannot go through MetaSchedule: its key-tile loop runs over CSR plan
arrays (data-dependent bounds), which sblock scheduling does not express. Results go to
benchmarks/results/metaschedule.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import tvm  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from lincomp.lower.tvmir import build  # noqa: E402
from lincomp.lower.tvmir.codegen import Script, emit_gemm_tile  # noqa: E402

N, M, K = 512, 64, 64     # tiles, tile size, head dim


def plain_func():
    @T.prim_func(s_tir=True)
    def scores(a: T.Buffer((N, M, K), "float32"), b: T.Buffer((N, M, K), "float32"),
               c: T.Buffer((N, M, M), "float32")):
        T.func_attr({"global_symbol": "scores", "tir.noalias": True})
        for n, i, j, d in T.grid(N, M, M, K):
            with T.sblock("s"):
                vn, vi, vj, vd = T.axis.remap("SSSR", [n, i, j, d])
                with T.init():
                    c[vn, vi, vj] = T.float32(0)
                c[vn, vi, vj] = c[vn, vi, vj] + a[vn, vi, vd] * b[vn, vj, vd]
    return scores


def handwritten_source() -> str:
    s = Script()
    s("@T.prim_func")
    with s.block("def scores(a_h: T.handle, bT_h: T.handle, c_h: T.handle):"):
        s('T.func_attr({"global_symbol": "scores", "tir.noalias": True})')
        s(f'a = T.match_buffer(a_h, ({N}, {M}, {K}), "float32")',
          f'bT = T.match_buffer(bT_h, ({N}, {K}, {M}), "float32")',
          f'c = T.match_buffer(c_h, ({N}, {M}, {M}), "float32")')
        with s.block(f"for n in T.parallel({N}):"):
            emit_gemm_tile(s, rows=M, mr=6 if M % 6 == 0 else 4, width=M, red=str(K),
                           a=lambda r, x: f"a[n, {r}, {x}]", b=lambda x, w: f"bT[n, {x}, {w}]",
                           store=lambda r, w, val: f"c[n, {r}, {w}] = {val}")
    return s.text()


def median_ms(fn, reps=20):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "metaschedule.md"))
    args = ap.parse_args(argv)
    from tvm.s_tir import meta_schedule as ms

    flops = 2 * N * M * M * K
    a, b = torch.randn(N, M, K), torch.randn(N, M, K)
    ref = torch.bmm(a, b.transpose(1, 2))
    rows = []
    tgt = build.target()

    mod = plain_func()   # tune_tir / compile_tir key the workload as "main"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lincomp-ms-") as work:
        # generous timeouts: on a shared 2-core machine a candidate build can take longer than the 30 s default
        db = ms.tune_tir(mod, tgt, work, max_trials_global=args.trials, num_trials_per_iter=min(16, args.trials),
                         builder=ms.builder.LocalBuilder(timeout_sec=300),
                         runner=ms.runner.LocalRunner(timeout_sec=300), cost_model="random")
        sch = ms.tir_integration.compile_tir(db, mod, tgt)
    tune_s = time.perf_counter() - t0
    if sch is None:
        raise SystemExit(f"MetaSchedule found no valid schedule in {args.trials} trials ({tune_s:.0f} s)")
    ex = tvm.compile(sch.mod, target=tgt)
    c = torch.empty(N, M, M)
    ex["scores"](a, b, c)
    assert torch.allclose(c, ref, atol=1e-3)
    t = median_ms(lambda: ex["scores"](a, b, c))
    rows.append(("MetaSchedule", f"{args.trials} trials, {tune_s:.0f} s of tuning", t))

    t0 = time.perf_counter()
    built = build.build([handwritten_source()], "bench-scores")
    compile_s = time.perf_counter() - t0
    bT = b.transpose(1, 2).contiguous()
    built.fn("scores")(a, bT, c)
    assert torch.allclose(c, ref, atol=1e-3)
    t = median_ms(lambda: built.fn("scores")(a, bT, c))
    rows.append(("lincomp micro-kernel", f"no search, {compile_s:.1f} s to compile", t))
    t = median_ms(lambda: torch.bmm(a, b.transpose(1, 2), out=c))
    rows.append(("torch.bmm (oneDNN/MKL)", "reference point", t))

    lines = ["# MetaSchedule vs the hand-written micro-kernel (score tiles, fp32)", "",
             f"- {N} tiles of {M}x{M}x{K} ({flops / 1e9:.2f} GFLOP), LLVM mcpu `{build.host_cpu()}`, "
             f"{build.usable_cores()} cores, load average {os.getloadavg()[0]:.2f} (shared machine)", "",
             "| schedule | cost | median ms | GFLOP/s |", "| --- | --- | ---: | ---: |"]
    for name, cost, ms_ in rows:
        lines.append(f"| {name} | {cost} | {ms_:.2f} | {flops / ms_ / 1e6:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
