"""`make demo`'s distillation step, trained through the reference vs the TVM kernels, in one process.

    .venv/bin/python benchmarks/bench_demo_distill.py               # writes benchmarks/results/demo_distill_cpu.md
    .venv/bin/python benchmarks/bench_demo_distill.py --steps 4 --threads 2

all-MiniLM-L6-v2 linearised with the demo's spec (non-causal window +-96 + [CLS], Hedgehog E = 64,
combine="shared"), twice from the same teacher: one student on ``target="reference"`` (autograd through the
plain-PyTorch oracle), one on ``target="tvm"`` (the fused forward and the generated backward kernels). Both
run the same layer-local attention-transfer steps on the same batches (the demo's 8 x 256 tokens); the
table gives the median seconds per step (after one warm-up step, which compiles) and the held-out embedding
cosine to the teacher after the run, both ways.
"""

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per target (default 6, after 1 warm-up)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--eval-blocks", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", default="benchmarks/results/demo_distill_cpu.md")
    a = p.parse_args()

    import torch

    from lincomp.models.distill import distill, embedding_fidelity
    from lincomp.models.distill_cli import (linearize_student, load_minilm, machine_info, minilm_blocks, minilm_spec,
                                            shuffled_batches)
    from lincomp.runtime.kernel import LincompFallbackWarning

    torch.set_num_threads(a.threads)
    spec = minilm_spec()
    tok, teacher = load_minilm("cpu")
    steps = a.steps + 1
    train = shuffled_batches(minilm_blocks(tok, "train", a.length, steps * a.batch_size), a.batch_size, 0)
    heldout = minilm_blocks(tok, "heldout", a.length, a.eval_blocks)
    rows = {}
    for target in ("reference", "tvm"):
        student = linearize_student(copy.deepcopy(teacher), spec, target=target)
        times = []

        def data(i, times=times):   # the step clock: distill asks for batch i when step i starts
            times.append(time.perf_counter())
            return train[i % len(train)]

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LincompFallbackWarning)
            distill(student, teacher, data, attention_steps=steps, lr=1e-2, seed=0, progress=False)
            times.append(time.perf_counter())
        fallbacks = sum(issubclass(w.category, LincompFallbackWarning) for w in caught)
        per_step = statistics.median(b - t for t, b in zip(times[1:-1], times[2:]))   # step 0 compiles
        fid = embedding_fidelity(student, teacher, heldout)
        rows[target] = (per_step, fid["mean"], fallbacks)
        print(f"{target}: {per_step:.2f} s / step, cosine {fid['mean']:.4f}, {fallbacks} fallbacks", flush=True)

    ref_s, tvm_s = rows["reference"][0], rows["tvm"][0]
    lines = ["# `make demo` distillation step: reference vs TVM training", "",
             f"Machine: {machine_info()['cpu']}, torch {torch.__version__}, {a.threads} threads (load average "
             f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end: other jobs share the cores). Spec `{spec.summary()}` (all-MiniLM-L6-v2, 6 layers x "
             f"12 heads, D = 32); layer-local attention transfer, {a.batch_size} x {a.length} tokens per step, "
             f"median of {a.steps} steps after a warm-up; cosine: held-out embedding cosine to the teacher after "
             f"the {steps} steps ({a.eval_blocks} texts of {a.length} tokens).", "",
             "| training target | s / step | speed-up | cosine after | fallbacks |", "| --- | --- | --- | --- | --- |"]
    for target, (s, cos, fb) in rows.items():
        lines.append(f"| {target} | {s:.2f} | {ref_s / s:.2f}x | {cos:.4f} | {fb} |")
    lines += ["", f"`python benchmarks/bench_demo_distill.py --steps {a.steps} --threads {a.threads}`", ""]
    Path(a.results).write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"speed-up {ref_s / tvm_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
