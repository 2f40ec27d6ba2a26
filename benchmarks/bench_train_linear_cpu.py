"""CPU training of the linear branch: forward + backward on lincomp's TVM kernels vs its peers, one process.

    python benchmarks/bench_train_linear_cpu.py [--reps 10] [--L 4096] [--out FILE]

GLA (identity features, D^-0.5 output scale), scalar and vector gates, B=1, H=4, D=64, fp32. Per gate,
timed round-robin in one process (``bench_cpu.Bench.interleaved``: each timed call right after an
untimed one of the same implementation; medians):

- ``tvm forward``: the kernel's own inference forward (``torch.no_grad``), the unit of the first goal;
- ``tvm fwd+bwd``: ``kernel(q, k, v, g=g)`` with inputs that require grad, then ``o.backward(do)``
  (the saving forward and the generated backward kernel; gradients of q, k, v, g);
- ``torch.compile(chunked GLA) fwd+bwd``: autograd through bench_cpu's compiled chunked PyTorch GLA
  (chunk 64), the peer a CPU user has (flash-linear-attention has no CPU kernels).

Goals (issue 15): tvm fwd+bwd <= 3.5x tvm forward; >= 3x faster than the compiled peer's fwd+bwd.
Writes benchmarks/results/train_linear_cpu.md with the CPU, load averages and the gradients' agreement.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import ROOT, Bench, cpu_model, gla_chunked_torch  # noqa: E402  (sets OMP_WAIT_POLICY first)

import torch  # noqa: E402

import lincomp  # noqa: E402
from lincomp import presets  # noqa: E402
from lincomp.testing import random_inputs, rel_err  # noqa: E402

B, H, D = 1, 4, 64


def case(bench: Bench, gate: str, L: int) -> list:
    spec = presets.gla(gate)
    x = random_inputs(spec, B=B, H=H, L=L, D=D, seed=3)
    kern = lincomp.compile(spec, target="tvm")
    leaves = {n: t.detach().requires_grad_(True) for n, t in x.items()}
    do = torch.randn(B, H, L, D)
    peer = torch.compile(gla_chunked_torch, dynamic=False)
    scale = D ** -0.5

    def ours_train():
        for t in leaves.values():
            t.grad = None
        kern(**leaves).backward(do)

    def peer_train():
        for t in leaves.values():
            t.grad = None
        peer(leaves["q"], leaves["k"], leaves["v"], leaves["g"], 64, False, scale).backward(do)

    def ours_forward():
        with torch.no_grad():
            kern(**x)

    names = {"tvm forward": ours_forward, "tvm fwd+bwd": ours_train, "torch.compile(chunked GLA) fwd+bwd": peer_train}
    t = bench.interleaved(names, grad=True)
    ours_train()
    mine = {n: v.grad.clone() for n, v in leaves.items()}
    peer_train()
    agree = ", ".join(f"d{n} {rel_err(mine[n], v.grad):.1e}" for n, v in leaves.items())
    cfg = kern.config
    rows = [(f"gla {gate} L={L}", n, ms) for n, ms in t.items()]
    ratio_fwd = t["tvm fwd+bwd"] / t["tvm forward"]
    speedup = t["torch.compile(chunked GLA) fwd+bwd"] / t["tvm fwd+bwd"]
    notes = (f"fwd+bwd / forward = **{ratio_fwd:.2f}x** (goal <= 3.5: {'met' if ratio_fwd <= 3.5 else 'NOT met'}); "
             f"speed-up over the compiled peer = **{speedup:.2f}x** (goal >= 3: {'met' if speedup >= 3 else 'NOT met'}); "
             f"gradients vs the peer's: {agree}; configs: linear_fwd {cfg['linear_fwd']['params']}, "
             f"linear_bwd {cfg['linear_bwd']['params']}")
    print(f"  {gate}: " + ", ".join(f"{n} {ms:.1f} ms" for _, n, ms in rows) + f"\n    {notes}", flush=True)
    return rows + [(f"gla {gate} L={L}", "summary", notes)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_linear_cpu.md"))
    args = ap.parse_args(argv)
    from lincomp.lower.tvmir.build import usable_cores
    torch.set_num_threads(usable_cores())
    torch.manual_seed(0)
    bench = Bench(args.reps, quick=False)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"CPU {cpu_model()}; load {load_before}")
    rows = case(bench, "scalar", args.L) + case(bench, "vector", args.L)
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    from lincomp.lower.tvmir.build import host_cpu
    lines = ["# CPU training of the linear branch: lincomp TVM forward + backward vs peers", "",
             f"- CPU: **{cpu_model()}** (LLVM mcpu `{host_cpu()}`), torch {torch.__version__}, "
             f"threads {torch.get_num_threads()}, "
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
             f"- load average before / after: {load_before} / {load_after} (the machine is shared)",
             f"- B={B}, H={H}, D={D}, fp32, GLA (identity features); medians of {args.reps} rounds, implementations "
             "interleaved in each round, each timed call right after an untimed one of the same implementation",
             f"- command: `python benchmarks/bench_train_linear_cpu.py --reps {args.reps} --L {args.L}`", "",
             "| case | implementation | median ms |", "| --- | --- | ---: |"]
    lines += [f"| {c} | {n} | {ms:.2f} |" for c, n, ms in rows if n != "summary"]
    lines += [""] + [f"- {c}: {ms}" for c, n, ms in rows if n == "summary"]
    ms = {(c, n): v for c, n, v in rows if n != "summary"}
    speedups = [ms[c, "torch.compile(chunked GLA) fwd+bwd"] / ms[c, "tvm fwd+bwd"] for c, n in ms if n == "tvm fwd+bwd"]
    lo, hi = min(speedups), max(speedups)
    against_goal = ("not the 3x the issue asks for" if hi < 3 else "meeting the 3x the issue asks for" if lo >= 3
                    else "the 3x the issue asks for in only some cases")
    lines += ["", "Reading: the backward kernel does about twice the forward's FLOPs (dphi(q), dphi(k), dv and the "
              "state gradient per chunk, against the forward's output and state), so its own floor is ~3x the "
              "forward for fwd+bwd; the rest is the saving forward's extra writes (the state entering every chunk) "
              "and the host's elementwise work (d num / d den, feature-map vjp). The compiled peer runs its chunk "
              "products on MKL matmuls; in this run its fwd+bwd takes "
              f"{lo:.2f}-{hi:.2f}x the generated code's time (the speed-up), {against_goal}."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
