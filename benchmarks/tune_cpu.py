"""Tune the TVM kernels of the CPU benchmark's specs on this machine and store the results.

    python benchmarks/tune_cpu.py [--db tuning_db] [--force] [--only swa,clear,gla,lizard,lizard128,lizard-train,minilm]

Each spec / length bucket is searched over the hand-written config space (lincomp.lower.tvmir.kernel.
config_space) by measurement; the best config lands in ``--db`` (default: the repository's shipped
``tuning_db/``), keyed by this CPU's model name, the spec, fp32 and the length bucket. A key already
there is skipped (no work) unless ``--force``. ``lincomp tune`` does the same for any preset or spec file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


import lincomp  # noqa: E402
from lincomp import presets  # noqa: E402
from lincomp.spec import AttentionSpec  # noqa: E402
from lincomp.testing import random_inputs  # noqa: E402

B, H, D = 1, 4, 64


def cases(only):
    """(spec, L, H, D) per case; L None: the spec's own length (a grid)."""
    swa = AttentionSpec(window={"kind": "1d", "left": 255, "right": 0}, causal=True)
    lizard = presets.lizard(window=128, sinks=4, feature_dim=64)
    out = []
    if "swa" in only:
        out += [(swa, 4096, H, D), (swa, 16384, H, D)]
    if "clear" in only:
        out.append((presets.clear(8, (64, 64), text_tokens=64), None, H, D))
    if "gla" in only:
        out += [(presets.gla("scalar"), 4096, H, D), (presets.gla("vector"), 4096, H, D)]
    if "lizard" in only:
        out.append((lizard, 4096, H, D))
    if "lizard128" in only:   # the hybrid benchmark's wide-head case (bench_hybrid.py)
        out.append((lizard, 4096, H, 128))
    if "lizard-train" in only:   # training runs a sum hybrid as its two branches (hybrid_train.py), each tuned alone
        from lincomp.lower.tvmir.hybrid_train import branch_specs
        out += [(branch, 4096, H, D) for branch in branch_specs(lizard)]
    if "minilm" in only:      # the demo's spec at the hybrid benchmark's sizes (H=12, D=32)
        from lincomp.models.distill_cli import minilm_spec
        out += [(minilm_spec(), 1024, 12, 32), (minilm_spec(), 4096, 12, 32)]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", default=str(ROOT / "tuning_db"))
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--only", default="swa,clear,gla,lizard")
    args = ap.parse_args(argv)
    from lincomp.tuning import TuningDB, device_name
    db = TuningDB(args.db, shipped=None)
    print(f"device {device_name('cpu')!r} -> {db.file_for('cpu')}")
    for spec, L, heads, dim in cases(set(args.only.split(","))):
        x = random_inputs(spec, B=B, H=heads, L=L, D=dim, seed=0)
        kern = lincomp.compile(spec, target="tvm", db=db)
        t0 = time.perf_counter()
        q, k, v = x.pop("q"), x.pop("k"), x.pop("v")
        results = kern.tune(q, k, v, force=args.force, progress=False, **x)
        for res in results:   # forward parts, then the backward kernels the spec trains with
            part = res.entry.kernel if res.entry is not None else "?"
            print(f"{spec.summary():40s} L={q.shape[2]:6d} D={dim:3d} {part:10s} {res.time_ms:8.2f} ms "
                  f"{'(stored)' if res.cached else f'({len(res.candidates)} configs)'} {res.config}")
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
