"""lincomp's TVM kernels next to torch ops in a default Python process (no environment variables set).

    python benchmarks/bench_default_process.py [--reps 15] [--out FILE]

A model runs torch ops (layer norm, linear layers, a matmul) and attention kernels by turns. This bench
does the same: every timed kernel call (ours and the compiled peers) comes right after the torch ops of
a model-like block (LayerNorm -> qkv Linear -> [timed attention] -> out Linear -> MLP, d_model = H*D) on
its own inputs, in this process, which sets no environment variable. Three settings, one process each,
each reporting medians:

- ``default``:  this process, torch ops interleaved, the package as shipped (TVM's parallel loops on
                torch's OpenMP threads, :mod:`lincomp.lower.tvmir.threads`); also the compiled peers.
- ``isolated``: a child process started with ``OMP_WAIT_POLICY=PASSIVE LINCOMP_TVM_POOL=tvm`` timing
                each kernel alone, back to back (how ``bench_cpu.py`` used to measure them).
- ``before``:   a child with only ``LINCOMP_TVM_POOL=tvm``, torch ops interleaved: a default process
                before the fix (two thread pools).

Cases (B=1, H=4, D=64, fp32): causal sliding window 256 at L=4096 and CLEAR r=8 (64x64 + 64) vs compiled
FlexAttention, scalar / vector GLA at L=4096 vs the compiled chunked torch GLA (peers of ``bench_cpu.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_cpu as bc  # noqa: E402  (peers; sets no environment variable)
import torch  # noqa: E402

import lincomp  # noqa: E402
from lincomp import presets  # noqa: E402
from lincomp.ir import lower  # noqa: E402
from lincomp.spec import AttentionSpec  # noqa: E402
from lincomp.testing import random_inputs  # noqa: E402

B, H, D, L = 1, 4, 64, 4096
GOALS = {"swa256 L=4096": 2.0, "clear r=8 64x64+64": 7.0, "gla scalar L=4096": 3.0, "gla vector L=4096": 3.0}


class Block(torch.nn.Module):
    """The torch ops of a transformer block around its attention (d_model = H*D): [L, H*D] -> [L, H*D]."""

    def __init__(self, n: int, width: int = H * D):
        super().__init__()
        self.x = torch.randn(n, width)
        self.ln1, self.ln2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv, self.out = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.up, self.down = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)

    def before(self):
        return self.qkv(self.ln1(self.x))

    def after(self, qkv):
        h = self.x + self.out(qkv[:, : self.x.shape[1]])
        return h + self.down(torch.nn.functional.gelu(self.up(self.ln2(h))))


def cases(with_peers: bool) -> dict:
    """{case: {impl: fn()}}; the peers are compiled here (outside any timing)."""
    out = {}
    swa = AttentionSpec(window={"kind": "1d", "left": 255, "right": 0}, causal=True)
    clear = presets.clear(8, (64, 64), text_tokens=64)
    for case, spec, seed in (("swa256 L=4096", swa, 1), ("clear r=8 64x64+64", clear, 2)):
        n = spec.expected_length() if spec.expected_length() else L
        x = random_inputs(spec, B=B, H=H, L=n, D=D, seed=seed)
        kern = lincomp.compile(spec, target="tvm")
        fns = {"lincomp tvm": lambda kern=kern, x=x: kern(**x)}
        if with_peers:
            flex, _ = bc.flex_peer(lower(spec).mask_mod(), n)
            fns["torch.compile(flex_attention)"] = lambda flex=flex, x=x: flex(x["q"], x["k"], x["v"])
        out[case] = fns
    for gate in ("scalar", "vector"):
        spec = presets.gla(gate)
        x = random_inputs(spec, B=B, H=H, L=L, D=D, seed=3)
        kern = lincomp.compile(spec, target="tvm")
        fns = {"lincomp tvm": lambda kern=kern, x=x: kern(**x)}
        if with_peers:
            peer = torch.compile(bc.gla_chunked_torch, dynamic=False)
            fns["torch.compile(chunked GLA, C=64)"] = (
                lambda peer=peer, x=x: peer(x["q"], x["k"], x["v"], x["g"], 64, False, D ** -0.5))
        out[f"gla {gate} L={L}"] = fns
    return out


def measure(mode: str, reps: int) -> dict:
    """{case: {impl: median ms}} plus {"torch block": median ms} in this process."""
    torch.manual_seed(0)
    interleave = mode != "isolated"
    all_fns = cases(with_peers=mode == "default")
    blocks = {}
    times = {case: {impl: [] for impl in fns} for case, fns in all_fns.items()}
    block_ms = []
    with torch.no_grad():
        for case, fns in all_fns.items():   # warm-up (first calls build / load the kernels)
            for fn in fns.values():
                fn()
        for r in range(reps):
            for case, fns in all_fns.items():
                n = 4160 if case.startswith("clear") else L
                block = blocks.setdefault(n, Block(n))
                for impl, fn in fns.items():
                    if interleave:
                        t0 = time.perf_counter()
                        qkv = block.before()
                        t1 = time.perf_counter()
                        fn()
                        t2 = time.perf_counter()
                        block.after(qkv)
                        block_ms.append((t1 - t0 + time.perf_counter() - t2) * 1e3)
                    else:
                        fn()                     # warm, as bench_cpu.py: each timed call after its own
                        t1 = time.perf_counter()
                        fn()
                        t2 = time.perf_counter()
                    times[case][impl].append((t2 - t1) * 1e3)
    res = {case: {impl: statistics.median(t) for impl, t in d.items()} for case, d in times.items()}
    if block_ms:
        res["torch block"] = statistics.median(block_ms)
    from lincomp.lower.tvmir import threads
    res["pool"] = threads.status()
    res["torch threads"] = torch.get_num_threads()
    return res


def child(mode: str, reps: int) -> dict:
    env = dict(os.environ, LINCOMP_TVM_POOL="tvm")
    if mode == "isolated":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--reps", str(reps)], env=env,
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_table(runs: dict, path: Path, meta: dict) -> None:
    d, iso, bef = runs["default"], runs["isolated"], runs.get("before")
    lines = ["# TVM kernels in a default process (torch ops interleaved) vs isolated", "",
             f"- CPU: **{bc.cpu_model()}**, torch {torch.__version__}, torch threads {d['torch threads']}; "
             f"B={B}, H={H}, D={D}, fp32; medians of {meta['reps']} rounds (x{meta['repeat']} runs: the median "
             "of the runs' medians)",
             f"- command: `{meta['command']}`",
             f"- load average before / after: {meta['load_before']} / {meta['load_after']} (2 cores shared "
             "with other jobs: timings are noisy)",
             f"- default: this process, no environment variable set, each timed call right after the torch "
             f"ops of a model-like block (LayerNorm, Linear qkv, out Linear, MLP: {d.get('torch block', 0):.1f} "
             f"ms); kernels' parallel loops on: {d['pool']}",
             "- isolated: child process with `OMP_WAIT_POLICY=PASSIVE LINCOMP_TVM_POOL=tvm`, each kernel timed "
             "alone right after an untimed call of itself (TVM's pool, torch's workers asleep)",
             ("- before: child process with `LINCOMP_TVM_POOL=tvm` only (the package before this change), "
              f"torch ops interleaved as in default (torch block {bef.get('torch block', 0):.1f} ms)"
              if bef else "- before: not run"), "",
             "| case | lincomp default ms | isolated ms | default / isolated (goal <= 1.10) | before ms "
             "| peer | peer ms (default) | speed-up vs peer (goal) |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
    for case, goal in GOALS.items():
        ours, alone = d[case]["lincomp tvm"], iso[case]["lincomp tvm"]
        (peer, t_peer), = [(k, v) for k, v in d[case].items() if k != "lincomp tvm"]
        ratio, speed = ours / alone, t_peer / ours
        b = f"{bef[case]['lincomp tvm']:.2f}" if bef else ""
        lines.append(f"| {case} | {ours:.2f} | {alone:.2f} | {ratio:.2f} ({'met' if ratio <= 1.10 else 'NOT met'}) "
                     f"| {b} | {peer} | {t_peer:.2f} | {speed:.2f}x (>= {goal:g}x: "
                     f"{'met' if speed >= goal else 'NOT met'}) |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")


def _median_runs(runs: list) -> dict:
    """Per case and impl, the median over repeated runs' medians; other keys from the first run."""
    out = dict(runs[0])
    for case in GOALS:
        out[case] = {impl: statistics.median(r[case][impl] for r in runs) for impl in runs[0][case]}
    if "torch block" in runs[0]:
        out["torch block"] = statistics.median(r["torch block"] for r in runs)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each setting, alternated (noise)")
    ap.add_argument("--no-before", action="store_true", help="skip the two-pool 'before' child")
    ap.add_argument("--child", choices=("isolated", "before"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "default_process_cpu.md"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.child:
        print(json.dumps(measure(args.child, args.reps)))
        return 0
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "LINCOMP_TVM_POOL", "TVM_NUM_THREADS"):
        if var in os.environ:
            raise SystemExit(f"{var} is set: this bench measures a default process; unset it")
    meta = {"reps": args.reps, "repeat": args.repeat, "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "command": "python benchmarks/bench_default_process.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    runs = {"default": [], "isolated": [], "before": []}
    for i in range(args.repeat):
        runs["default"].append(measure("default", args.reps))
        print("default", runs["default"][-1], flush=True)
        for mode in ("isolated",) + (() if args.no_before else ("before",)):
            runs[mode].append(child(mode, args.reps))
            print(mode, runs[mode][-1], flush=True)
    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    write_table({k: _median_runs(v) for k, v in runs.items() if v}, Path(args.out), meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
