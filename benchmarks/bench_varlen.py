"""Packed rows (``cu_seqlens``) on the CPU: one packed row vs the same documents one by one vs a padded batch.

    python benchmarks/bench_varlen.py [--reps 15] [--out FILE]

TVM kernels, fp32, H=4, D=64, ten documents of 128 .. 1024 tokens (8x spread, 4096 tokens in all):

- ``packed``:     ``kernel(q, k, v, cu_seqlens=cu)`` on one ``[1, H, 4096, D]`` row (documents of one length
                  batched; GLA as one call with its gate shut at document starts);
- ``one by one``: ``kernel`` on each document's own contiguous ``[1, H, n, D]`` tensors, in a Python loop;
- ``padded``:     the documents right-padded to 1024 as one ``[10, H, 1024, D]`` batch, no mask (for a causal
                  spec right padding changes no real token's output, so this is the cheapest padded form;
                  with a ``key_padding_mask`` the TVM kernels fall back to the reference).

Goals (issue 21): packed within 10% of one by one; packed >= 2x faster than padded. Cases: causal sliding
window of 256 keys, GLA (vector gate), Lizard (hedgehog_exp E=64, scalar gate, window 128 + 4 sinks).
All three implementations of a case are timed interleaved, round by round (the ratios are medians of the
per-round ratios: the shared machine's load swings cancel).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_cpu  # noqa: E402  (sets the malloc policy before torch loads)
import torch  # noqa: E402

import lincomp  # noqa: E402
from lincomp import presets  # noqa: E402
from lincomp.documents import TOKEN_AXIS, cu_seqlens_of  # noqa: E402
from lincomp.runtime.varlen import length_groups  # noqa: E402
from lincomp.testing import packed_inputs, rel_err  # noqa: E402

H, D = 4, 64
LENGTHS = [1024, 256, 128, 512, 384, 128, 768, 256, 512, 128]


def split_documents(x: dict) -> list:
    """Each document's own contiguous inputs (what a caller without cu_seqlens would hold)."""
    cu = x["cu_seqlens"].tolist()
    docs = []
    for a, b in zip(cu, cu[1:]):
        docs.append({k: (t.narrow(TOKEN_AXIS[k], a, b - a).contiguous() if k in TOKEN_AXIS else t)
                     for k, t in x.items() if k != "cu_seqlens"})
    return docs


def pad_documents(docs: list) -> dict:
    """The documents right-padded with zeros to the longest, stacked on the batch axis."""
    n = max(d["q"].shape[2] for d in docs)
    out = {}
    for k in docs[0]:
        if k not in TOKEN_AXIS:
            out[k] = docs[0][k]
            continue
        parts = []
        for d in docs:
            t = d[k]
            pad = list(t.shape)
            pad[2] = n - t.shape[2]
            parts.append(torch.cat([t, t.new_zeros(pad)], 2))
        out[k] = torch.cat(parts, 0)
    return out


def round_times(fns: dict, reps: int) -> dict:
    """{name: [ms per round]}: one timed call of each per round, right after an untimed one of the same."""
    times = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():       # warm-up
            fn()
        for _ in range(reps):
            for name, fn in fns.items():
                fn()
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def run_case(reps: int, name: str, spec) -> list:
    x = packed_inputs(spec, LENGTHS, H=H, D=D, feature_dim=64, seed=1, gate_strength=0.1)
    docs = split_documents(x)
    padded = pad_documents(docs)
    kern = lincomp.compile(spec, target="tvm")
    with torch.no_grad():
        t0 = time.perf_counter()
        o_packed = kern(**x)
        first = time.perf_counter() - t0
        o_loop = torch.cat([kern(**d) for d in docs], 2)
        o_pad = kern(**padded)
        o_pad = torch.cat([o_pad[i:i + 1, :, :n] for i, n in enumerate(LENGTHS)], 2)
    fns = {"packed (cu_seqlens)": lambda: kern(**x),
           "one by one": lambda: [kern(**d) for d in docs],
           "padded batch": lambda: kern(**padded)}
    times = round_times(fns, reps)
    t = {name: statistics.median(ts) for name, ts in times.items()}
    # Per-round ratios: both sides of a ratio ran seconds apart, so load swings of the shared machine cancel.
    one_ratio = statistics.median(a / b for a, b in zip(times["packed (cu_seqlens)"], times["one by one"]))
    pad_ratio = statistics.median(b / a for a, b in zip(times["packed (cu_seqlens)"], times["padded batch"]))
    rows = []
    for impl, ms in t.items():
        note = ""
        if impl == "packed (cu_seqlens)":
            note = f"first call {first:.1f}s (compiles unless cached)"
        elif impl == "one by one":
            note = f"rel diff vs packed {rel_err(o_loop, o_packed):.1e}"
        else:
            note = f"rel diff vs packed {rel_err(o_pad, o_packed):.1e}"
        rows.append((name, impl, ms, note))
    rows.append((name, "**goals**", None,
                 f"packed / one by one = {one_ratio:.2f} (goal <= 1.10: {'met' if one_ratio <= 1.10 else 'NOT met'}); "
                 f"padded / packed = {pad_ratio:.2f}x (goal >= 2x: {'met' if pad_ratio >= 2 else 'NOT met'}); "
                 "medians of the per-round ratios"))
    for r in rows:
        print(f"  {r[0]:10s} {r[1]:22s} {'' if r[2] is None else f'{r[2]:8.2f} ms'}  {r[3]}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "varlen_cpu.md"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    from lincomp.lower.tvmir.build import host_cpu, usable_cores
    torch.set_num_threads(usable_cores())
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    cases = [("swa256", presets.sliding_window(256)), ("gla-vector", presets.gla("vector")),
             ("lizard", presets.lizard())]
    rows = [r for name, spec in cases for r in run_case(args.reps, name, spec)]
    load_after = " ".join(f"{v:.2f}" for v in os.getloadavg())
    n_groups = len(length_groups(cu_seqlens_of(LENGTHS).tolist()))
    lines = ["# Packed rows (cu_seqlens) on the CPU: lincomp TVM", "",
             f"- CPU: **{bench_cpu.cpu_model()}** (LLVM mcpu `{host_cpu()}`), torch {torch.__version__}, "
             f"threads {torch.get_num_threads()}; load average before / after: {load_before} / {load_after}",
             f"- fp32, H={H}, D={D}; {len(LENGTHS)} documents of {LENGTHS} tokens ({sum(LENGTHS)} in all; "
             f"the padded batch holds {len(LENGTHS) * max(LENGTHS)})",
             f"- medians of {args.reps} rounds after warm-up, the three implementations interleaved in each round, "
             "each timed call right after an untimed one of the same implementation; the goal ratios are medians of "
             "the per-round ratios",
             f"- packed: documents of equal length stacked into one batched kernel call ({n_groups} calls here); GLA "
             "(a gated linear branch alone): one call over the row with the gate shut at document starts; one by one: "
             f"{len(LENGTHS)} calls on each document's own tensors; padded: one call on the right-padded batch, "
             "no mask",
             "", "| case | implementation | median ms | notes |", "| --- | --- | ---: | --- |"]
    lines += [f"| {c} | {i} | {'' if ms is None else f'{ms:.2f}'} | {n} |" for c, i, ms, n in rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
