"""CPU training step of the softmax windows: TVM forward+backward vs its own forward and vs dense SDPA autograd.

    python benchmarks/bench_train_cpu.py [--reps 7] [--only swa,clear,clear-pool] [--out FILE]

fp32, B=1, H=4, D=64. Cases:

- ``swa``:   causal sliding window of 256 keys, L = 4096;
- ``clear``: CLEAR circle r=8 on a 64x64 grid + 64 prefix tokens (L = 4160);
- ``clear-pool``: the same with CLEAR's pooled keys/values, factor 4 (df=4: P = 256 pooled keys after the
  L tokens, a learned ``pool_weight [4, 4]`` trained too); its SDPA peer pools k, v in torch inside the
  step and attends to the L + P keys under the [L, L + P] mask. No FlexAttention column: torch's CPU
  FlexAttention has no backward ("FlexAttention does not support backward on CPU", torch 2.13);
- ``lizard``: the Lizard hybrid (``presets.lizard()``: sliding window 128 + 4 sinks, summed with scalar-gated
  hedgehog_exp linear attention of feature dim 64), L = 4096; trained by the window and linear backward
  kernels composed (no dense SDPA peer: SDPA has no linear branch, so that column stays empty);
- ``minilm256`` / ``minilm1024``: ``make demo``'s MiniLM spec (``distill_cli.minilm_spec()``: non-causal window
  +-96 + [CLS] prefix, Hedgehog E = 64, combine="shared") at H=12, D=32, L = 256 / 1024, trained by the shared
  backward (shared_train.py); its SDPA peer is dense unmasked attention (what the teacher runs; gradients differ
  by design, so none are compared). ``--out benchmarks/results/train_minilm_cpu.md`` keeps its own table.

Implementations, timed round-robin in one process (one untimed call right before each timed one, so
each runs with warm caches; medians over ``--reps`` rounds):

- ``tvm fwd``: the TVM kernel's forward under ``torch.no_grad()`` (inference);
- ``tvm fwd+bwd``: ``torch.ops.lincomp.attention(..., target="tvm")`` on leaves that require grad, then
  ``o.backward(g)``: the forward that saves lse and the generated backward kernels (the bench fails if
  any call falls back to the reference);
- ``sdpa fwd+bwd``: autograd through ``scaled_dot_product_attention`` with the dense boolean mask of the
  window (what a CPU user has without lincomp; the mask is built outside the timing).

Goals (issue 15): fwd+bwd <= 3.5x the kernel's own forward, and >= 3x faster than the dense SDPA step.
Writes a markdown table (default benchmarks/results/train_cpu.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # see bench_cpu.py: idle torch workers must not spin

import torch  # noqa: E402
import torch.nn.functional as Fn  # noqa: E402

import lincomp  # noqa: E402
from bench_cpu import cpu_model  # noqa: E402
from bench_varlen import round_times  # noqa: E402
from lincomp import presets  # noqa: E402
from lincomp.backends import ops  # noqa: E402,F401  (registers torch.ops.lincomp.*)
from lincomp.reference import window_mask  # noqa: E402
from lincomp.runtime.kernel import LincompFallbackWarning  # noqa: E402
from lincomp.runtime.pool import pooled_kv  # noqa: E402
from lincomp.testing import random_inputs, rel_err  # noqa: E402

def _minilm():
    from lincomp.models.distill_cli import minilm_spec
    return minilm_spec()


MINILM_TITLE = "MiniLM demo spec (shared: window +-96 + [CLS] + Hedgehog 64), H=12, D=32, L={}"
DENSE_PEER = {"H": 12, "D": 32, "sdpa": "dense"}   # the teacher's dense attention as the SDPA peer
CASES = {
    "swa": ("causal sliding window 256, L=4096", lambda: presets.sliding_window(256), 4096),
    "clear": ("CLEAR r=8, 64x64 + 64 prefix", lambda: presets.clear(8, (64, 64), text_tokens=64), None),
    "clear-pool": ("CLEAR r=8 pooled df=4, 64x64 + 64 prefix",
                   lambda: presets.clear_pool(8, 4, (64, 64), text_tokens=64), None),
    "lizard": ("Lizard hybrid (window 128 + 4 sinks + gated hedgehog_exp), L=4096", presets.lizard, 4096),
    "minilm256": (MINILM_TITLE.format(256), _minilm, 256, DENSE_PEER),
    "minilm1024": (MINILM_TITLE.format(1024), _minilm, 1024, DENSE_PEER),
}


def interleaved(fns: dict, reps: int) -> dict:
    """{name: median ms} of bench_varlen's round-robin rounds (which run under no_grad: the training step
    turns grad mode back on itself)."""
    return {name: statistics.median(t) for name, t in round_times(fns, reps).items()}


def run_case(name: str, reps: int, B=1, H=4, D=64) -> dict:
    title, make, L, *opt = CASES[name]
    opt = opt[0] if opt else {}
    H, D = opt.get("H", H), opt.get("D", D)
    spec = make()
    L = spec.expected_length() or L
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(B, H, L, D, generator=gen) for _ in range(4))
    # the learned tensors of the spec (sinks, alpha, gate, feature weights), as a model holds them
    extra = {n: t for n, t in random_inputs(spec, B=B, H=H, L=L, D=D, seed=1).items() if n not in ("q", "k", "v")}
    kern = lincomp.compile(spec, target="tvm")
    spec_json = spec.canonical_json()
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    weights = {n: t.clone().requires_grad_(t.is_floating_point()) for n, t in extra.items()}
    mask = None if opt.get("sdpa") == "dense" else window_mask(spec, L)   # [L, L] bool, built outside the timing
    if spec.pool is not None:                   # grid queries see every pooled key, prefix queries none
        grid_rows = (torch.arange(L) >= spec.prefix)[:, None]
        mask = torch.cat([mask, grid_rows.expand(L, spec.window.pooled_tokens)], 1)
    dense = [t.clone().requires_grad_(True) for t in (q, k, v)]
    dense_w = {n: t.clone().requires_grad_(True) for n, t in extra.items() if n == "pool_weight"}

    def fwd():
        with torch.no_grad():
            return kern(q, k, v, **extra)

    def train():
        for t in (*leaves, *weights.values()):
            t.grad = None
        with torch.enable_grad():
            o = torch.ops.lincomp.attention(*leaves, spec_json, target="tvm", fallback="error", **weights)
            o.backward(g)
        return o

    def sdpa():
        for t in (*dense, *dense_w.values()):
            t.grad = None
        with torch.enable_grad():
            dq, dk, dv = dense
            if spec.pool is not None:   # the pooled keys / values after the L tokens, pooled by torch autograd
                kp, vp = pooled_kv(spec, dk, dv, dense_w["pool_weight"])
                dk, dv = torch.cat([dk, kp], 2), torch.cat([dv, vp], 2)
            o = Fn.scaled_dot_product_attention(dq, dk, dv, attn_mask=mask)
            o.backward(g)
        return o

    with warnings.catch_warnings():
        warnings.simplefilter("error", LincompFallbackWarning)
        if spec.linear is not None:   # no SDPA peer; gradients are checked against the reference by the tests
            train()
            errs = {}
            fns = {"tvm fwd": fwd, "tvm fwd+bwd": train}
            if mask is None:   # the dense teacher attention as the peer
                fns["sdpa fwd+bwd (dense mask)"] = sdpa
            ms = interleaved(fns, reps)
            ms.setdefault("sdpa fwd+bwd (dense mask)", float("nan"))
        else:
            o_ours, o_dense = train(), sdpa()
            errs = {n: rel_err(a.grad, b.grad) for n, a, b in zip("qkv", leaves, dense)}
            errs.update({n: rel_err(weights[n].grad, t.grad) for n, t in dense_w.items()})
            errs["o"] = rel_err(o_ours, o_dense)
            ms = interleaved({"tvm fwd": fwd, "tvm fwd+bwd": train, "sdpa fwd+bwd (dense mask)": sdpa}, reps)
    return {"case": name, "title": title, "L": L, "ms": ms, "errs": errs,
            "config": {kk: vv["params"] for kk, vv in kern.config.items()},
            "train_config": ops.get_kernel(spec_json, "tvm", "error").config}


def write(results: list, path: Path, meta: dict) -> None:
    lines = ["# CPU training: TVM window forward+backward vs its forward and dense SDPA autograd", "",
             f"Machine: {meta['cpu']} ({meta['cores']} usable cores; shared with other jobs: load average "
             f"{meta['load0']} before, {meta['load1']} after). torch {torch.__version__}.", "",
             f"Command: `{meta['cmd']}`", "",
             "fp32, B=1, H=4, D=64 unless the case says otherwise; medians of interleaved rounds in one process (ratios are what to read on a "
             "shared machine). Goals (issue 15): fwd+bwd / own fwd <= 3.5; dense SDPA fwd+bwd / ours >= 3.", "",
             "| case | tvm fwd ms | tvm fwd+bwd ms | sdpa fwd+bwd ms | fwd+bwd / fwd | sdpa / ours | grads rel diff vs sdpa |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        ms = r["ms"]
        f, t, d = ms["tvm fwd"], ms["tvm fwd+bwd"], ms["sdpa fwd+bwd (dense mask)"]
        errs = ", ".join(f"{n} {e:.1e}" for n, e in r["errs"].items()) or "(tests: vs fp64 reference)"
        if r["case"].startswith("minilm"):
            errs += "; SDPA: dense, no mask"
        if d != d:   # no dense SDPA peer (hybrids)
            lines.append(f"| {r['title']} | {f:.1f} | {t:.1f} | - | {t / f:.2f} "
                         f"({'met' if t / f <= 3.5 else 'not met'}) | - | {errs} |")
            continue
        lines.append(f"| {r['title']} | {f:.1f} | {t:.1f} | {d:.1f} | {t / f:.2f} "
                     f"({'met' if t / f <= 3.5 else 'not met'}) | {d / t:.1f} ({'met' if d / t >= 3 else 'not met'}) "
                     f"| {errs} |")
    lines += ["", "Configs (the chooser's; `lincomp tune` stores tuned ones):", ""]
    for r in results:
        lines.append(f"- {r['title']}: forward {r['config']}; training "
                     f"{ {k: v['params'] for k, v in r['train_config'].items()} }")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--only", default="swa,clear,clear-pool")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_cpu.md"))
    args = ap.parse_args(argv)
    meta = {"cpu": cpu_model() or platform.processor(), "cores": len(os.sched_getaffinity(0)),
            "load0": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "cmd": "python benchmarks/bench_train_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    results = []
    for name in args.only.split(","):
        r = run_case(name.strip(), args.reps)
        ms = r["ms"]
        print(f"{r['title']}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
              + f"; fwd+bwd/fwd {ms['tvm fwd+bwd'] / ms['tvm fwd']:.2f}, "
              f"sdpa/ours {ms['sdpa fwd+bwd (dense mask)'] / ms['tvm fwd+bwd']:.1f}; errs {r['errs']}", flush=True)
        results.append(r)
    meta["load1"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    write(results, Path(args.out), meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
