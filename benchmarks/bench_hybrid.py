"""Hybrid kernels' FLOP rate next to dense SDPA's, fp32, B=1, on this CPU, in one process.

    python benchmarks/bench_hybrid.py [--reps 7] [--only minilm,lizard] [--out FILE]
    python benchmarks/bench_hybrid.py --phases [--package OTHER_CHECKOUT] --out FILE   # where the time goes

Cases (each row: median wall time over ``--reps`` rounds; every implementation of a case is timed
interleaved with the others, one timed call each per round, so a load spike hits them alike):

- ``minilm``: the MiniLM demo's spec (``lincomp.models.distill_cli.minilm_spec``: non-causal window +-96,
              the [CLS] prefix token, Hedgehog 64 features, combine="shared"), H=12, D=32, at L = 1024 and
              4096, vs dense SDPA (non-causal).
- ``lizard``: the Lizard spec (causal window 128 + 4 sinks + scalar-gated hedgehog_exp 64, combine="sum"),
              H=4, D = 64 and 128, L = 4096, vs dense SDPA (non-causal) and its peer parts of bench_cpu.py:
              compiled FlexAttention (window + sinks) + the compiled chunked GLA (hedgehog features).

The FLOP rate of lincomp is its useful FLOPs as ``lincomp explain`` counts them (``lincomp.ir.cost``: window
pairs, the linear scan, the feature projections) over its time; dense SDPA's is 4 L^2 D H over its time. The
goals (issue #16): lincomp's rate >= 0.7x SDPA's at L=4096; MiniLM at L=1024 at least SDPA's wall time.
Writes a markdown table (default benchmarks/results/hybrid_cpu.md) with the CPU, load average and command.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# --package DIR: time another checkout's lincomp (e.g. the previous commit's, for a before / after of --phases)
PACKAGE = sys.argv[sys.argv.index("--package") + 1] if "--package" in sys.argv else str(ROOT)
sys.path.insert(0, PACKAGE)
import lincomp  # noqa: E402  (first: bench_cpu puts this checkout on the path)

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_cpu as bc  # noqa: E402  (peers and the interleaved timer)
import torch  # noqa: E402
import torch.nn.functional as Fn  # noqa: E402

from lincomp import presets  # noqa: E402
from lincomp.ir.cost import attention_flops  # noqa: E402
from lincomp.models.distill_cli import minilm_spec  # noqa: E402
from lincomp.reference import reference  # noqa: E402
from lincomp.testing import random_inputs, rel_err  # noqa: E402

GOAL_RATE = 0.7   # lincomp's FLOP rate / dense SDPA's, at L = 4096


class HybridBench(bc.Bench):
    def case(self, case: str, spec, H: int, D: int, L: int, peers=None, check_ref: bool = False,
             time_goal: bool = False):
        """One case: lincomp (TVM), dense SDPA and ``peers(x) -> ({name: fn}, notes)``, interleaved."""
        x = random_inputs(spec, B=1, H=H, L=L, D=D, seed=5)
        kern, out, first = self.ours(spec, x)
        q, k, v = x["q"], x["k"], x["v"]
        fns = {"lincomp tvm": lambda: kern(**x), "SDPA dense": lambda: Fn.scaled_dot_product_attention(q, k, v)}
        extra, notes = peers(x, out) if peers else ({}, {})
        t = self.interleaved({**fns, **extra})
        flops = attention_flops(spec, L, B=1, H=H, D=D)
        sdpa_flops = 4 * L * L * D * H
        rate, sdpa_rate = flops / t["lincomp tvm"], sdpa_flops / t["SDPA dense"]
        err = ""
        if check_ref:
            with torch.no_grad():
                ref = reference(spec, **{n: (t_.double() if isinstance(t_, torch.Tensor) and t_.is_floating_point() else t_) for n, t_ in x.items()})
            err = f"; rel err vs fp64 reference {rel_err(out, ref):.1e}"
        cfg = {n: c["params"] for n, c in kern.config.items()}
        self.add(case, "lincomp tvm", t["lincomp tvm"], note=f"{flops / 1e6:.0f} MFLOP useful, "
                 f"{rate / 1e6:.1f} GFLOP/s; config {cfg}; first call {first:.1f}s{err}")
        self.add(case, "SDPA dense", t["SDPA dense"],
                 note=f"{sdpa_flops / 1e6:.0f} MFLOP, {sdpa_rate / 1e6:.1f} GFLOP/s")
        for name in extra:
            self.add(case, name, t[name], note=notes.get(name, ""))
        goal = [f"FLOP rate {rate / sdpa_rate:.2f}x SDPA's (goal >= {GOAL_RATE:g}x at L=4096"
                + (f": {'met' if rate / sdpa_rate >= GOAL_RATE else 'NOT met'})" if L == 4096 else ")")]
        speed = t["SDPA dense"] / t["lincomp tvm"]
        goal.append(f"wall time {speed:.2f}x SDPA's" + (f" (goal >= 1x: {'met' if speed >= 1 else 'NOT met'})"
                                                          if time_goal else ""))
        if "peers summed" in extra:
            goal.append(f"{t['peers summed'] / t['lincomp tvm']:.2f}x the flex + chunked GLA peers")
        self.rows.append({"case": case, "impl": "**goal**", "ms": None, "note": "; ".join(goal)})
        print(f"  {case:28s} goal: {'; '.join(goal)}", flush=True)

    def minilm(self, L: int):
        self.case(f"minilm H=12 D=32 L={L}", minilm_spec(), 12, 32, L, check_ref=L <= 1024, time_goal=L == 1024)

    def lizard(self, D: int, L: int = 4096, window: int = 128, sinks: int = 4, E: int = 64):
        spec = presets.lizard(window=window, sinks=sinks, feature_dim=E)

        def peers(x, out):
            q, k, v, g = x["q"], x["k"], x["v"], x["g"]
            flex, built = bc.flex_sinks_peer(window, L, x["sink_logits"])
            gla = torch.compile(bc.gla_chunked_torch, dynamic=False)
            feats = torch.compile(bc.hedgehog_exp, dynamic=False)
            alpha = x["alpha"][None, :, None, None]

            def summed():
                return gla(feats(q, x["feature_weight_q"]), feats(k, x["feature_weight_k"]), v, g, 64, True, 1.0) \
                    + alpha * flex(q, k, v)
            with torch.no_grad():
                diff = rel_err(out, summed())
            return ({"peers summed": summed},
                    {"peers summed": f"compiled flex (window + {sinks} sinks as zero-value keys) + compiled chunked "
                                     f"GLA (C=64) on compiled hedgehog_exp features; block mask {built:.1f}s; "
                                     f"rel diff vs ours {diff:.1e}"})
        self.case(f"lizard H=4 D={D} L={L}", spec, 4, D, L, peers=peers)


def phases(spec, H: int, D: int, L: int, reps: int = 5) -> dict:
    """CPU milliseconds of one call on one thread (``time.thread_time``: what the call itself computes, little
    moved by other processes on a shared machine), per compiled kernel and the rest ("other": torch-side work,
    allocations, page faults), and dense SDPA's; minimum over ``reps`` calls."""
    from lincomp.lower.tvmir import build
    x = random_inputs(spec, B=1, H=H, L=L, D=D, seed=5)
    kern = lincomp.compile(spec, target="tvm")
    times: dict = {}
    fn = build.Built.fn

    def timed(self, name):
        f = fn(self, name)

        def run(*args):
            t0 = time.thread_time()
            f(*args)
            times.setdefault(name, []).append((time.thread_time() - t0) * 1e3)
        return run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    calls, sdpa = [], []
    try:
        with torch.no_grad():
            kern(**x)
            times.clear()
            build.Built.fn = timed
            for _ in range(reps):
                t0 = time.thread_time()
                kern(**x)
                calls.append((time.thread_time() - t0) * 1e3)
                t0 = time.thread_time()
                Fn.scaled_dot_product_attention(x["q"], x["k"], x["v"])
                sdpa.append((time.thread_time() - t0) * 1e3)
    finally:
        build.Built.fn = fn
        torch.set_num_threads(threads)
    out = {name: min(t) for name, t in times.items()}
    out["other"] = min(calls) - sum(out.values())
    return {"call": min(calls), "sdpa": min(sdpa), "kernels": out, "flops": attention_flops(spec, L, B=1, H=H, D=D),
            "sdpa_flops": 4 * L * L * D * H}


def phases_table(cases, reps: int) -> list:
    lines = [f"## Where the time goes (`--phases`: one thread, CPU ms of one call, min of {reps}; lincomp from "
             f"`{Path(lincomp.__file__).parent.parent}`)", "",
             "| case | lincomp ms | SDPA ms | FLOP rate / SDPA's | kernels (ms) |", "| --- | ---: | ---: | ---: | --- |"]
    for case, spec, H, D, L in cases:
        p = phases(spec, H, D, L, reps)
        ratio = (p["flops"] / p["call"]) / (p["sdpa_flops"] / p["sdpa"])
        kernels = ", ".join(f"{n} {ms:.1f}" for n, ms in p["kernels"].items())
        lines.append(f"| {case} | {p['call']:.1f} | {p['sdpa']:.1f} | {ratio:.2f} | {kernels} |")
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--only", default="minilm,lizard")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hybrid_cpu.md"))
    ap.add_argument("--phases", action="store_true", help="only the per-kernel CPU times on one thread (a table)")
    ap.add_argument("--package", default=str(ROOT), help="the checkout whose lincomp to time (default: this one)")
    args = ap.parse_args(argv)
    if args.phases:
        lizard = presets.lizard(window=128, sinks=4, feature_dim=64)
        cases = [(f"minilm H=12 D=32 L={L}", minilm_spec(), 12, 32, L) for L in (1024, 4096)]
        cases += [(f"lizard H=4 D={D} L=4096", lizard, 4, D, 4096) for D in (64, 128)]
        lines = phases_table(cases, args.reps)
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")
        return 0
    from lincomp.lower.tvmir.build import host_cpu, usable_cores
    meta = {"cpu": bc.cpu_model(), "mcpu": host_cpu(), "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    torch.set_num_threads(usable_cores())   # as bench_cpu.py: every core this process may use
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    torch.manual_seed(0)
    bench = HybridBench(args.reps, False)
    print(f"CPU {meta['cpu']}; load {meta['load_before']}")
    only = set(args.only.split(","))
    if "minilm" in only:
        for L in (1024, 4096):
            bench.minilm(L)
    if "lizard" in only:
        for D in (64, 128):
            bench.lizard(D)
    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    from lincomp.lower.tvmir import threads
    lines = ["# Hybrid kernels vs dense SDPA: FLOP rates on the CPU", "",
             f"- command: `python {' '.join(['benchmarks/bench_hybrid.py'] + (argv if argv is not None else sys.argv[1:]))}`",
             f"- CPU: **{meta['cpu']}** (LLVM mcpu `{meta['mcpu']}`), torch {torch.__version__}, "
             f"threads {torch.get_num_threads()}; kernels' parallel loops on {threads.status()}",
             f"- load average before / after: {meta['load_before']} / {meta['load_after']} (a shared machine: "
             "compare the ratios, measured interleaved in one run, not the absolute times)",
             f"- B=1, fp32; medians of {args.reps} rounds after warm-up, implementations interleaved within each "
             "round, each timed call right after an untimed one of the same implementation; the process sets no "
             "environment variable (bench_cpu.py's malloc policy keeps freed memory for the peers' temporaries; "
             "lincomp's intermediates are reused between calls in any process)",
             "- useful FLOPs: lincomp's as `lincomp explain` counts them (window pairs, linear scan, feature "
             "projections); SDPA's 4 L^2 D per head", "",
             "| case | implementation | median ms | notes |", "| --- | --- | ---: | --- |"]
    for r in bench.rows:
        ms = "" if r["ms"] is None else f"{r['ms']:.2f}"
        lines.append(f"| {r['case']} | {r['impl']} | {ms} | {r['note']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
