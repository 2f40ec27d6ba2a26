"""Head dims that are no power of two (48, 80, 96) next to 64 / 128: TVM forward and training step, this
checkout against another one (before / after a code-generation change), one process per checkout.

    python benchmarks/bench_head_dims.py --before OTHER_CHECKOUT --out benchmarks/results/head_dims_cpu.md

LLVM widens a vector whose width is no power of two: before codegen.pow2_parts, an accumulator row of 48 or
96 floats took as many registers as one of 64 or 128 and the micro-kernels spilled. fp32, B=1, H=4, L=4096,
one thread (``time.thread_time``: the call's own CPU time), median of 7 calls after one untimed call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ("sliding window 256", "GLA scalar", "Lizard (window 128 + sinks + hedgehog_exp 64)")
DIMS = (48, 64, 80, 96, 128)


def measure(train: bool) -> dict:
    """{case: {D: ms}} of this process's lincomp (run in a child with the checkout on sys.path)."""
    import warnings

    import torch

    import lincomp
    from lincomp import presets
    from lincomp.testing import random_inputs
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    specs = dict(zip(CASES, (presets.sliding_window(256), presets.gla("scalar"),
                             presets.lizard(window=128, sinks=4, feature_dim=64))))
    out: dict = {}
    for case, spec in specs.items():
        for D in DIMS:
            x = random_inputs(spec, B=1, H=4, L=4096, D=D, seed=0)
            if train:
                for t in x.values():
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        t.requires_grad_(True)
            kern = lincomp.compile(spec, target="tvm")

            def call():
                if train:
                    o = kern(**x)
                    o.backward(torch.ones_like(o))
                else:
                    with torch.no_grad():
                        kern(**x)
            call()
            times = []
            for _ in range(7):
                t0 = time.thread_time()
                call()
                times.append((time.thread_time() - t0) * 1e3)
            out.setdefault(case, {})[D] = sorted(times)[3]
    return out


def child(package: str, train: bool) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {package!r}); sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
            f"import bench_head_dims as b; print('RESULT', json.dumps(b.measure({train})))")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return {c: {int(d): t for d, t in v.items()} for c, v in json.loads(line[7:]).items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="a checkout of lincomp to compare with (e.g. a git worktree)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/head_dims_cpu.md"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from lincomp.tuning.device import cpu_name
    rows = []
    for train in (False, True):
        after, before = child(str(ROOT), train), child(args.before, train)
        for case in CASES:
            for D in DIMS:
                a, b = after[case][D], before[case][D]
                rows.append(f"| {case} | {'fwd+bwd' if train else 'forward'} | {D} | {b:.1f} | {a:.1f} | {b / a:.2f}x |")
                print(rows[-1], flush=True)
    head = [f"# Head dims that are no power of two: before / after `codegen.pow2_parts`", "",
            f"- command: `python benchmarks/bench_head_dims.py --before <checkout of the parent commit>`",
            f"- CPU: {cpu_name()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            "- fp32, B=1, H=4, L=4096, one thread, CPU ms of one call (median of 7); default configs where the",
            "  tuning database has no entry for the head dim (every D but 64, and 128 for Lizard)", "",
            "| case | pass | D | before ms | after ms | speed-up |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    Path(args.out).write_text("\n".join(head + rows) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
