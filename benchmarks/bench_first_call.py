"""First-call costs on the CPU: TVM compilation per new shape (cold / warm disk cache), block-plan building,
and recompiles under torch.compile(dynamic=True).

    python benchmarks/bench_first_call.py [--out FILE]

- compile: a child process with an empty ``LINCOMP_CACHE_DIR`` calls three kernels once (sliding window
  256 at L=4096, CLEAR r=8 on 128x128 + 64, scalar GLA at L=4096): its first calls parse, compile and link
  each module (cold); a second child with the same folder loads the modules from disk (warm). Then, in
  one process, a new length in the same bucket (L=4000 after 4096): the module is reused (no compile),
  only the plan is built.
- plan: CLEAR r=8 on a 128x128 grid + 64 text tokens (16448 tokens) with the kernel's tuned tiles: plan
  building (``lincomp.ir.blocks.block_plan`` + the int32 arrays the kernel takes, caches cleared each
  time) vs one forward of the kernel at that size (B=1, H=4, D=64; plan cached). Goal: <= 5%.
- recompiles: a small random Llama (2 layers, hidden 256, 4 heads of 64) under
  ``torch.compile(backend="lincomp", dynamic=True, options={"spec": sliding window 128, "target": "tvm"})``
  (Inductor for the rest) called at 16 lengths inside one bucket (L in (256, 512]); counts backend
  backend compilations by the length being called (Dynamo's float-specialising restart of the first
  compilation, caused by Llama's traced ``scaling``, counts at the first length) and checks each output
  against the model whose SDPA is the spec's reference. Goal: zero compilations after the first length.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import lincomp  # noqa: E402
from lincomp import presets  # noqa: E402
from lincomp.spec import AttentionSpec  # noqa: E402
from lincomp.testing import random_inputs  # noqa: E402

B, H, D = 1, 4, 64
SWA = AttentionSpec(window={"kind": "1d", "left": 255, "right": 0}, causal=True)
CLEAR = presets.clear(8, (128, 128), text_tokens=64)
GLA = presets.gla("scalar")
CASES = {"swa256 L=4096": (SWA, 4096), "clear r=8 128x128+64": (CLEAR, CLEAR.expected_length()),
         "gla scalar L=4096": (GLA, 4096)}

CHILD = """
import json, sys, time, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {root!r} + "/benchmarks")
import bench_first_call as b
import lincomp
from lincomp.lower.tvmir import build
out = {{}}
for case, (spec, L) in b.CASES.items():
    x = b.random_inputs(spec, B=b.B, H=b.H, L=L, D=b.D, seed=0)
    before = dict(build.STATS)
    t0 = time.perf_counter()
    with torch.no_grad():
        lincomp.compile(spec, target="tvm")(**x)
    out[case] = {{"s": time.perf_counter() - t0, "compiled": build.STATS["compiled"] - before["compiled"],
                 "loaded": build.STATS["loaded"] - before["loaded"]}}
print(json.dumps(out))
"""


def compile_children() -> dict:
    with tempfile.TemporaryDirectory(prefix="lincomp-first-call-") as cache:
        env = dict(os.environ, LINCOMP_CACHE_DIR=cache)
        res = {}
        for name in ("cold", "warm"):
            out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT))], env=env, capture_output=True,
                                 text=True, timeout=1800)
            if out.returncode:
                raise RuntimeError(out.stderr[-3000:])
            res[name] = json.loads(out.stdout.strip().splitlines()[-1])
            print(name, res[name], flush=True)
    return res


def new_length() -> dict:
    """First call at L=4000 after L=4096 (same bucket): seconds and modules compiled."""
    from lincomp.lower.tvmir import build
    kern = lincomp.compile(SWA, target="tvm")
    with torch.no_grad():
        kern(**random_inputs(SWA, B=B, H=H, L=4096, D=D, seed=0))
        x = random_inputs(SWA, B=B, H=H, L=4000, D=D, seed=0)
        before = dict(build.STATS)
        t0 = time.perf_counter()
        kern(**x)
        first = time.perf_counter() - t0
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            kern(**x)
            times.append(time.perf_counter() - t0)
    return {"first_s": first, "warm_s": statistics.median(times), "compiled": build.STATS["compiled"] - before["compiled"]}


def plan_vs_forward(reps: int = 7) -> dict:
    from lincomp.ir import blocks
    spec, L = CASES["clear r=8 128x128+64"]
    x = random_inputs(spec, B=B, H=H, L=L, D=D, seed=0)
    kern = lincomp.compile(spec, target="tvm")
    with torch.no_grad():
        kern(**x)
        cfg = kern.config["window_fwd"]["params"]
        fwd = []
        for _ in range(reps):
            t0 = time.perf_counter()
            kern(**x)
            fwd.append(time.perf_counter() - t0)
    plan = []
    for _ in range(reps):
        blocks._block_plan.cache_clear()
        kern._plans.clear()
        t0 = time.perf_counter()
        kern._plan(L, cfg)
        plan.append(time.perf_counter() - t0)
    return {"plan_ms": statistics.median(plan) * 1e3, "forward_ms": statistics.median(fwd) * 1e3, "cfg": cfg}


def recompiles(lengths=tuple(range(272, 513, 16))) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lincomp.backends.dynamo import lincomp_backend
    from lincomp.testing import rel_err
    torch._dynamo.reset()
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    spec = presets.sliding_window(128)
    calls = []   # the length being called at each backend compilation

    def counting(gm, example_inputs):
        calls.append(current)
        return lincomp_backend(gm, example_inputs, options={"spec": spec, "target": "tvm"})
    compiled = torch.compile(model, backend=counting, dynamic=True)
    from torch._dynamo.utils import counters
    counters.clear()
    rows, worst = [], 0.0
    with torch.no_grad():
        for current in lengths:
            ids = torch.randint(0, 512, (1, current), generator=torch.Generator().manual_seed(current))
            t0 = time.perf_counter()
            out = compiled(ids).logits
            rows.append((current, time.perf_counter() - t0, len(calls)))
            ref = _reference_logits(model, ids, spec)
            worst = max(worst, rel_err(out, ref))
    frames = dict(counters["frames"])
    return {"lengths": list(lengths), "backend_compiles": len(calls), "frames": frames, "per_length": rows,
            "recompiles": sum(1 for L in calls if L != lengths[0]),
            "worst_rel_err": worst}


def _reference_logits(model, ids, spec):
    """The model with every SDPA replaced by lincomp's reference of ``spec`` (eager)."""
    import torch.nn.functional as F
    sdpa = F.scaled_dot_product_attention

    def ref_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return lincomp.reference(spec, q.double(), k.double(), v.double(), scale=scale).to(q.dtype)
    F.scaled_dot_product_attention = ref_attention
    try:
        return model(ids).logits
    finally:
        F.scaled_dot_product_attention = sdpa


def write_table(res: dict, path: Path, load: tuple) -> None:
    c, nl, p, r = res["compile"], res["new_length"], res["plan"], res["recompiles"]
    pct = p["plan_ms"] / p["forward_ms"] * 100
    later = r["recompiles"]
    lines = ["# First-call costs (CPU, TVM)", "",
             f"- CPU: **{_cpu()}**, torch {torch.__version__}, threads {torch.get_num_threads()}; B={B}, H={H}, D={D}, fp32",
             "- command: `python benchmarks/bench_first_call.py`",
             f"- load average before / after: {load[0]} / {load[1]} (2 cores shared with other jobs)", "",
             "## Compilation per new shape", "",
             "| kernel | cold disk cache: first call s (modules compiled) | warm disk cache: first call s (modules loaded) |",
             "| --- | ---: | ---: |"]
    for case in CASES:
        lines.append(f"| {case} | {c['cold'][case]['s']:.2f} ({c['cold'][case]['compiled']}) | "
                     f"{c['warm'][case]['s']:.2f} ({c['warm'][case]['loaded']}) |")
    lines += ["", f"- new length in the same bucket (swa256, L=4000 after 4096, one process): first call "
                  f"{nl['first_s'] * 1e3:.1f} ms ({nl['compiled']} modules compiled; plan built), later calls "
                  f"{nl['warm_s'] * 1e3:.1f} ms", "",
              "## Block plan vs forward (CLEAR r=8, 128x128 grid + 64 text tokens = 16448 tokens)", "",
              "| plan building ms | one forward ms | plan / forward (goal <= 5%) | tiles |", "| ---: | ---: | ---: | --- |",
              f"| {p['plan_ms']:.2f} | {p['forward_ms']:.2f} | {pct:.1f}% ({'met' if pct <= 5 else 'NOT met'}) | "
              f"{p['cfg']} |", "",
              "## Recompiles: torch.compile(backend=\"lincomp\", dynamic=True), 16 lengths in one bucket", "",
              f"- lengths {r['lengths'][0]}..{r['lengths'][-1]} step 16 (bucket L in (256, 512]); backend "
              f"compilations: {r['backend_compiles']}, all at the first length but {later} (recompiles, goal 0: "
              f"{'met' if later == 0 else 'NOT met'}); Dynamo frames: {r['frames']}",
              f"- worst rel err vs the reference-attention model over the 16 lengths: {r['worst_rel_err']:.1e}",
              "- seconds per call (compiles counted so far): "
              + ", ".join(f"L={L}: {s:.2f}s ({n})" for L, s, n in r["per_length"])]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _cpu() -> str:
    from lincomp.tuning.device import cpu_name
    return cpu_name()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "first_call_cpu.md"))
    ap.add_argument("--only", default="compile,new_length,plan,recompiles")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    res = {}
    only = args.only.split(",")
    for name, fn in (("compile", compile_children), ("new_length", new_length), ("plan", plan_vs_forward),
                     ("recompiles", recompiles)):
        if name in only:
            res[name] = fn()
            print(name, {k: v for k, v in res[name].items() if k != "per_length"}, flush=True)
    if len(res) == 4:
        write_table(res, Path(args.out), (load0, " ".join(f"{x:.2f}" for x in os.getloadavg())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
